"""Device-level token dropping under a capacity factor (DeepSeek-V2 style).

Within one EP group and one micro-batch, GPU ``d`` takes at most
``B = ceil(cf * A / D)`` of the ``A`` (token, expert) assignments routed in the
group; the surplus is dropped before dispatch, so dropped assignments neither travel
nor compute (``../shared/ROUTING.md`` section 2.5). Survivors keep their weights.
"""

from __future__ import annotations

import math

import numpy as np


def device_budget(n_assignments: int, n_devices: int, capacity_factor: float) -> int:
    """Assignments one device may take: ``ceil(cf * assignments / devices)``."""
    return math.ceil(capacity_factor * n_assignments / n_devices)


def apply_capacity(
    ids_tk: np.ndarray,
    *,
    experts_per_device: int,
    n_devices: int,
    capacity_factor: float,
    priority_tk: np.ndarray,
) -> np.ndarray:
    """Mask ``kept_tk`` [T, K] of the assignments each device keeps.

    On every device the assignments with the highest ``priority_tk`` survive (ties:
    lower token index first). ``probs`` dropping passes the gate weights as priority;
    ``position`` dropping passes minus the token's position in its sequence.
    """
    n_tokens, top_k = ids_tk.shape
    budget = device_budget(n_tokens * top_k, n_devices, capacity_factor)
    device_a = (ids_tk // experts_per_device).ravel()
    load_d = np.bincount(device_a, minlength=n_devices)
    kept_a = np.ones(device_a.shape[0], dtype=bool)
    if load_d.max() <= budget:
        return kept_a.reshape(n_tokens, top_k)
    # Sort by device, then priority (descending), then assignment index (token order).
    order = np.lexsort((np.arange(device_a.shape[0]), -priority_tk.ravel(), device_a))
    first_of_d = np.concatenate(([0], np.cumsum(load_d)[:-1]))
    rank_in_device = np.arange(order.shape[0]) - first_of_d[device_a[order]]
    kept_a[order[rank_in_device >= budget]] = False
    return kept_a.reshape(n_tokens, top_k)
