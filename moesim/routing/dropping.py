"""Capacity dropping for the simulator, through the torch routing layers.

There is one implementation of token dropping and of its priority rule, in
``moesim.traces.capacity`` (``drop_priority``: ``probs`` keeps the highest gate
weights, ``position`` the earliest tokens); this module only converts numpy arrays to
torch and back. torch is imported here, when a capacity factor is set, never at module
load of the core.

Two scopes (docs/routing.md sections 2.5 and 4.5):

* ``device`` (DeepSeek-V2): every GPU of the EP group takes at most
  ``ceil(cf x assignments / ep)`` of the micro-batch's assignments, on the slots it holds;
* ``expert`` (Megatron, Switch): every source rank's router keeps at most
  ``ceil(tokens x K / E x cf)`` of its own assignments per logical expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, kw_only=True)
class Capacity:
    """A capacity limit and how it drops (``RoutingPolicy``'s capacity fields)."""

    factor: float
    drop_policy: str  # probs | position
    scope: str  # device | expert
    never_drop_fraction: float = 0.0


def capacity_of(scenario) -> Capacity | None:
    """The scenario's capacity limit (None: no capacity factor, nothing drops)."""
    r = scenario.routing
    if r.capacity_factor is None:
        return None
    return Capacity(factor=r.capacity_factor, drop_policy=r.drop_policy,
                    scope=r.capacity_scope, never_drop_fraction=r.never_drop_fraction)


def keep_within_capacity(
    ids_tk: np.ndarray,
    weights_tk: np.ndarray | None,
    *,
    capacity: Capacity,
    pos_t: np.ndarray,
    bins: int,
    per_bin: int = 1,
    tokens_per_rank: int,
    seq_id_t: np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    """``kept_tk`` [T, K]: which assignments survive ``capacity``.

    ``ids_tk`` are physical slots, ``per_bin`` on each of ``bins`` GPUs (``device``
    scope), or logical experts, ``bins`` of them (``expert`` scope); token ``t`` lives on
    rank ``t // tokens_per_rank``. ``weights_tk`` are the gate
    weights the ``probs`` policy ranks by (None for ``position``), ``pos_t`` the token
    positions the ``position`` policy ranks by. Slots already ``-1`` stay dropped. A
    share ``never_drop_fraction`` of the sequences in ``seq_id_t`` (chosen with
    ``seed``) is protected.
    """
    import torch

    from moesim.traces.capacity import (
        drop_by_device_capacity,
        drop_by_expert_capacity,
        drop_priority,
        expert_capacity,
        protected_sequences,
    )

    ids = torch.from_numpy(np.ascontiguousarray(ids_tk, dtype=np.int64))
    if weights_tk is None:
        weights_tk = np.zeros(ids_tk.shape, dtype=np.float32)
    weights = torch.from_numpy(np.ascontiguousarray(weights_tk, dtype=np.float32))
    priority = drop_priority(weights, policy=capacity.drop_policy,
                             pos_t=torch.from_numpy(np.asarray(pos_t, dtype=np.int64)))
    protected = None
    if capacity.never_drop_fraction > 0 and seq_id_t is not None:
        generator = torch.Generator().manual_seed(seed)
        protected = protected_sequences(torch.from_numpy(seq_id_t.astype(np.int64)),
                                        fraction=capacity.never_drop_fraction,
                                        generator=generator)
    if capacity.scope == "device":
        kept_ids = drop_by_device_capacity(
            ids, priority, experts_per_device=per_bin, n_devices=bins,
            capacity_factor=capacity.factor, protected_t=protected)
        return (kept_ids >= 0).numpy()
    # Expert scope: each source rank's router drops on its own.
    kept = np.empty(ids_tk.shape, dtype=bool)
    for start in range(0, ids_tk.shape[0], tokens_per_rank):
        rows = slice(start, start + tokens_per_rank)
        limit = expert_capacity(ids_tk[rows].shape[0], top_k=ids_tk.shape[1], num_experts=bins,
                                capacity_factor=capacity.factor)
        kept_ids = drop_by_expert_capacity(
            ids[rows], priority[rows], capacity=limit, policy="probs",
            protected_t=None if protected is None else protected[rows])
        kept[rows] = (kept_ids >= 0).numpy()
    return kept


def routed_batch(ids_tk: np.ndarray, weights_tk: np.ndarray | None, *, tokens_per_rank: int,
                 experts: int, placement=None, capacity: Capacity | None = None,
                 seq_id_t: np.ndarray | None = None, seed: int = 0,
                 affinity_tk: np.ndarray | None = None):
    """The routed micro-batch of the logical picks ``ids_tk`` [T, K] of ``experts``
    experts: on the slots of ``placement`` (None: contiguous), within ``capacity``.

    ``weights_tk`` rank the ``probs`` drops; ``affinity_tk`` are the gate weights of a
    real gate (None for synthetic picks), counted when assignments drop. An expert-scope
    limit drops at the routers, on logical experts, before the tokens travel; a
    device-scope limit on the slots each GPU holds.
    """
    from moesim.routing.batch import RoutedBatch

    kept_tk = None  # no capacity: every id is kept
    if capacity is not None:
        common = dict(capacity=capacity, pos_t=np.arange(ids_tk.shape[0]) % tokens_per_rank,
                      tokens_per_rank=tokens_per_rank, seq_id_t=seq_id_t, seed=seed)
    if capacity is not None and capacity.scope == "expert":
        kept_tk = keep_within_capacity(ids_tk, weights_tk, bins=experts, **common)
    phy2log_s = None
    if placement is not None and not placement.identity:
        ids_tk = placement.slots_of(ids_tk, tokens_per_rank=tokens_per_rank)
        phy2log_s = placement.phy2log_s
    if capacity is not None and capacity.scope == "device":
        assert placement is not None, "device-scope capacity needs the placement's GPUs"
        kept_tk = keep_within_capacity(ids_tk, weights_tk, bins=placement.ep,
                                       per_bin=placement.slots_per_gpu, **common)
    return RoutedBatch(ids_tk=ids_tk, kept_tk=kept_tk, tokens_per_rank=tokens_per_rank,
                       phy2log_s=phy2log_s, affinity_tk=affinity_tk)
