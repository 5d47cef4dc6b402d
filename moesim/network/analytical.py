"""Analytical network model: an exchange takes its latency plus the time of its most
loaded link at that link's achievable bandwidth.

All stages of a kernel (e.g. DeepEP's RDMA send and NVLink forward) are pipelined,
so they overlap and only the busiest link counts; latency adds once per stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.comm.traffic import LinkLoads


@dataclass(frozen=True, kw_only=True)
class ExchangeTime:
    seconds: float
    latency_s: float
    bottleneck: str  # link class of the most loaded link: nvlink | nic | uplink | none


def _seconds(nbytes: np.ndarray, bandwidth) -> np.ndarray:
    if np.ndim(bandwidth) == 0 and bandwidth > 0:  # one rate for every link: most calls
        return nbytes / bandwidth
    bandwidth = np.broadcast_to(np.asarray(bandwidth, dtype=float), nbytes.shape)
    assert not (nbytes[bandwidth <= 0] > 0).any(), "traffic routed over a missing link"
    return np.divide(nbytes, bandwidth, out=np.zeros_like(nbytes), where=bandwidth > 0)


def link_seconds(loads_bytes: LinkLoads, topology) -> dict[str, np.ndarray]:
    """Busy time of every directed link, grouped by class (arrays as in LinkLoads)."""
    return {
        "nvl_out": _seconds(loads_bytes.nvl_out, topology.nvlink_bw),
        "nvl_in": _seconds(loads_bytes.nvl_in, topology.nvlink_bw),
        "nic_out": _seconds(loads_bytes.nic_out, topology.nic_bw),
        "nic_in": _seconds(loads_bytes.nic_in, topology.nic_bw),
        "up": _seconds(loads_bytes.up, topology.leaf_uplink_bw),
        "down": _seconds(loads_bytes.down, topology.leaf_uplink_bw),
    }


_CLASS = {"nvl_out": "nvlink", "nvl_in": "nvlink", "nic_out": "nic", "nic_in": "nic",
          "up": "uplink", "down": "uplink"}


def exchange_time(
    loads_bytes: LinkLoads, topology, *, overhead_s: float, own: LinkLoads | None = None
) -> ExchangeTime:
    """Duration of one exchange whose bytes per link are ``loads_bytes``.

    With ``own`` (the bytes of one EP group within ``loads_bytes``, the exchange of all
    groups), only the links that group uses count, each at the load of all groups: a
    group is slowed by the others only where they share links.
    """
    own = loads_bytes if own is None else own
    busy = link_seconds(loads_bytes, topology)
    worst, bottleneck = 0.0, "none"
    for name, seconds in busy.items():
        used = getattr(own, name) > 0
        if used.any() and seconds[used].max() > worst:
            worst, bottleneck = float(seconds[used].max()), _CLASS[name]
    latency = overhead_s
    if own.nic_total > 0:
        latency += topology.nic_latency
        if own.spine_total > 0:
            latency += 2 * topology.uplink_latency
    if own.nvlink_total > 0:
        latency += topology.nvlink_latency
    return ExchangeTime(seconds=latency + worst, latency_s=latency, bottleneck=bottleneck)
