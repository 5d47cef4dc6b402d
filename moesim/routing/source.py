"""Where a simulation's routing comes from: synthetic draws or a captured trace.

A source hands out routing per *key*: MoE layers with the same key route alike, so
their costs are computed once. ``key_counts(key)[group][microbatch]`` are the counts
of one routed micro-batch of one EP group.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from moesim.config.scenario import Scenario
from moesim.routing.batch import BatchCounts, count_batch
from moesim.routing.synthetic_layers import draw_of, layer_draws, synthetic_batches


class RoutingSource(ABC):
    n_keys: int

    @abstractmethod
    def key_of(self, moe_layer: int) -> int:
        """Key of MoE layer ``moe_layer`` (0 = the first MoE layer)."""

    @abstractmethod
    def key_counts(self, key: int) -> list[list[BatchCounts]]:
        """Counts per EP group and micro-batch for layers with this key."""

    def keys_per_layer(self, moe_layers: int) -> list[int]:
        return [self.key_of(li) for li in range(moe_layers)]


def _count(scenario: Scenario, batch, gpus_per_node: int) -> BatchCounts:
    return count_batch(batch, n_experts=scenario.model.routed_experts,
                       ep=scenario.parallel.ep, gpus_per_node=gpus_per_node)


class SyntheticSource(RoutingSource):
    """``S`` independent layer draws; EP group ``g`` of layer ``l`` uses draw
    ``(l + g) mod S``, so the key is ``l mod S``."""

    def __init__(self, scenario: Scenario, *, gpus_per_domain: int, rng: np.random.Generator):
        self.n_keys = layer_draws(scenario)
        self.groups = scenario.parallel.ep_groups
        per_node = min(scenario.parallel.ep, gpus_per_domain)
        self.draws: list[list[BatchCounts | None]] = [
            [None] * scenario.parallel.micro_batches for _ in range(self.n_keys)
        ]
        for draw, mb, batch in synthetic_batches(scenario, gpus_per_domain=gpus_per_domain,
                                                 rng=rng):
            self.draws[draw][mb] = _count(scenario, batch, per_node)

    def key_of(self, moe_layer: int) -> int:
        return moe_layer % self.n_keys

    def key_counts(self, key: int) -> list[list[BatchCounts]]:
        return [self.draws[draw_of(key, g, self.n_keys)] for g in range(self.groups)]
