"""The auxiliary-loss-free balance policy over training steps (DeepSeek-V3;
docs/routing.md section 3.3): every step routes with the current selection bias, and
each expert's bias moves by ``bias_update_speed`` against its load's deviation from the
mean (the sign rule of ``moesim.traces.bias``).

Scores come from the replayed trace (its stored affinities, every step a fresh window
of a layer's tokens) or, without a trace, from synthetic tokens: ``sigmoid(z + c_e)``
with ``z ~ N(0, 1)`` and per-expert offsets ``c`` calibrated so that the gate's picks
follow the draw's expert popularity, as the popularity draws of plain synthetic
routing do (uniform popularity gives the random scores the gate is tested on). Either
way the scenario's gate routes them, through the torch routing layers. The bias history
is computed once on samples of ``SAMPLE_TOKENS`` tokens per step and key; the simulated
steps then route whole batches with the bias of their step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from moesim.config.feasibility import layer_draws
from moesim.config.scenario import Scenario
from moesim.placement.layout import LayerPlacement, scenario_placement
from moesim.routing.batch import count_in_scenario, expert_loads
from moesim.routing.dropping import capacity_of, routed_batch
from moesim.routing.replay import route_scores
from moesim.routing.source import DrawnSource, RoutingSource, TraceSource
from moesim.routing.synthetic_layers import draw_popularity

SAMPLE_TOKENS = 16384  # per step and key: about 500 picks per expert of a 256 x top-8 gate
CHECKPOINTS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


CALIBRATION_ROUNDS = 12


def synthetic_scores(offset_e: np.ndarray, n_tokens: int,
                     rng: np.random.Generator) -> np.ndarray:
    """[T, E] sigmoid affinities ``sigmoid(z + offset_e)`` of synthetic tokens."""
    logits = rng.standard_normal((n_tokens, offset_e.shape[0]), dtype=np.float32)
    return (1.0 / (1.0 + np.exp(-(logits + offset_e)))).astype(np.float32)


def calibrated_offsets(scenario: Scenario, popularity_e: np.ndarray, *, gpus_per_domain: int,
                       rng: np.random.Generator) -> np.ndarray:
    """Logit offsets [E] with which the scenario's gate picks each expert in proportion to
    its popularity: from ``log(E p)``, each round moves every offset by part of the log
    ratio of its wanted to its routed picks on a sample."""
    experts, top_k = popularity_e.shape[0], scenario.model.top_k
    wanted_e = np.minimum(popularity_e * top_k, 1.0)
    floor = 1.0 / SAMPLE_TOKENS
    offset_e = np.log(np.maximum(popularity_e * experts, 1e-9)).astype(np.float32)
    for _ in range(CALIBRATION_ROUNDS):
        ids_tk, _ = route_scores(scenario, synthetic_scores(offset_e, SAMPLE_TOKENS, rng),
                                 gpus_per_domain=gpus_per_domain)
        got_e = expert_loads(ids_tk, experts) / SAMPLE_TOKENS
        offset_e = (offset_e + 0.7 * np.log((wanted_e + floor) / (got_e + floor))).astype(
            np.float32)
    return offset_e


def checkpoints(steps: int) -> list[int]:
    """The steps whose whole step is simulated for the series (always the last)."""
    return sorted({s for s in CHECKPOINTS if s < steps} | {steps})


@dataclass(frozen=True, kw_only=True)
class BiasHistory:
    """``bias_ske`` [steps + 1, keys, E] the selection bias at each step, and the balance
    of the samples routed with it (``series``: step, expert_max_over_mean,
    gpu_max_over_mean under contiguous placement, each the mean over keys); without a
    trace, ``offsets`` [keys] the synthetic tokens' calibrated logit offsets."""

    bias_ske: np.ndarray
    series: pd.DataFrame
    offsets: list[np.ndarray] | None = None


class _Scores:
    """Samples of affinities per routing key: a trace layer's tokens, or synthetic ones."""

    def __init__(self, scenario: Scenario, trace, rng: np.random.Generator, *,
                 gpus_per_domain: int) -> None:
        self.scenario, self.trace, self.rng = scenario, trace, rng
        if trace is None:
            self.n_keys = layer_draws(scenario)
            self.offsets = [calibrated_offsets(scenario, draw_popularity(scenario, rng),
                                               gpus_per_domain=gpus_per_domain, rng=rng)
                            for _ in range(self.n_keys)]
        else:
            self.n_keys = scenario.model.moe_layers

    def initial_bias(self, key: int) -> np.ndarray:
        if self.trace is not None and self.trace.bias is not None:
            return self.trace.bias[key % self.trace.num_layers].astype(np.float32)
        return np.zeros(self.scenario.model.routed_experts, dtype=np.float32)

    def sample(self, key: int, n_tokens: int) -> np.ndarray:
        if self.trace is None:
            return synthetic_scores(self.offsets[key], n_tokens, self.rng)
        layer = key % self.trace.num_layers
        start = int(self.rng.integers(self.trace.num_tokens))
        tokens = (start + np.arange(min(n_tokens, self.trace.num_tokens))) \
            % self.trace.num_tokens
        return self.trace.scores[layer, tokens].astype(np.float32)


def bias_history(scenario: Scenario, trace, *, gpus_per_domain: int,
                 seed: int) -> BiasHistory:
    """Route ``routing.balance_steps`` steps with the aux-loss-free bias update."""
    import torch

    from moesim.traces.bias import update_bias

    r, p = scenario.routing, scenario.parallel
    scores = _Scores(scenario, trace, np.random.default_rng([seed, 1]),
                     gpus_per_domain=gpus_per_domain)
    experts = scenario.model.routed_experts
    per_gpu = experts // p.ep if experts % p.ep == 0 else None
    bias_ske = np.zeros((r.balance_steps + 1, scores.n_keys, experts), dtype=np.float32)
    rows = []
    for key in range(scores.n_keys):
        bias_ske[0, key] = scores.initial_bias(key)
    for step in range(r.balance_steps + 1):
        expert_mom, gpu_mom = [], []
        for key in range(scores.n_keys):
            ids_tk, _ = route_scores(scenario, scores.sample(key, SAMPLE_TOKENS),
                                     gpus_per_domain=gpus_per_domain, bias_e=bias_ske[step, key])
            load_e = expert_loads(ids_tk, experts)
            expert_mom.append(load_e.max() / load_e.mean())
            if per_gpu is not None:
                load_g = load_e.reshape(p.ep, per_gpu).sum(axis=1)
                gpu_mom.append(load_g.max() / load_g.mean())
            if step < r.balance_steps:
                bias_ske[step + 1, key] = update_bias(
                    torch.from_numpy(bias_ske[step, key]), torch.from_numpy(load_e),
                    rate=r.bias_update_speed).numpy()
        rows.append({"step": step, "expert_max_over_mean": float(np.mean(expert_mom)),
                     "gpu_max_over_mean": float(np.mean(gpu_mom)) if gpu_mom else np.nan})
    return BiasHistory(bias_ske=bias_ske, series=pd.DataFrame(rows),
                       offsets=None if trace is not None else scores.offsets)


class BiasedTraceSource(TraceSource):
    """A trace's stored scores re-routed with the balance policy's bias of one step."""

    def __init__(self, scenario: Scenario, trace, *, bias_ke: np.ndarray, **kwargs) -> None:
        super().__init__(scenario, trace, **kwargs)
        self.bias_ke = bias_ke

    def bias_of(self, layer: int) -> np.ndarray | None:
        return self.bias_ke[layer % self.bias_ke.shape[0]]


class ScoredSyntheticSource(DrawnSource):
    """Draws of synthetic tokens with affinities, routed by the scenario's gate with the
    balance policy's bias of one step."""

    def __init__(self, scenario: Scenario, *, bias_ke: np.ndarray, offsets: list[np.ndarray],
                 gpus_per_domain: int, rng: np.random.Generator) -> None:
        super().__init__(scenario)
        m, p = scenario.model, scenario.parallel
        per_mb = p.tokens_per_gpu // p.micro_batches
        for key in range(self.n_keys):
            placement = self._placement(scenario, offsets[key], bias_ke[key], per_mb,
                                        gpus_per_domain, rng)
            for mb in range(p.micro_batches):
                sample = synthetic_scores(offsets[key], p.ep * per_mb, rng)
                ids_tk, weights_tk = route_scores(scenario, sample,
                                                  gpus_per_domain=gpus_per_domain,
                                                  bias_e=bias_ke[key])
                batch = routed_batch(
                    ids_tk, weights_tk, tokens_per_rank=per_mb, experts=m.routed_experts,
                    placement=placement, capacity=capacity_of(scenario),
                    seq_id_t=np.arange(p.ep * per_mb) // min(p.seq_len, per_mb),
                    seed=int(rng.integers(2**31)), affinity_tk=weights_tk)
                self.draws[key][mb] = count_in_scenario(scenario, batch, gpus_per_domain)

    @staticmethod
    def _placement(scenario: Scenario, offset_e: np.ndarray, bias_e: np.ndarray,
                   per_mb: int, gpus_per_domain: int,
                   rng: np.random.Generator) -> LayerPlacement:
        loads_e = None
        if scenario.placement.rebalanced:  # an earlier window, routed with the same bias
            window = synthetic_scores(offset_e, scenario.parallel.ep * per_mb, rng)
            ids_tk, _ = route_scores(scenario, window, gpus_per_domain=gpus_per_domain,
                                     bias_e=bias_e)
            loads_e = expert_loads(ids_tk, scenario.model.routed_experts)
        return scenario_placement(scenario, loads_e, gpus_per_domain=gpus_per_domain)


def balanced_source(scenario: Scenario, trace, history: BiasHistory, step: int, *,
                    gpus_per_domain: int, seed: int) -> RoutingSource:
    """The routing of a step that routes with the bias of ``step`` of ``history``; every
    step's source draws the same tokens (a fixed seed), so steps differ only by their
    bias."""
    rng = np.random.default_rng([seed, 2])
    bias_ke = history.bias_ske[step]
    if trace is None:
        return ScoredSyntheticSource(scenario, bias_ke=bias_ke, offsets=history.offsets,
                                     gpus_per_domain=gpus_per_domain, rng=rng)
    return BiasedTraceSource(scenario, trace, bias_ke=bias_ke, gpus_per_domain=gpus_per_domain,
                             rng=rng)
