"""Token copies per directed link for one all-to-all exchange, per dispatch kernel.

Loads are counted in token copies in the *dispatch* direction (source rank -> expert
rank); :meth:`LinkLoads.reversed` gives the combine direction. Link classes, per
GPU: NVLink out/in (GPU <-> NVSwitch), NIC out/in (GPU <-> leaf); per leaf: uplink
(leaf -> spines) and downlink (spines -> leaf), spread evenly over its spines.

Kernels (``../shared/ROUTING.md`` section 7):

* ``deepep-normal``: a token goes once per destination *node* over RDMA, to the GPU
  with the same local index there, which forwards it over NVLink to every GPU of
  that node holding one of its experts; inside its own node it goes over NVLink.
* ``deepep-low-latency``: one copy per (token, expert), straight to the expert's GPU:
  over NVLink when that GPU shares the source's NVLink domain, over RDMA otherwise.
* ``nccl-alltoall``: one copy per (token, destination GPU): NVLink inside the node,
  the NIC between nodes, crossing NVLink first to the node's GPU on the destination's
  rail (NCCL's PXN) so that it stays on one rail.

On a multi-plane fabric a NIC reaches only GPUs of its own plane, so every kernel's
copies for another plane first cross NVLink to the GPU of its node on that plane.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from moesim.routing.batch import BatchCounts

KERNELS = ("deepep-normal", "deepep-low-latency", "nccl-alltoall")


@dataclass(frozen=True, kw_only=True)
class LinkLoads:
    """Copies (or bytes) per directed link; arrays over GPUs or leaves."""

    nvl_out: np.ndarray
    nvl_in: np.ndarray
    nic_out: np.ndarray
    nic_in: np.ndarray
    up: np.ndarray
    down: np.ndarray

    @classmethod
    def zeros(cls, n_gpus: int, n_leaves: int) -> LinkLoads:
        g, leaf = np.zeros(n_gpus), np.zeros(max(n_leaves, 0))
        return cls(nvl_out=g, nvl_in=g.copy(), nic_out=g.copy(), nic_in=g.copy(),
                   up=leaf, down=leaf.copy())

    def reversed(self) -> LinkLoads:
        """The same exchange run backwards (combine after dispatch)."""
        return LinkLoads(nvl_out=self.nvl_in, nvl_in=self.nvl_out, nic_out=self.nic_in,
                         nic_in=self.nic_out, up=self.down, down=self.up)

    def scaled(self, factor: float) -> LinkLoads:
        return LinkLoads(**{f.name: getattr(self, f.name) * factor for f in fields(self)})

    def __add__(self, other: LinkLoads) -> LinkLoads:
        return LinkLoads(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                            for f in fields(self)})

    @property
    def nvlink_total(self) -> float:
        return float(self.nvl_out.sum())

    @property
    def nic_total(self) -> float:
        return float(self.nic_out.sum())

    @property
    def spine_total(self) -> float:
        return float(self.up.sum())


class _Accumulator:
    """Scatters copies onto the links of one topology."""

    def __init__(self, topology) -> None:
        self.topo = topology
        n, leaves = topology.n_gpus, topology.n_leaves
        self.n, self.leaves = n, leaves
        self.nvl_out, self.nvl_in = np.zeros(n), np.zeros(n)
        self.nic_out, self.nic_in = np.zeros(n), np.zeros(n)
        self.up, self.down = np.zeros(leaves), np.zeros(leaves)

    def nvlink(self, src: np.ndarray, dst: np.ndarray, copies: np.ndarray) -> None:
        assert (self.topo.domain_of[src] == self.topo.domain_of[dst]).all()
        self.nvl_out += np.bincount(src, weights=copies, minlength=self.n)
        self.nvl_in += np.bincount(dst, weights=copies, minlength=self.n)

    def network(
        self, src: np.ndarray, dst: np.ndarray, copies: np.ndarray, *, pxn: bool = False
    ) -> None:
        """Copies from GPU ``src`` to GPU ``dst`` over the scale-out fabric.

        With ``pxn`` (NCCL's default) a copy for another rail first crosses NVLink to
        the source node's GPU on the destination's rail; a multi-plane fabric has no
        other way.
        """
        topo = self.topo
        if topo.multi_plane or (pxn and topo.rails > 1):
            # Another rail (plane) is reached through the node's GPU on that rail.
            local = topo.local_of[src]
            proxy_local = local - local % topo.rails + topo.rail_of[dst]
            proxy = topo.domain_of[src] * topo.gpus_per_domain + proxy_local
            hop = proxy != src
            self.nvlink(src[hop], proxy[hop], copies[hop])
            src = proxy
            # A proxy that is the destination itself means the copy never left NVLink.
            keep = proxy != dst
            src, dst, copies = src[keep], dst[keep], copies[keep]
        assert (topo.leaf_of[src] >= 0).all(), "scale-out traffic on a fabric without NICs"
        self.nic_out += np.bincount(src, weights=copies, minlength=self.n)
        self.nic_in += np.bincount(dst, weights=copies, minlength=self.n)
        cross = topo.leaf_of[src] != topo.leaf_of[dst]
        if cross.any():
            self.up += np.bincount(topo.leaf_of[src[cross]], weights=copies[cross],
                                   minlength=self.leaves)
            self.down += np.bincount(topo.leaf_of[dst[cross]], weights=copies[cross],
                                     minlength=self.leaves)

    def result(self) -> LinkLoads:
        return LinkLoads(nvl_out=self.nvl_out, nvl_in=self.nvl_in, nic_out=self.nic_out,
                         nic_in=self.nic_in, up=self.up, down=self.down)


def _pairs(matrix_sg: np.ndarray, keep_sg: np.ndarray):
    s, g = np.nonzero((matrix_sg > 0) & keep_sg)
    return s, g, matrix_sg[s, g].astype(np.float64)


def dispatch_loads(
    counts: BatchCounts, *, kernel: str, topology, first_gpu: int, gpus_per_node: int
) -> LinkLoads:
    """Copies per link for dispatching one routed batch of the EP group whose rank 0
    is GPU ``first_gpu``; ``gpus_per_node`` GPUs of the group share an NVLink domain."""
    ep = counts.pairs_sg.shape[0]
    rank = np.arange(ep)
    gpu = first_gpu + rank
    node = rank // gpus_per_node
    same_node = node[:, None] == node[None, :]
    not_self = rank[:, None] != rank[None, :]
    acc = _Accumulator(topology)

    if kernel == "deepep-low-latency":
        # NVLink-reachable peers get a P2P copy, the others an RDMA put.
        s, g, c = _pairs(counts.pairs_sg, not_self & same_node)
        acc.nvlink(gpu[s], gpu[g], c)
        s, g, c = _pairs(counts.pairs_sg, ~same_node)
        acc.network(gpu[s], gpu[g], c)
    elif kernel == "nccl-alltoall":
        s, g, c = _pairs(counts.reach_gpu_sg, not_self & same_node)
        acc.nvlink(gpu[s], gpu[g], c)
        s, g, c = _pairs(counts.reach_gpu_sg, ~same_node)
        acc.network(gpu[s], gpu[g], c, pxn=True)
    elif kernel == "deepep-normal":
        local = rank % gpus_per_node
        # Inside the source's node: straight over NVLink.
        s, g, c = _pairs(counts.reach_gpu_sg, not_self & same_node)
        acc.nvlink(gpu[s], gpu[g], c)
        # To other nodes: one RDMA copy per (token, node) to the same-local-index GPU ...
        n_nodes = counts.reach_node_sn.shape[1]
        remote_sn = node[:, None] != np.arange(n_nodes)[None, :]
        s, n, c = _pairs(counts.reach_node_sn, remote_sn)
        acc.network(gpu[s], first_gpu + n * gpus_per_node + local[s], c)
        # ... which forwards it over NVLink to the other expert GPUs of that node.
        forward = ~same_node & (local[:, None] != local[None, :])
        s, g, c = _pairs(counts.reach_gpu_sg, forward)
        acc.nvlink(first_gpu + node[g] * gpus_per_node + local[s], gpu[g], c)
    else:
        raise AssertionError(f"unknown kernel {kernel}")
    return acc.result()


def bytes_per_copy(kernel: str, *, hidden: int, dtype: str, dispatch: bool) -> int:
    """Logical bytes of one token copy as the kernels' own benchmarks count them.

    FP8 carries one fp32 scale per 128 values; DeepEP low-latency dispatch messages
    add a 16-byte header (``../shared/ROUTING.md`` section 7).
    """
    payload = hidden + hidden // 128 * 4 if dtype == "fp8" else 2 * hidden
    return payload + (16 if dispatch and kernel == "deepep-low-latency" else 0)
