"""NCCL collectives (all-reduce, all-gather, reduce-scatter, all-to-all) on a topology.

The alpha-beta model of a ring, counted as nccl-tests counts its ``size`` (the bytes of
the whole buffer: all-reduce's input, all-gather's output, reduce-scatter's input,
all-to-all's send buffer)::

    time = nccl_latency_us + bus_factor(op, n) x size / bus_bandwidth

(``comm_overhead_us`` where the GPU has no fitted ``nccl_latency_us``).

``bus_factor`` is nccl-tests' bus-bandwidth factor (``2 (n-1)/n`` for all-reduce,
``(n-1)/n`` for the others), so ``size x bus_factor`` is what each GPU's slowest link
carries. The latency is one fixed cost per collective: on NVSwitch nodes the measured
small-message time barely depends on the GPU count or the collective
(aiconfigurator's NCCL tables: 15-20 µs from 2 to 8 H100s), unlike a ring's
``n - 1`` sequential steps. Within one NVLink domain the bus bandwidth is a GPU's achievable NVLink
bandwidth; a ring that spans domains is held back by each GPU's NIC (one NIC per GPU, as
on rail-optimized DGX fabrics). NCCL reaches less of it with fewer GPUs (fewer channels
and NVSwitch ports in use): the bus bandwidth is scaled by ``n / (n + nccl_gpus_half)``
(measured on 8-GPU NVSwitch nodes: all-gather reaches 57% of NVLink on 2 GPUs and 75% on
8; aiconfigurator-core's NCCL tables).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Literal

import numpy as np

from moesim.config.hardware import HardwareSpec

Collective = Literal["all_reduce", "all_gather", "reduce_scatter", "alltoall"]
COLLECTIVES: tuple[str, ...] = ("all_reduce", "all_gather", "reduce_scatter", "alltoall")


def bus_factor(op: str, n):
    """Bytes on each GPU's busiest link per byte of ``size`` (nccl-tests' busbw factor)."""
    n = np.asarray(n, dtype=float)
    return (2.0 if op == "all_reduce" else 1.0) * (n - 1) / n


def bus_bandwidth(topology, n: int) -> float:
    """Achievable bytes/s per GPU of a ring over ``n`` GPUs of ``topology``."""
    if n <= topology.gpus_per_domain or topology.nic_bw == 0:
        return topology.nvlink_bw
    return min(topology.nvlink_bw, topology.nic_bw)


def spread_out(topology):
    """The topology as :func:`collective_time` must see a group that spans NVLink domains
    although it has no more GPUs than one domain (a strided group: MoE-TP, data
    parallel): it decides by group size, which is right only for consecutive GPUs."""
    return SimpleNamespace(gpus_per_domain=0, nvlink_bw=topology.nvlink_bw,
                           nic_bw=topology.nic_bw)


def strided_collective_time(hw: HardwareSpec, topology, *, op: str, size: float, n: int,
                             stride: int) -> float:
    """:func:`collective_time` of ``n`` GPUs ``stride`` apart in a block of consecutive
    GPUs (data-parallel, context-parallel groups): the ring crosses NVLink domains when
    the block does, however few its GPUs."""
    spans = n * stride > topology.gpus_per_domain and topology.n_domains > 1
    seen = spread_out(topology) if spans and n <= topology.gpus_per_domain else topology
    return float(collective_time(hw, seen, op=op, size=size, n=n))


def collective_time(hw: HardwareSpec, topology, *, op: str, size, n):
    """Seconds of one ``op`` over ``n`` GPUs of a ``size``-byte buffer (arrays broadcast).

    One GPU does no communication (0 s)."""
    if op not in COLLECTIVES:
        raise ValueError(f"unknown collective {op!r}; allowed: {', '.join(COLLECTIVES)}")
    n_arr = np.asarray(n)
    bw = np.vectorize(lambda g: bus_bandwidth(topology, int(g)), otypes=[float])(n_arr)
    bw = bw * n_arr / (n_arr + hw.nccl_gpus_half)
    t = hw.nccl_overhead_s() + bus_factor(op, n_arr) * np.asarray(size, dtype=float) / bw
    return np.where(n_arr > 1, t, 0.0)
