"""Synthetic routing for a scenario: independent layer draws per micro-batch.

Draw ``s`` of micro-batch ``m`` routes ``ep x tokens_per_microbatch`` tokens of one EP
group. MoE layer ``l`` of EP group ``g`` uses draw ``(l + g) mod S``: every group sees
a different draw in the same layer, and layers cycle through the ``S`` draws.

Each draw has its expert placement: contiguous, or rebalanced from the loads of an
earlier window of the same draw (an independent batch with the same popularity), as a
system rebalances from recent statistics before the step that is simulated.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from moesim.config.feasibility import layer_draws, limit_units
from moesim.config.scenario import Scenario
from moesim.placement.layout import LayerPlacement, scenario_placement
from moesim.routing.batch import BatchCounts, RoutedBatch, count_in_scenario, expert_loads
from moesim.routing.dropping import Capacity, capacity_of, routed_batch
from moesim.routing.synthetic import expert_popularity, sample_topk


def draw_popularity(scenario: Scenario, rng: np.random.Generator) -> np.ndarray:
    """[E] expert popularity of one layer draw (a power law's is sampled for one
    micro-batch of the EP group)."""
    m, p, r = scenario.model, scenario.parallel, scenario.routing
    return expert_popularity(
        m.routed_experts, assignment=r.assignment, zipf_exponent=r.zipf_exponent, rng=rng,
        power_law_alpha=r.power_law_alpha, tokens=p.ep * (p.tokens_per_gpu // p.micro_batches),
        top_k=m.top_k)


def draw_of(layer_index: int, group: int, n_draws: int) -> int:
    """Draw used by MoE layer ``layer_index`` (0 = first MoE layer) in EP group ``group``."""
    return (layer_index + group) % n_draws


def draw_batch(
    popularity_e: np.ndarray, *, n_tokens: int, tokens_per_rank: int, top_k: int,
    rng: np.random.Generator, unit_size: int | None = None, max_units: int | None = None,
    capacity: Capacity | None = None, placement: LayerPlacement | None = None,
    seq_len: int | None = None,
) -> RoutedBatch:
    """One routed micro-batch of ``n_tokens`` synthetic tokens, ``tokens_per_rank`` per
    rank: ``top_k`` distinct experts each (:func:`sample_topk`, within ``max_units``
    units of ``unit_size`` experts), on the slots of ``placement``, within ``capacity``
    (sequences of ``seq_len`` tokens, or one per rank)."""
    ids_tk = sample_topk(popularity_e, n_tokens=n_tokens, top_k=top_k, rng=rng,
                         unit_size=unit_size, max_units=max_units)
    weights_tk, seq_id_t, seed = None, None, 0
    if capacity is not None:
        # Synthetic tokens carry no affinities: their gate weights are exchangeable, so
        # the lowest-weight assignments are a random set.
        weights_tk = rng.random(ids_tk.shape) if capacity.drop_policy == "probs" else None
        seed = int(rng.integers(2**31))
        seq_id_t = np.arange(n_tokens) // min(seq_len or tokens_per_rank, tokens_per_rank)
    return routed_batch(ids_tk, weights_tk, tokens_per_rank=tokens_per_rank,
                        experts=popularity_e.shape[0], placement=placement,
                        capacity=capacity, seq_id_t=seq_id_t, seed=seed)


def synthetic_counts(
    scenario: Scenario, *, gpus_per_domain: int, rng: np.random.Generator
) -> Iterator[tuple[int, int, BatchCounts]]:
    """Yield ``(draw, microbatch, counts)`` one batch at a time, so memory stays bounded:
    each batch is drawn (:func:`draw_batch`), placed, dropped and counted."""
    m, p, r = scenario.model, scenario.parallel, scenario.routing
    tokens_per_mb = p.tokens_per_gpu // p.micro_batches
    n_tokens = p.ep * tokens_per_mb
    unit_size = max_units = None
    if r.max_devices is not None:
        _, unit_size = limit_units(scenario, gpus_per_domain)
        max_units = r.max_devices
    capacity = capacity_of(scenario)
    for draw in range(layer_draws(scenario)):
        popularity_e = draw_popularity(scenario, rng)
        loads_e = None
        if scenario.placement.rebalanced:  # an earlier window of this draw
            earlier = sample_topk(popularity_e, n_tokens=n_tokens, top_k=m.top_k, rng=rng,
                                  unit_size=unit_size, max_units=max_units)
            loads_e = expert_loads(earlier, m.routed_experts)
        placement = scenario_placement(scenario, loads_e, gpus_per_domain=gpus_per_domain)
        for mb in range(p.micro_batches):
            counts = count_in_scenario(scenario, draw_batch(
                popularity_e, n_tokens=n_tokens, tokens_per_rank=tokens_per_mb,
                top_k=m.top_k, rng=rng, unit_size=unit_size, max_units=max_units,
                capacity=capacity, placement=placement, seq_len=p.seq_len), gpus_per_domain)
            yield draw, mb, counts
