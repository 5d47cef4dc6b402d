"""Routing one window of trace tokens for the simulator.

``captured`` replays the recorded choices; ``reroute`` routes the stored scores again
with the torch routing functions of ``moesim.traces`` (one implementation of every
gate) under the scenario's gate, ``M`` and top-k. Capacity dropping, when the
scenario sets a capacity factor, applies after either.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moesim.config.feasibility import limit_units
from moesim.config.scenario import Scenario
from moesim.placement.layout import LayerPlacement
from moesim.routing.batch import RoutedBatch
from moesim.routing.dropping import capacity_of, routed_batch


def route_scores(scenario: Scenario, scores_te: np.ndarray, *, gpus_per_domain: int,
                 bias_e: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ids and gate weights ``[T, K]`` of affinities ``scores_te`` [T, E] under the
    scenario's gate, top-k and ``M``, through the torch routing layers; ``bias_e`` [E]
    steers a group-limited-sigmoid gate's selection."""
    import torch

    from moesim.traces.gates import route

    m, r = scenario.model, scenario.routing
    group_size = max_groups = None
    if r.max_devices is not None:
        _, group_size = limit_units(scenario, gpus_per_domain)
        max_groups = r.max_devices
    bias = None
    if r.gate == "group-limited-sigmoid" and bias_e is not None:
        bias = torch.from_numpy(np.asarray(bias_e, dtype=np.float32))
    with torch.inference_mode():  # no autograd bookkeeping: all tokens of a window at once
        routing = route(torch.from_numpy(np.asarray(scores_te, dtype=np.float32)),
                        kind=r.gate, top_k=m.top_k, group_size=group_size,
                        max_groups=max_groups, bias_e=bias)
        return routing.ids_tk.numpy(), routing.weights_tk.numpy()


def route_logical(scenario: Scenario, trace, layer: int, tokens: np.ndarray,
                  gpus_per_domain: int, bias_e: np.ndarray | None = None,
                  scores_te: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Logical expert ids and gate weights ``[T, K]`` of trace ``tokens`` of ``layer``:
    the captured choices, or the stored scores re-routed (with ``bias_e``, else the
    trace's own selection bias; ``scores_te``: those scores when already gathered)."""
    if scenario.routing.replay == "reroute":
        if bias_e is None and trace.bias is not None:
            bias_e = trace.bias[layer]
        if scores_te is None:
            scores_te = trace.scores[layer, tokens]
        return route_scores(scenario, scores_te, gpus_per_domain=gpus_per_domain,
                            bias_e=bias_e)
    return trace.expert_ids[layer, tokens].astype(np.int64), trace.weights[layer, tokens]


def route_tokens(scenario: Scenario, trace, layer: int, tokens: np.ndarray, *,
                 tokens_per_rank: int, gpus_per_domain: int, seed: int,
                 placement: LayerPlacement | None = None,
                 bias_e: np.ndarray | None = None) -> RoutedBatch:
    """Routed batch of trace ``tokens`` (indices, rank-major) of trace ``layer``, on the
    slots of ``placement`` (re-routing with selection bias ``bias_e`` when given)."""
    scores_te = None  # gathered once: for re-routing and for the affinity kept
    if trace.scores is not None:
        scores_te = trace.scores[layer, tokens].astype(np.float32)
    ids_tk, weights_tk = route_logical(scenario, trace, layer, tokens, gpus_per_domain,
                                       bias_e=bias_e, scores_te=scores_te)
    batch = routed_batch(ids_tk, weights_tk, tokens_per_rank=tokens_per_rank,
                         experts=scenario.model.routed_experts, placement=placement,
                         capacity=capacity_of(scenario), seq_id_t=trace.seq_id[tokens],
                         seed=seed, affinity_tk=weights_tk)
    if scores_te is None:
        return batch
    return dataclasses.replace(batch, score_mass=score_mass(scores_te, ids_tk))


def score_mass(scores_te: np.ndarray, ids_tk: np.ndarray) -> tuple[float, float]:
    """(affinity of the chosen experts, affinity of each token's unrestricted top-K):
    their ratio is the share of the gate's affinity a device limit keeps."""
    top_k = ids_tk.shape[1]
    free = -np.partition(-scores_te, top_k - 1, axis=1)[:, :top_k]
    chosen = np.take_along_axis(scores_te, np.maximum(ids_tk, 0), axis=1) * (ids_tk >= 0)
    return float(chosen.sum()), float(free.sum())
