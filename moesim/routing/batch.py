"""A routed micro-batch of one EP group and the counts that traffic and compute need."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, kw_only=True)
class RoutedBatch:
    """Routing of one micro-batch in one EP group.

    Token ``t`` lives on rank ``t // tokens_per_rank`` of the group; ``ids_tk`` are the
    physical expert slots it reaches (the experts themselves under contiguous placement;
    slot ``s`` on GPU ``s // (S / ep)``) and ``kept_tk`` says which assignments survived
    capacity dropping (None: no capacity applied, every id is kept). An id of ``-1``
    (never kept) is a slot a replayed trace recorded as already dropped. ``phy2log_s``
    [S] names each slot's logical expert (None: slot ``s`` holds expert ``s``).
    """

    ids_tk: np.ndarray
    kept_tk: np.ndarray | None
    tokens_per_rank: int
    phy2log_s: np.ndarray | None = None
    affinity_tk: np.ndarray | None = None  # a real gate's weights (None: synthetic picks)
    score_mass: tuple[float, float] | None = None  # (chosen, unrestricted top-K) affinity

    def __post_init__(self) -> None:
        assert self.ids_tk.shape[0] % self.tokens_per_rank == 0
        if self.kept_tk is not None:
            assert self.ids_tk.shape == self.kept_tk.shape
            assert not self.kept_tk[self.ids_tk < 0].any(), "a kept slot without an expert"


@dataclass(frozen=True, kw_only=True)
class BatchCounts:
    """Everything downstream needs from a routed batch, in an EP group's local ranks.

    ``reach_*`` count tokens once per destination (what DeepEP normal and NCCL send);
    ``pairs_sg`` counts (token, expert) assignments (what DeepEP low-latency sends).
    """

    routed: int  # (token, expert) assignments made by the gate, kept or not
    kept_e: np.ndarray  # [E] assignments each logical expert computes
    dropped_e: np.ndarray  # [E] assignments dropped at each logical expert
    kept_s: np.ndarray  # [S] assignments each physical slot computes (S / ep per GPU)
    dropped_unknown: int  # slots dropped before a replayed trace was recorded (id -1)
    # A real gate's weights of the assignments made and of those dropped (None: synthetic
    # picks carry no gate weights), and the affinity the picks kept of the unrestricted
    # top-K's (chosen, free; None without scores).
    weight_routed: float | None = None
    weight_dropped: float | None = None
    score_mass: tuple[float, float] | None = None
    pairs_sg: np.ndarray  # [ep, ep] kept assignments from rank s to rank g
    reach_gpu_sg: np.ndarray  # [ep, ep] tokens of rank s with >= 1 kept expert on g
    reach_node_sn: np.ndarray  # [ep, nodes] tokens of rank s with >= 1 kept expert on node n


def expert_loads(ids: np.ndarray, n_experts: int) -> np.ndarray:
    """[n_experts] int64 assignments per expert of ``ids`` (any shape; -1, a slot dropped
    before the trace was recorded, counts nowhere)."""
    return np.bincount(ids[ids >= 0], minlength=n_experts)


def count_batch(
    batch: RoutedBatch, *, n_experts: int, ep: int, gpus_per_node: int
) -> BatchCounts:
    """Count assignments and per-destination reach of ``batch`` (see BatchCounts);
    ``n_experts`` is the number of slots its ids index (the experts, without replicas)."""
    from moesim.routing.kernels import count_by_source

    n_tokens = batch.ids_tk.shape[0]
    assert n_tokens % ep == 0 and n_experts % ep == 0 and ep % gpus_per_node == 0
    # One id type per compiled loop: int16 (synthetic draws) or int64 (anything else).
    ids_tk = batch.ids_tk
    if ids_tk.dtype != np.int16 or not ids_tk.dtype.isnative:
        ids_tk = ids_tk.astype(np.int64, copy=False)  # no copy of native int64 ids
    ids_tk = np.ascontiguousarray(ids_tk)
    # The compiled loop indexes with the ids unchecked: none may lie past the slots.
    assert not ids_tk.size or ids_tk.max() < n_experts, "an id past the slots"
    gpu_s = np.arange(n_experts) // (n_experts // ep)
    node_g = np.arange(ep) // gpus_per_node
    kept_tk = (np.zeros((0, 0), dtype=bool)  # the loop's "every id kept"
               if batch.kept_tk is None or batch.kept_tk.all()
               else np.ascontiguousarray(batch.kept_tk))
    kept_ss, dropped_ss, pairs_sg, reach_gpu_sg, reach_node_sn, unknown_s = count_by_source(
        ids_tk, kept_tk, n_tokens // ep, gpu_s, node_g)
    kept_e, dropped_e = kept_ss.sum(axis=0), dropped_ss.sum(axis=0)
    kept_s = kept_e
    if batch.phy2log_s is not None:  # physical slots -> their logical experts
        experts = int(batch.phy2log_s.max()) + 1
        kept_e = np.bincount(batch.phy2log_s, weights=kept_s, minlength=experts).astype(np.int64)
        dropped_e = np.bincount(batch.phy2log_s, weights=dropped_e,
                                minlength=experts).astype(np.int64)
    weight_routed = weight_dropped = None
    if batch.affinity_tk is not None:
        picked = batch.ids_tk >= 0
        weight_routed = float(batch.affinity_tk[picked].sum())
        weight_dropped = (0.0 if batch.kept_tk is None
                          else float(batch.affinity_tk[picked & ~batch.kept_tk].sum()))
    return BatchCounts(
        weight_routed=weight_routed,
        weight_dropped=weight_dropped,
        score_mass=batch.score_mass,
        routed=int(batch.ids_tk.size),
        kept_e=kept_e,
        dropped_e=dropped_e,
        kept_s=kept_s,
        dropped_unknown=int(unknown_s.sum()),
        pairs_sg=pairs_sg,
        reach_gpu_sg=reach_gpu_sg,
        reach_node_sn=reach_node_sn,
    )


def count_in_scenario(scenario, batch: RoutedBatch, gpus_per_domain: int) -> BatchCounts:
    """:func:`count_batch` of one routed batch of an EP group of ``scenario`` (a
    :class:`~moesim.config.scenario.Scenario`): its experts with their replicas, its
    ranks in nodes of the domain's GPUs (a group smaller than the domain is one node)."""
    p = scenario.parallel
    slots = scenario.model.routed_experts + scenario.placement.redundant_experts
    return count_batch(batch, n_experts=slots, ep=p.ep, gpus_per_node=min(p.ep, gpus_per_domain))
