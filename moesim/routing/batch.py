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
    capacity dropping. An id of ``-1`` (never kept) is a slot a replayed trace recorded
    as already dropped. ``phy2log_s`` [S] names each slot's logical expert (None: slot
    ``s`` holds expert ``s``).
    """

    ids_tk: np.ndarray
    kept_tk: np.ndarray
    tokens_per_rank: int
    phy2log_s: np.ndarray | None = None
    affinity_tk: np.ndarray | None = None  # a real gate's weights (None: synthetic picks)
    score_mass: tuple[float, float] | None = None  # (chosen, unrestricted top-K) affinity

    def __post_init__(self) -> None:
        assert self.ids_tk.shape == self.kept_tk.shape
        assert self.ids_tk.shape[0] % self.tokens_per_rank == 0
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


def _first_seen(units_kt: np.ndarray, skip: int) -> np.ndarray:
    """Slot-major units with repeats within a token (column) replaced by ``skip``."""
    out_kt = units_kt.copy()
    for k in range(1, units_kt.shape[0]):
        repeat = np.zeros(units_kt.shape[1], dtype=bool)
        for earlier in range(k):
            repeat |= units_kt[earlier] == units_kt[k]
        out_kt[k][repeat] = skip
    return out_kt


def _count_by_source(unit_kt: np.ndarray, n_src: int, n_units: int) -> np.ndarray:
    """[n_src, n_units] counts of slot-major ``unit_kt`` entries per source (``n_units``
    marks entries to skip).

    Tokens are stored source by source, so one small bincount per source and slot
    beats one big bincount over computed (source, unit) keys.
    """
    blocks = unit_kt.reshape(unit_kt.shape[0], n_src, -1)
    counts = np.zeros((n_src, n_units + 1), dtype=np.int64)
    for s in range(n_src):
        for k in range(blocks.shape[0]):
            counts[s] += np.bincount(blocks[k, s], minlength=n_units + 1)
    return counts[:, :n_units]


def count_batch(
    batch: RoutedBatch, *, n_experts: int, ep: int, gpus_per_node: int
) -> BatchCounts:
    """Count assignments and per-destination reach of ``batch`` (see BatchCounts);
    ``n_experts`` is the number of slots its ids index (the experts, without replicas)."""
    # Slot-major copies: every per-slot operation then runs over contiguous memory.
    ids_kt = np.ascontiguousarray(batch.ids_tk.T)
    kept_kt = np.ascontiguousarray(batch.kept_tk.T)
    experts_per_gpu = n_experts // ep
    n_nodes = ep // gpus_per_node

    all_kept = bool(kept_kt.all())
    if all_kept:
        kept_e = _count_by_source(ids_kt, ep, n_experts).sum(axis=0)
        dropped_e = np.zeros(n_experts, dtype=np.int64)
    else:
        kept_e = np.bincount(ids_kt[kept_kt], minlength=n_experts)
        dropped_e = expert_loads(ids_kt[~kept_kt], n_experts)

    gpu_kt = ids_kt // experts_per_gpu
    if not all_kept:
        gpu_kt[~kept_kt] = ep  # dropped: the skipped bin
    pairs_sg = _count_by_source(gpu_kt, ep, ep)
    if experts_per_gpu == 1:  # a token's experts are distinct, so are its GPUs
        reach_gpu_sg = pairs_sg
    else:
        reach_gpu_sg = _count_by_source(_first_seen(gpu_kt, ep), ep, ep)
    if n_nodes == 1:
        reach_node_sn = kept_kt.any(axis=0).reshape(ep, -1).sum(axis=1)[:, None]
    else:
        # The dropped marker ep maps to node n_nodes, the skipped bin.
        node_kt = gpu_kt // gpus_per_node
        reach_node_sn = _count_by_source(_first_seen(node_kt, n_nodes), ep, n_nodes)
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
        weight_dropped = float(batch.affinity_tk[picked & ~batch.kept_tk].sum())
    return BatchCounts(
        weight_routed=weight_routed,
        weight_dropped=weight_dropped,
        score_mass=batch.score_mass,
        routed=int(ids_kt.size),
        kept_e=kept_e,
        dropped_e=dropped_e,
        kept_s=kept_s,
        dropped_unknown=int((ids_kt < 0).sum()),
        pairs_sg=pairs_sg,
        reach_gpu_sg=reach_gpu_sg,
        reach_node_sn=reach_node_sn,
    )
