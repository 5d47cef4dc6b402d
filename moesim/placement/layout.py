"""One layer's expert placement in an EP group, and the physical slot each routed token
reaches through it.

A placement of ``S`` slots puts ``S / ep`` on each GPU (slot ``s`` on GPU
``s // (S / ep)``) and names the logical expert each slot holds (``phy2log_s``).
Routing picks logical experts; :meth:`LayerPlacement.slots` turns each pick into a
slot, choosing among an expert's replicas by the scenario's ``replica_split``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from moesim.placement.eplb import Rebalanced, from_phy2log, rebalance_layer


@dataclass(frozen=True, kw_only=True, eq=False)
class LayerPlacement:
    phy2log_s: np.ndarray  # [S] logical expert of each slot
    ep: int
    gpus_per_node: int
    replica_split: str = "source-rank"  # source-rank | even

    def __post_init__(self) -> None:
        assert self.phy2log_s.shape[0] % self.ep == 0

    @property
    def slots(self) -> int:
        return self.phy2log_s.shape[0]

    @property
    def slots_per_gpu(self) -> int:
        return self.slots // self.ep

    @cached_property
    def identity(self) -> bool:
        """Contiguous and without replicas: slot ``e`` holds expert ``e``."""
        return bool(np.array_equal(self.phy2log_s, np.arange(self.slots)))

    @cached_property
    def experts(self) -> int:
        return int(self.phy2log_s.max()) + 1

    @cached_property
    def _maps(self) -> Rebalanced:
        return from_phy2log(self.phy2log_s[None], experts=self.experts)

    @property
    def replicas_e(self) -> np.ndarray:
        return self._maps.replicas_le[0]

    @property
    def _log2phy_ex(self) -> np.ndarray:
        return self._maps.log2phy_lex[0]

    @cached_property
    def _by_rank_re(self) -> np.ndarray:
        """[ep, E] the slot each source rank sends an expert's tokens to: a replica on its
        own GPU, else on its own node, else the replicas in turn by rank."""
        log2phy = self._log2phy_ex
        choice_re = np.repeat(log2phy[:, :1].T, self.ep, axis=0)
        ranks = np.arange(self.ep)
        for e in np.flatnonzero(self.replicas_e > 1):
            slots = log2phy[e, :self.replicas_e[e]]
            gpu = slots // self.slots_per_gpu
            for r in ranks:
                own = slots[gpu == r]
                near = slots[gpu // self.gpus_per_node == r // self.gpus_per_node]
                pool = own if own.size else near if near.size else slots
                choice_re[r, e] = pool[r % pool.size]
        return choice_re

    def slots_of(self, ids_tk: np.ndarray, *, tokens_per_rank: int) -> np.ndarray:
        """Slot ``[T, K]`` of every logical pick ``ids_tk`` (``-1`` stays ``-1``); token
        ``t`` lives on rank ``t // tokens_per_rank``."""
        if self.identity:
            return ids_tk
        picked = ids_tk >= 0
        e_tk = np.where(picked, ids_tk, 0)
        if self.replica_split == "even":
            turn_t = np.arange(ids_tk.shape[0])
            replica_tk = turn_t[:, None] % self.replicas_e[e_tk]
            slot_tk = self._log2phy_ex[e_tk, replica_tk]
        else:
            rank_t = np.arange(ids_tk.shape[0]) // tokens_per_rank % self.ep
            slot_tk = self._by_rank_re[rank_t[:, None], e_tk]
        return np.where(picked, slot_tk, -1)


def contiguous(experts: int, *, ep: int, gpus_per_node: int) -> LayerPlacement:
    return LayerPlacement(phy2log_s=np.arange(experts), ep=ep, gpus_per_node=gpus_per_node)


def rebalanced(loads_e: np.ndarray, *, slots: int, ep: int, gpus_per_node: int, groups: int,
               hierarchical: bool, replica_split: str) -> LayerPlacement:
    """The EPLB placement of one layer with these expert loads."""
    nodes = ep // gpus_per_node
    phy2log_s = rebalance_layer(np.asarray(loads_e, dtype=np.float64), slots=slots,
                                groups=groups if hierarchical else 1,
                                nodes=nodes if hierarchical else 1, gpus=ep)
    return LayerPlacement(phy2log_s=phy2log_s, ep=ep, gpus_per_node=gpus_per_node,
                          replica_split=replica_split)


def scenario_placement(scenario, loads_e: np.ndarray | None, *,
                       gpus_per_domain: int) -> LayerPlacement:
    """The placement ``scenario.placement`` asks for, from one layer's expert loads (unused
    by the contiguous policy)."""
    from moesim.config.feasibility import placement_groups

    p, pl = scenario.parallel, scenario.placement
    per_node = min(p.ep, gpus_per_domain)
    experts = scenario.model.routed_experts
    if not pl.rebalanced:
        return contiguous(experts, ep=p.ep, gpus_per_node=per_node)
    groups, _ = placement_groups(scenario, gpus_per_domain)
    return rebalanced(loads_e, slots=experts + pl.redundant_experts, ep=p.ep,
                      gpus_per_node=per_node, groups=groups,
                      hierarchical=pl.policy == "eplb-hierarchical",
                      replica_split=pl.replica_split)
