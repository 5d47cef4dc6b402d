"""Token dropping under capacity: per device (DeepSeek-V2) and per expert (Switch/GShard).

A dropped (token, expert) assignment becomes id ``-1``; the token's residual path
carries it (docs/routing.md sections 2.5, 4.5, 5, 8.5). Both policies rank
the assignments of one bin (device or expert) the same way: protected tokens first,
then by priority (descending), then by token index and slot (ascending). A stable
sort on each key, least significant first, gives that order without ties.

Shapes: ``T`` tokens, ``K`` slots per token, ``A = T*K`` flattened assignments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from moesim.errors import InputError

DROP_POLICIES = ("probs", "position")


def expert_capacity(n_tokens: int, *, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Assignments one expert may take: ``ceil(T * K / E * cf)`` (Megatron, Switch, GShard)."""
    if capacity_factor <= 0:
        raise InputError(
            f"capacity_factor={capacity_factor}", field="capacity_factor", allowed="> 0"
        )
    return math.ceil(n_tokens * top_k / num_experts * capacity_factor)


def device_budget(n_assignments: int, *, n_devices: int, capacity_factor: float) -> int:
    """Assignments one device may take: ``ceil(cf * A / D)``.

    The simulator drops through this module too (``moesim.routing.dropping``), so the
    torch layers and the simulator drop the same assignments.
    """
    if capacity_factor <= 0:
        raise InputError(
            f"capacity_factor={capacity_factor}", field="capacity_factor", allowed="> 0"
        )
    return math.ceil(capacity_factor * n_assignments / n_devices)


def positions_in_sequence(seq_id_t: torch.Tensor) -> torch.Tensor:
    """Position ``pos_t`` int64 [T] of each token among the earlier tokens of its sequence."""
    n_tokens = seq_id_t.shape[0]
    order_t = torch.sort(seq_id_t, stable=True).indices
    sorted_ids_t = seq_id_t[order_t]
    starts_t = torch.ones(n_tokens, dtype=torch.bool, device=seq_id_t.device)
    starts_t[1:] = sorted_ids_t[1:] != sorted_ids_t[:-1]
    index_t = torch.arange(n_tokens, device=seq_id_t.device)
    first_t = torch.cummax(torch.where(starts_t, index_t, 0), dim=0).values
    pos_t = torch.empty_like(index_t)
    pos_t[order_t] = index_t - first_t
    return pos_t


def drop_priority(
    weights_tk: torch.Tensor,
    *,
    policy: str,
    pos_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """Priority ``priority_tk`` float [T, K] for dropping: the higher, the later dropped.

    ``"probs"``: the assignment's gate weight (Megatron's routing probs; for the
    DeepSeek-V2 gate the affinity times the route scale, so the order of docs/routing.md
    2.5). ``"position"``: minus the token's position in its sequence (``pos_t``;
    token index when None), so the latest positions go first, across all sequences.
    """
    if policy == "probs":
        return weights_tk.detach().float()
    if policy == "position":
        if pos_t is None:
            pos_t = torch.arange(weights_tk.shape[0], device=weights_tk.device)
        return (-pos_t.float())[:, None].expand(weights_tk.shape)
    raise InputError(
        f"unknown drop policy {policy!r}", field="drop_policy", allowed="probs, position"
    )


def rank_in_bins(bin_a: torch.Tensor, keys_a: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rank ``rank_a`` int64 [A] of each assignment inside its bin.

    Order inside a bin: ``keys_a`` descending, most significant first, then the
    assignment index ascending. Bins are non-negative ints.
    """
    n_assign = bin_a.shape[0]
    order_a = torch.arange(n_assign, device=bin_a.device)
    for key_a in reversed(keys_a):
        order_a = order_a[torch.sort(key_a[order_a], descending=True, stable=True).indices]
    order_a = order_a[torch.sort(bin_a[order_a], stable=True).indices]
    sorted_bins_a = bin_a[order_a]
    counts_b = torch.bincount(sorted_bins_a, minlength=1)
    first_b = torch.cumsum(counts_b, dim=0) - counts_b
    rank_a = torch.empty_like(order_a)
    rank_a[order_a] = torch.arange(n_assign, device=bin_a.device) - first_b[sorted_bins_a]
    return rank_a


def _protected_a(protected_t: torch.Tensor | None, ids_tk: torch.Tensor) -> torch.Tensor:
    """Flattened [A] protection flag of each assignment (its token's)."""
    if protected_t is None:
        return torch.zeros(ids_tk.numel(), dtype=torch.bool, device=ids_tk.device)
    if protected_t.shape != ids_tk.shape[:1]:
        raise InputError(
            f"protected_t has shape {tuple(protected_t.shape)}, ids {tuple(ids_tk.shape)}",
            field="protected_t",
            allowed="one flag per token",
        )
    return protected_t.bool()[:, None].expand(ids_tk.shape).reshape(-1)


def _keep_ranked(
    ids_tk: torch.Tensor,
    bin_a: torch.Tensor,
    keys_a: Sequence[torch.Tensor],
    budget: int,
    protected_a: torch.Tensor,
) -> torch.Tensor:
    """``ids_tk`` with each bin's assignments beyond ``budget`` (protected ones aside) set -1."""
    valid_a = ids_tk.reshape(-1) >= 0
    # Protected assignments rank first, so they fill the budget before any other one.
    rank_a = rank_in_bins(
        bin_a[valid_a], [protected_a[valid_a].float(), *(k[valid_a] for k in keys_a)]
    )
    kept_a = torch.zeros_like(valid_a)
    kept_a[valid_a] = (rank_a < budget) | protected_a[valid_a]
    return ids_tk.masked_fill(~kept_a.reshape(ids_tk.shape), -1)


def drop_by_device_capacity(
    ids_tk: torch.Tensor,
    priority_tk: torch.Tensor,
    *,
    experts_per_device: int,
    n_devices: int,
    capacity_factor: float = 1.0,
    protected_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """DeepSeek-V2 device-level dropping (docs/routing.md section 2.5): kept ``ids_tk`` [T, K].

    Experts are laid out contiguously, ``device = id // experts_per_device``. Each
    device keeps at most ``ceil(cf * A / D)`` of the ``A`` routed assignments:
    protected tokens' assignments always (the device may overflow), then the others
    by ``priority_tk`` descending, ties to the lower token index. Dropped slots
    become ``-1``; nothing is renormalised.
    """
    if experts_per_device < 1 or n_devices < 1:
        raise InputError(
            f"experts_per_device={experts_per_device}, n_devices={n_devices}",
            field="experts_per_device" if experts_per_device < 1 else "n_devices",
            allowed=">= 1",
        )
    if bool((ids_tk >= experts_per_device * n_devices).any()):
        raise InputError(
            f"expert id beyond the {experts_per_device * n_devices} experts on {n_devices} devices",
            field="ids_tk",
            allowed=f"-1..{experts_per_device * n_devices - 1}",
        )
    n_routed = int((ids_tk >= 0).sum())
    budget = device_budget(n_routed, n_devices=n_devices, capacity_factor=capacity_factor)
    device_a = ids_tk.reshape(-1).clamp(min=0) // experts_per_device
    return _keep_ranked(
        ids_tk,
        device_a,
        [priority_tk.reshape(-1).float()],
        budget,
        _protected_a(protected_t, ids_tk),
    )


def drop_by_expert_capacity(
    ids_tk: torch.Tensor,
    priority_tk: torch.Tensor,
    *,
    capacity: int,
    policy: str = "probs",
    protected_t: torch.Tensor | None = None,
    slot_major: bool = False,
) -> torch.Tensor:
    """Per-expert capacity (Switch, GShard, Megatron): kept ``ids_tk`` [T, K].

    Each expert keeps at most ``capacity`` assignments: ``"probs"`` the highest
    ``priority_tk`` (ties: lower token index), ``"position"`` the earliest tokens.
    ``slot_major`` fills every expert with first choices before second choices
    (GShard). Protected tokens are never dropped and count against the capacity.
    """
    if policy not in DROP_POLICIES:
        raise InputError(
            f"unknown drop policy {policy!r}", field="drop_policy", allowed="probs, position"
        )
    if capacity < 0:
        raise InputError(f"capacity={capacity}", field="capacity", allowed=">= 0")
    keys_a = []
    if slot_major:
        slot_tk = torch.arange(ids_tk.shape[1], device=ids_tk.device).expand(ids_tk.shape)
        keys_a.append(-slot_tk.reshape(-1).float())
    if policy == "probs":
        keys_a.append(priority_tk.reshape(-1).float())
    return _keep_ranked(
        ids_tk,
        ids_tk.reshape(-1).clamp(min=0),
        keys_a,
        capacity,
        _protected_a(protected_t, ids_tk),
    )


def protected_sequences(
    seq_id_t: torch.Tensor, *, fraction: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Tokens ``protected_t`` bool [T] whose sequence is never dropped.

    Each distinct sequence id is protected with probability ``fraction`` (a seeded
    Bernoulli per sequence; DeepSeek-V2 kept ~10% of training sequences whole). Draws
    go to the distinct ids in ascending order, so the same generator state and the
    same set of ids protect the same sequences in every layer.
    """
    if not 0.0 <= fraction <= 1.0:
        raise InputError(f"fraction={fraction}", field="never_drop_fraction", allowed="0..1")
    unique_s, inverse_t = torch.unique(seq_id_t, sorted=True, return_inverse=True)
    draws_s = torch.rand(unique_s.shape[0], generator=generator, device=seq_id_t.device)
    return (draws_s < fraction)[inverse_t]
