"""One MoE layer's dispatch and combine of every EP group: routed counts in, bytes per link
and seconds per group out. The simulator and the regression against the kernels' own
benchmarks both time their exchanges here.

Phases run in the dispatch direction (dispatch, and combine's gradient in backward) or
in the combine direction (combine, and dispatch's gradient). Each kernel's fixed cost per
exchange and its SM stretch come from the hardware spec, as the kernel catalogue says
(:mod:`moesim.config.kernels`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from moesim.comm.traffic import LinkLoads, bytes_per_copy
from moesim.config.hardware import HardwareSpec
from moesim.config.kernels import DISPATCH_KERNELS
from moesim.network.analytical import ExchangeTime
from moesim.network.models import NetworkModel
from moesim.routing.batch import BatchCounts

Phase = tuple[str, bool]  # (dispatch | combine, backward)
FORWARD: tuple[Phase, ...] = (("dispatch", False), ("combine", False))
TRAINING: tuple[Phase, ...] = (*FORWARD, ("combine", True), ("dispatch", True))
# Combine's gradient goes out like a dispatch; dispatch's comes back like a combine.
_OUTWARD = {("dispatch", False), ("combine", True)}


def sms_stretch(hw: HardwareSpec, kernel: str, sms) -> float:
    """How much longer (>= 1) an SM-bound kernel (DeepEP normal) moves its bytes on ``sms``
    SMs than on the ``deepep_sms_full`` it takes to saturate the links (1 when not
    fitted)."""
    if not DISPATCH_KERNELS[kernel].sm_bound or not sms or not hw.deepep_sms_full:
        return 1.0
    return max(1.0, hw.deepep_sms_full / sms)


@dataclass(frozen=True, kw_only=True)
class Exchange:
    """One dispatch or combine of all EP groups at once: bytes per link, and the
    duration each group sees."""

    loads: LinkLoads  # bytes, all groups
    times: list[ExchangeTime]  # per EP group

    def seconds_per_gpu(self, ep: int) -> np.ndarray:
        return np.repeat([t.seconds for t in self.times], ep)


def kernel_seconds(link_s, *, overhead_s: float, stretch: float = 1.0):
    """A kernel's time: its fixed cost plus the time its bytes take on the links, longer by
    ``stretch`` when it has too few SMs (:func:`sms_stretch`; the fixed cost stays)."""
    return overhead_s + link_s * stretch


def group_traffic(group_counts: list[BatchCounts], *, kernel: str, topology,
                  network: NetworkModel, gpus_per_node: int, copies_scale: float = 1.0,
                  ll_nvlink: bool = True) -> tuple[list, LinkLoads]:
    """Each EP group's traffic in the dispatch direction (group ``g`` is GPUs ``g x ep
    ...``, ``gpus_per_node`` of them per NVLink domain), and all groups' copies per link.

    Every copy is ``copies_scale`` tokens (a benchmark sampled fewer tokens than it sends);
    ``ll_nvlink`` as :func:`moesim.comm.traffic.dispatch_loads`."""
    ep = group_counts[0].pairs_sg.shape[0]
    traffic = [network.traffic(c, kernel=kernel, topology=topology, first_gpu=g * ep,
                               gpus_per_node=gpus_per_node, ll_nvlink=ll_nvlink)
               for g, c in enumerate(group_counts)]
    if copies_scale != 1.0:
        traffic = [t.scaled(copies_scale) for t in traffic]
    copies = [network.loads(t) for t in traffic]
    return traffic, sum(copies[1:], copies[0])


def time_exchange(groups_bytes: list, total_bytes: LinkLoads, *, topology,
                  network: NetworkModel, overhead_s: float, stretch: float = 1.0) -> Exchange:
    """One exchange of every group at once: ``groups_bytes`` each group's traffic in bytes,
    ``total_bytes`` all groups' bytes per link."""
    times = network.times(groups_bytes, total_bytes, topology, overhead_s=overhead_s)
    if stretch > 1.0:  # too few SMs: the transfer, not the fixed cost, slows
        times = [dataclasses.replace(t, seconds=kernel_seconds(
            t.seconds - overhead_s, overhead_s=overhead_s, stretch=stretch)) for t in times]
    return Exchange(loads=total_bytes, times=times)


def exchange_phases(
    group_counts: list[BatchCounts], *, kernel: str, topology, hw: HardwareSpec, comm_sms,
    hidden: int, dispatch_dtype: str, combine_dtype: str, network: NetworkModel,
    gpus_per_node: int, phases: tuple[Phase, ...] = FORWARD, copies_scale: float = 1.0,
    combine_grad_dtype: str = "bf16",
    ll_nvlink: bool = True, overhead_s: float | None = None,
) -> dict[Phase, Exchange]:
    """Each phase's exchange for the routed batches of the EP groups (see
    :func:`group_traffic`).

    Backward phases carry BF16 gradients, except the combine's gradient on its way to
    the experts in ``combine_grad_dtype`` (DeepSeek-V3 quantizes it to FP8, report
    sec. 3.3.3). The kernel's fixed cost is the hardware's
    (``overhead_s`` replaces it), and with fewer SMs than it needs it moves its bytes
    slower (:func:`sms_stretch` of ``comm_sms``).
    """
    overhead = hw.comm_overhead_s(kernel) if overhead_s is None else overhead_s
    stretch = sms_stretch(hw, kernel, comm_sms)
    traffic, total = group_traffic(group_counts, kernel=kernel, topology=topology,
                                   network=network, gpus_per_node=gpus_per_node,
                                   copies_scale=copies_scale, ll_nvlink=ll_nvlink)
    dtype = {("dispatch", False): dispatch_dtype, ("combine", False): combine_dtype,
             ("combine", True): combine_grad_dtype}
    out = {}
    for phase in phases:
        outward = phase in _OUTWARD
        nbytes = bytes_per_copy(kernel, hidden=hidden, dtype=dtype.get(phase, "bf16"),
                                dispatch=outward)

        def as_bytes(c, outward=outward, nbytes=nbytes):
            return (c if outward else c.reversed()).scaled(nbytes)

        out[phase] = time_exchange([as_bytes(t) for t in traffic], as_bytes(total),
                                   topology=topology, network=network, overhead_s=overhead,
                                   stretch=stretch)
    return out
