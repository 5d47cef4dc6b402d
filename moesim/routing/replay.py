"""Routing one window of trace tokens for the simulator.

``captured`` replays the recorded choices; ``reroute`` routes the stored scores again
with the torch routing functions of ``moesim.traces`` (one implementation of every
gate) under the scenario's gate, ``M`` and top-k. Capacity dropping, when the
scenario sets a capacity factor, applies after either.

Re-routing routes each trace layer's tokens once (:class:`LayerRoutes`: every token
that any window of the layer takes, chunk by chunk); the windows of the EP groups and
micro-batches then take their rows of it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moesim.config.feasibility import limit_units
from moesim.config.scenario import Scenario
from moesim.placement.layout import LayerPlacement
from moesim.routing.batch import RoutedBatch
from moesim.routing.dropping import capacity_of, routed_batch


def gate_of(scenario: Scenario, gpus_per_domain: int) -> dict:
    """The routing arguments (gate kind, top-k, group limit) of the scenario's gate."""
    m, r = scenario.model, scenario.routing
    group_size = max_groups = None
    if r.max_devices is not None:
        _, group_size = limit_units(scenario, gpus_per_domain)
        max_groups = r.max_devices
    return {"kind": r.gate, "top_k": m.top_k, "group_size": group_size,
            "max_groups": max_groups}


def route_rows_of(scenario: Scenario, scores_te: np.ndarray, *, gpus_per_domain: int,
                  bias_e: np.ndarray | None = None, rows: np.ndarray | None = None,
                  out=None):
    """:func:`moesim.traces.gates.route_rows` of affinities ``scores_te`` [T, E] (its
    ``rows``, if given) under the scenario's gate, top-k and ``M``; ``bias_e`` [E] steers
    a group-limited-sigmoid gate's selection."""
    import torch

    from moesim.traces.gates import route_rows

    bias = None
    if scenario.routing.gate == "group-limited-sigmoid" and bias_e is not None:
        bias = np.asarray(bias_e, dtype=np.float32)
    with torch.inference_mode():  # no autograd bookkeeping
        return route_rows(scores_te, **gate_of(scenario, gpus_per_domain), bias_e=bias,
                          rows=rows, out=out)


def route_scores(scenario: Scenario, scores_te: np.ndarray, *, gpus_per_domain: int,
                 bias_e: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ids and gate weights ``[T, K]`` of affinities ``scores_te`` [T, E] under the
    scenario's gate, top-k and ``M``, through the torch routing layers; ``bias_e`` [E]
    steers a group-limited-sigmoid gate's selection."""
    routed = route_rows_of(scenario, scores_te, gpus_per_domain=gpus_per_domain,
                           bias_e=bias_e)
    return routed.ids_tk, routed.weights_tk


def route_tokens(scenario: Scenario, trace, layer: int, tokens: np.ndarray, *,
                 tokens_per_rank: int, gpus_per_domain: int, seed: int,
                 placement: LayerPlacement | None = None,
                 bias_e: np.ndarray | None = None) -> RoutedBatch:
    """Routed batch of trace ``tokens`` (indices, rank-major) of trace ``layer``, on the
    slots of ``placement`` (re-routing with selection bias ``bias_e`` when given)."""
    routes = LayerRoutes(scenario, trace, layer, [tokens], gpus_per_domain=gpus_per_domain,
                         bias_e=bias_e)
    return routes.batch(tokens, tokens_per_rank=tokens_per_rank, seed=seed,
                        placement=placement)


class LayerRoutes:
    """The routing of the tokens of trace ``layer`` that ``windows`` (token index
    arrays) take: re-routed once for all of them, or the captured choices.

    ``buffers`` (a dict kept between layers) holds the arrays it writes, so that
    layer after layer reuses the same memory.
    """

    def __init__(self, scenario: Scenario, trace, layer: int, windows: list[np.ndarray], *,
                 gpus_per_domain: int, bias_e: np.ndarray | None = None,
                 buffers: dict | None = None) -> None:
        self.scenario, self.trace, self.layer = scenario, trace, layer
        self.buffers = {} if buffers is None else buffers
        self.routed = None
        if scenario.routing.replay != "reroute":
            return
        if bias_e is None and trace.bias is not None:
            bias_e = trace.bias[layer]
        needed = np.zeros(trace.num_tokens, dtype=bool)
        for tokens in windows:
            needed[tokens] = True
        rows = None  # every token: the layer's rows in order
        self.row_of = None
        if not needed.all():
            rows = np.flatnonzero(needed)
            self.row_of = np.cumsum(needed) - 1
        n_rows = trace.num_tokens if rows is None else rows.size
        self.routed = route_rows_of(scenario, trace.scores[layer], rows=rows, bias_e=bias_e,
                                    gpus_per_domain=gpus_per_domain,
                                    out=self._routed_buffers(n_rows))

    def _buffer(self, name: str, rows: int, dtype) -> np.ndarray:
        """A [rows, K] array of ``buffers``, grown when too small."""
        k = self.scenario.model.top_k
        array = self.buffers.get(name)
        if array is None or array.shape[0] < rows or array.shape[1] != k \
                or array.dtype != dtype:
            array = self.buffers[name] = np.empty((rows, k), dtype=dtype)
        return array[:rows]

    def _routed_buffers(self, rows: int):
        from moesim.traces.gates import RoutedRows

        return RoutedRows(*(self._buffer(f"layer {name}", rows, dtype) for name, dtype in (
            ("ids", np.int64), ("weights", np.float32), ("picked", np.float32),
            ("top", np.float32))))

    def logical(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logical expert ids and gate weights ``[T, K]`` of ``tokens`` (one window)."""
        if self.routed is None:
            return (self.trace.expert_ids[self.layer, tokens].astype(np.int64),
                    self.trace.weights[self.layer, tokens])
        rows = tokens if self.row_of is None else self.row_of[tokens]
        # The window's arrays live until its batch is counted, then the next reuses them.
        return (np.take(self.routed.ids_tk, rows, axis=0,
                        out=self._buffer("window ids", rows.size, np.int64)),
                np.take(self.routed.weights_tk, rows, axis=0,
                        out=self._buffer("window weights", rows.size, np.float32)))

    def score_mass(self, tokens: np.ndarray) -> tuple[float, float] | None:
        """(affinity of the chosen experts, of each token's unrestricted top-K), summed
        over ``tokens`` as :func:`score_mass` sums them; None without scores."""
        if self.trace.scores is None:
            return None
        if self.routed is None:  # captured choices against the stored scores
            ids_tk = self.trace.expert_ids[self.layer, tokens].astype(np.int64)
            return score_mass(self.trace.scores[self.layer, tokens].astype(np.float32), ids_tk)
        rows = tokens if self.row_of is None else self.row_of[tokens]
        picked = np.take(self.routed.picked_tk, rows, axis=0,
                         out=self._buffer("window picked", rows.size, np.float32))
        top = np.take(self.routed.top_tk, rows, axis=0,
                      out=self._buffer("window top", rows.size, np.float32))
        return float(picked.sum()), float(top.sum())

    def batch(self, tokens: np.ndarray, *, tokens_per_rank: int, seed: int,
              placement: LayerPlacement | None = None) -> RoutedBatch:
        """Routed batch of ``tokens`` (indices, rank-major) on the slots of
        ``placement``."""
        ids_tk, weights_tk = self.logical(tokens)
        batch = routed_batch(ids_tk, weights_tk, tokens_per_rank=tokens_per_rank,
                             experts=self.scenario.model.routed_experts, placement=placement,
                             capacity=capacity_of(self.scenario),
                             seq_id_t=self.trace.seq_id[tokens], seed=seed,
                             affinity_tk=weights_tk)
        mass = self.score_mass(tokens)
        return batch if mass is None else dataclasses.replace(batch, score_mass=mass)


def score_mass(scores_te: np.ndarray, ids_tk: np.ndarray) -> tuple[float, float]:
    """(affinity of the chosen experts, affinity of each token's unrestricted top-K):
    their ratio is the share of the gate's affinity a device limit keeps."""
    top_k = ids_tk.shape[1]
    free = -np.partition(-scores_te, top_k - 1, axis=1)[:, :top_k]
    chosen = np.take_along_axis(scores_te, np.maximum(ids_tk, 0), axis=1) * (ids_tk >= 0)
    return float(chosen.sum()), float(free.sum())
