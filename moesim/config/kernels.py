"""The dispatch-kernel catalogue: every all-to-all kernel a scenario can name, one row each.

A row says what one token costs on the wire and where its copies go; the code that moves
copies over links (:mod:`moesim.comm.traffic`) implements one function per ``route``,
the hardware spec holds each kernel's fitted fixed cost in the field the row names.
Adding a kernel that moves copies like an existing one is one row here; a new ``route``
also needs its function in ``moesim/comm/traffic.py``. docs/routing.md section 7 states
the kernels' traffic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Route = Literal["node-forward", "per-expert", "per-gpu"]


@dataclass(frozen=True, kw_only=True)
class DispatchKernel:
    """One kernel's traffic rules and where its costs come from."""

    name: str
    summary: str
    # How a token's copies travel:
    # - node-forward: one RDMA copy per (token, remote node) to the GPU with the same
    #   local index, which forwards it over NVLink to the node's other expert GPUs;
    #   inside the source's node, NVLink (DeepEP normal).
    # - per-expert: one copy per (token, expert), straight to the expert's GPU, over
    #   NVLink inside the NVLink domain, RDMA beyond (DeepEP low-latency).
    # - per-gpu: one copy per (token, destination GPU), NVLink inside the node, the NIC
    #   between nodes after an NVLink hop to the destination's rail (NCCL with PXN).
    route: Route
    dispatch_header_bytes: int = 0  # added to every dispatched copy
    overhead_field: str  # HardwareSpec field: fixed cost per exchange, microseconds
    sm_bound: bool = False  # moves its bytes slower on fewer than deepep_sms_full SMs
    perfdb_op: str | None = None  # the op of NVIDIA's measured tables that times it


DISPATCH_KERNELS: dict[str, DispatchKernel] = {kernel.name: kernel for kernel in (
    DispatchKernel(name="deepep-normal", summary="DeepEP normal kernels (training, prefill)",
                   route="node-forward", overhead_field="deepep_overhead_us", sm_bound=True,
                   perfdb_op="deepep_normal"),
    DispatchKernel(name="deepep-low-latency", summary="DeepEP low-latency kernels (decode)",
                   route="per-expert", dispatch_header_bytes=16,
                   overhead_field="deepep_ll_overhead_us", perfdb_op="deepep_ll"),
    DispatchKernel(name="nccl-alltoall", summary="NCCL all-to-all", route="per-gpu",
                   overhead_field="nccl_latency_us"),
)}

KERNEL_NAMES: tuple[str, ...] = tuple(DISPATCH_KERNELS)

