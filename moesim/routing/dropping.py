"""Capacity dropping for the simulator, through the torch routing layers.

There is one implementation of token dropping and of its priority rule, in
``moesim.traces.capacity`` (``drop_priority``: ``probs`` keeps the highest gate
weights, ``position`` the earliest tokens); this module only converts numpy arrays to
torch and back. torch is imported here, when a capacity factor is set, never at module
load of the core.
"""

from __future__ import annotations

import numpy as np


def keep_within_capacity(
    ids_tk: np.ndarray,
    weights_tk: np.ndarray | None,
    *,
    drop_policy: str,
    pos_t: np.ndarray,
    experts_per_device: int,
    n_devices: int,
    capacity_factor: float,
    seq_id_t: np.ndarray | None = None,
    never_drop_fraction: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """``kept_tk`` [T, K]: which assignments survive device-level dropping.

    ``weights_tk`` [T, K] are the gate weights the ``probs`` policy ranks by (None for
    ``position``), ``pos_t`` [T] the token positions the ``position`` policy ranks by.
    Slots already ``-1`` stay dropped. A share ``never_drop_fraction`` of the sequences
    in ``seq_id_t`` (chosen with ``seed``) is protected.
    """
    import torch

    from moesim.traces.capacity import (
        drop_by_device_capacity,
        drop_priority,
        protected_sequences,
    )

    ids = torch.from_numpy(np.ascontiguousarray(ids_tk, dtype=np.int64))
    if weights_tk is None:
        weights_tk = np.zeros(ids_tk.shape, dtype=np.float32)
    weights = torch.from_numpy(np.ascontiguousarray(weights_tk, dtype=np.float32))
    priority = drop_priority(weights, policy=drop_policy,
                             pos_t=torch.from_numpy(np.asarray(pos_t, dtype=np.int64)))
    protected = None
    if never_drop_fraction > 0 and seq_id_t is not None:
        generator = torch.Generator().manual_seed(seed)
        protected = protected_sequences(torch.from_numpy(seq_id_t.astype(np.int64)),
                                        fraction=never_drop_fraction, generator=generator)
    kept_ids = drop_by_device_capacity(
        ids, priority, experts_per_device=experts_per_device, n_devices=n_devices,
        capacity_factor=capacity_factor, protected_t=protected,
    )
    return (kept_ids >= 0).numpy()
