"""Where a simulation's routing comes from: synthetic draws or a captured trace.

A source hands out routing per *key*: MoE layers with the same key route alike, so
their costs are computed once. ``key_counts(key)[group][microbatch]`` are the counts
of one routed micro-batch of one EP group.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from moesim.config.feasibility import layer_draws, limit_units
from moesim.config.gates import GATES
from moesim.config.scenario import Scenario
from moesim.placement.layout import LayerPlacement, scenario_placement
from moesim.routing.batch import BatchCounts, count_in_scenario, expert_loads
from moesim.routing.synthetic_layers import draw_of, synthetic_counts


class RoutingSource(ABC):
    n_keys: int
    gate: str  # the gate whose choices the simulation replays
    warnings: list[str]  # what the user should know about this routing

    @abstractmethod
    def key_of(self, moe_layer: int) -> int:
        """Key of MoE layer ``moe_layer`` (0 = the first MoE layer)."""

    @abstractmethod
    def key_counts(self, key: int) -> list[list[BatchCounts]]:
        """Counts per EP group and micro-batch for layers with this key."""

    def keys_per_layer(self, moe_layers: int) -> list[int]:
        return [self.key_of(li) for li in range(moe_layers)]


class DrawnSource(RoutingSource):
    """``S`` independent synthetic layer draws, each routed once per micro-batch
    (``draws[draw][microbatch]``); EP group ``g`` of layer ``l`` uses draw
    ``(l + g) mod S``, so the key is ``l mod S``."""

    def __init__(self, scenario: Scenario) -> None:
        self.n_keys = layer_draws(scenario)
        self.gate, self.warnings = scenario.routing.gate, []
        self.groups = scenario.parallel.ep_groups
        self.draws: list[list[BatchCounts | None]] = [
            [None] * scenario.parallel.micro_batches for _ in range(self.n_keys)
        ]

    def key_of(self, moe_layer: int) -> int:
        return moe_layer % self.n_keys

    def key_counts(self, key: int) -> list[list[BatchCounts]]:
        return [self.draws[draw_of(key, g, self.n_keys)] for g in range(self.groups)]


class SyntheticSource(DrawnSource):
    """Draws of expert picks by popularity (:mod:`moesim.routing.synthetic_layers`)."""

    def __init__(self, scenario: Scenario, *, gpus_per_domain: int, rng: np.random.Generator):
        super().__init__(scenario)
        for draw, mb, counts in synthetic_counts(scenario, gpus_per_domain=gpus_per_domain,
                                                 rng=rng):
            self.draws[draw][mb] = counts


class TraceSource(RoutingSource):
    """Replays a RoutingTrace: every MoE layer is its own key.

    Scenario MoE layer ``l`` uses trace layer ``l mod L``. Each (EP group,
    micro-batch) takes a window of consecutive trace tokens (so sequences stay
    together) starting at a seeded offset, wrapping around when the trace is shorter;
    with recorded source ranks, rank ``r`` takes its tokens from recorded rank
    ``r mod R``. Layers are routed one at a time, so memory stays bounded by one
    layer's counts: a layer's windows are drawn first, then every trace token they
    take is re-routed once (:class:`~moesim.routing.replay.LayerRoutes`), into arrays
    reused from layer to layer.
    """

    def __init__(self, scenario: Scenario, trace, *, gpus_per_domain: int,
                 rng: np.random.Generator):
        check_trace(scenario, trace)
        check_captured_limit(scenario, trace, gpus_per_domain)
        self.scenario, self.trace, self.rng = scenario, trace, rng
        r = scenario.routing
        traced_gate = str((trace.metadata.get("gate") or {}).get("kind", "unknown"))
        self.gate = traced_gate if r.replay == "captured" else r.gate
        self.warnings = []
        if r.replay == "reroute" and traced_gate in GATES and traced_gate != r.gate:
            self.warnings.append(
                f"re-routing with gate {r.gate} the scores that gate {traced_gate} "
                "produced: their scale and selection were made for another gate")
        self.gpus_per_domain = gpus_per_domain
        self.n_keys = scenario.model.moe_layers
        self.file_loads = None
        pl = scenario.placement
        if pl.rebalanced and pl.loads not in ("window", "trace"):
            from moesim.placement.loads import read_loads

            self.file_loads = read_loads(pl.loads, experts=trace.num_experts)
        self._buffers: dict = {}  # the routing's arrays, reused layer after layer
        ranks = trace.src_rank
        self.rank_tokens = None
        if ranks is not None:
            # One stable sort, not a scan per rank (a trace may hold a rank per token);
            # stable keeps each rank's tokens in trace order.
            order = np.argsort(ranks, kind="stable")
            self.rank_tokens = np.split(order, np.flatnonzero(np.diff(ranks[order])) + 1)

    def key_of(self, moe_layer: int) -> int:
        return moe_layer

    def bias_of(self, layer: int) -> np.ndarray | None:
        """The selection bias re-routing uses in trace ``layer`` (None: the trace's own)."""
        return None

    def _window(self, tokens: np.ndarray, n: int) -> np.ndarray:
        start = int(self.rng.integers(tokens.shape[0]))
        return tokens[(start + np.arange(n)) % tokens.shape[0]]

    def _token_ids(self, per_rank: int) -> np.ndarray:
        ep = self.scenario.parallel.ep
        if self.rank_tokens is None:
            return self._window(np.arange(self.trace.num_tokens), ep * per_rank)
        return np.concatenate([
            self._window(self.rank_tokens[r % len(self.rank_tokens)], per_rank)
            for r in range(ep)
        ])

    def _placement(self, routes, early: np.ndarray | None) -> LayerPlacement:
        """The layer's placement, from the loads ``placement.loads`` names: those of
        the ``early`` tokens' routing (``window``, ``trace``), or of the loads file."""
        s, pl = self.scenario, self.scenario.placement
        loads_e = None
        if pl.rebalanced:
            if early is None:
                layer = routes.layer
                return scenario_placement(s, self.file_loads[layer % len(self.file_loads)],
                                          gpus_per_domain=self.gpus_per_domain)
            ids_tk, _ = routes.logical(early)
            loads_e = expert_loads(ids_tk, s.model.routed_experts)
        return scenario_placement(s, loads_e, gpus_per_domain=self.gpus_per_domain)

    def key_counts(self, key: int) -> list[list[BatchCounts]]:
        from moesim.routing.replay import LayerRoutes

        p, pl = self.scenario.parallel, self.scenario.placement
        per_rank = p.tokens_per_gpu // p.micro_batches
        layer = key % self.trace.num_layers
        # The tokens first, drawn in the same order as ever: a rebalancing placement's
        # earlier window, then every EP group's micro-batches with their seeds; then
        # one routing of all of them.
        early = None
        if pl.rebalanced and pl.loads == "window":  # an earlier window, routed alike
            early = self._token_ids(per_rank)
        elif pl.rebalanced and pl.loads == "trace":
            early = np.arange(self.trace.num_tokens)
        draws = [[(self._token_ids(per_rank), int(self.rng.integers(2**31)) + mb)
                  for mb in range(p.micro_batches)] for _group in range(p.ep_groups)]
        windows = [tokens for row in draws for tokens, _ in row]
        routes = LayerRoutes(self.scenario, self.trace, layer,
                             windows if early is None else [early, *windows],
                             gpus_per_domain=self.gpus_per_domain, bias_e=self.bias_of(layer),
                             buffers=self._buffers)
        placement = self._placement(routes, early)
        out = [[count_in_scenario(self.scenario,
                                  routes.batch(tokens, tokens_per_rank=per_rank, seed=seed,
                                               placement=placement), self.gpus_per_domain)
                for tokens, seed in row] for row in draws]
        release = getattr(self.trace, "release", None)
        if release is not None:  # a mapped trace's pages of this layer go back
            release(layer)
        return out


def check_trace(scenario: Scenario, trace) -> None:
    """InputError unless the trace can drive this scenario."""
    from moesim.errors import InputError

    m, r = scenario.model, scenario.routing
    if trace.num_experts != m.routed_experts:
        raise InputError(
            f"the trace routes over {trace.num_experts} experts, the model has "
            f"{m.routed_experts}; fit a synthetic trace to it for other expert counts",
            field="trace", allowed=f"a trace with {m.routed_experts} experts")
    if r.replay == "captured" and trace.top_k != m.top_k:
        raise InputError(
            f"captured choices have top_k {trace.top_k}, the model {m.top_k}",
            field="routing.replay", allowed="reroute (from stored scores), or a matching trace")
    if r.replay == "reroute" and trace.scores is None:
        raise InputError("re-routing needs the trace's scores, and this trace has none",
                         field="routing.replay", allowed="captured")
    if trace.num_tokens == 0:
        raise InputError("the trace has no tokens", field="trace")


def units_reached(ids_tk: np.ndarray, per_unit: int) -> np.ndarray:
    """[T] distinct units (blocks of ``per_unit`` experts) each token's picks reach."""
    units_tk = np.sort(np.where(ids_tk >= 0, ids_tk // per_unit, -1), axis=1)
    new_tk = np.ones(units_tk.shape, dtype=bool)
    new_tk[:, 1:] = units_tk[:, 1:] != units_tk[:, :-1]
    return (new_tk & (units_tk >= 0)).sum(axis=1)


def check_captured_limit(scenario: Scenario, trace, gpus_per_domain: int) -> None:
    """InputError when captured choices reach more units than the scenario's ``M``: a
    replay never ignores the device limit it was asked to simulate."""
    from moesim.errors import InputError

    r = scenario.routing
    if r.replay != "captured" or r.max_devices is None:
        return
    units, per_unit = limit_units(scenario, gpus_per_domain)
    reach = np.concatenate([units_reached(ids.astype(np.int64), per_unit)
                            for ids in trace.expert_ids])
    worst = int(reach.max(initial=0))
    if worst <= r.max_devices:
        return
    options = [f"routing.max_devices >= {worst}", "null"]
    if trace.scores is not None:
        options.insert(0, "routing.replay=reroute (the stored scores routed again under M)")
    raise InputError(
        f"the captured choices reach up to {worst} {r.limit_scope}s of this EP group, more "
        f"than M = {r.max_devices} ({np.mean(reach > r.max_devices):.1%} of tokens)",
        field="routing.max_devices", allowed=", or ".join(options))
