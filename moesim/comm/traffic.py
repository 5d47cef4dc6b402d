"""Token copies per directed link for one all-to-all exchange, per dispatch kernel.

Loads are counted in token copies in the *dispatch* direction (source rank -> expert
rank); :meth:`LinkLoads.reversed` gives the combine direction. Link classes, per
GPU: NVLink out/in (GPU <-> NVSwitch), NIC out/in (GPU <-> leaf); per leaf: uplink
(leaf -> spines) and downlink (spines -> leaf), spread evenly over its spines.

Each kernel of the catalogue (:mod:`moesim.config.kernels`) names the ``route`` its
copies take (docs/routing.md section 7); one function here implements each route:

* ``node-forward`` (DeepEP normal): a token goes once per destination *node* over RDMA,
  to the GPU with the same local index there, which forwards it over NVLink to every
  GPU of that node holding one of its experts; inside its own node it goes over NVLink.
* ``per-expert`` (DeepEP low-latency): one copy per (token, expert), straight to the
  expert's GPU: over NVLink when that GPU shares the source's NVLink domain, over RDMA
  otherwise.
* ``per-gpu`` (NCCL all-to-all): one copy per (token, destination GPU): NVLink inside
  the node, the NIC between nodes, crossing NVLink first to the node's GPU on the
  destination's rail (NCCL's PXN) so that it stays on one rail.

On a multi-plane fabric a NIC reaches only GPUs of its own plane, so every kernel's
copies for another plane first cross NVLink to the GPU of its node on that plane.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import get_args

import numpy as np

from moesim.config.kernels import DISPATCH_KERNELS, Route
from moesim.routing.batch import BatchCounts


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


@dataclass(frozen=True, kw_only=True)
class Paths:
    """Links each flow crosses, CSR-like: flow ``f`` crosses ``link_ids[indptr[f]:indptr[f+1]]``."""

    indptr: np.ndarray  # [F + 1] int64, starts at 0, non-decreasing
    link_ids: np.ndarray  # [nnz] int64 link indices

    def __post_init__(self) -> None:
        assert self.indptr[0] == 0 and self.indptr[-1] == len(self.link_ids)
        assert (np.diff(self.indptr) >= 0).all()

    @classmethod
    def from_lists(cls, paths: list[list[int]]) -> Paths:
        """Paths from one list of link ids per flow (hand-made examples)."""
        indptr = np.concatenate([[0], np.cumsum([len(p) for p in paths])]).astype(np.int64)
        link_ids = np.array([link for p in paths for link in p], dtype=np.int64)
        return cls(indptr=indptr, link_ids=link_ids)

    @property
    def n_flows(self) -> int:
        return len(self.indptr) - 1

    @property
    def flow_z(self) -> np.ndarray:
        """[nnz] the flow of every (flow, link) entry."""
        return np.repeat(np.arange(self.n_flows), np.diff(self.indptr))


def n_links(n_gpus: int, n_leaves: int) -> int:
    """Directed links in the global index space: nvl_out[g] = g, nvl_in[g] = n + g,
    nic_out[g] = 2n + g, nic_in[g] = 3n + g, up[leaf] = 4n + leaf, down[leaf] = 4n + L + leaf."""
    return 4 * n_gpus + 2 * max(n_leaves, 0)


def link_capacity(topology) -> np.ndarray:
    """[n_links] achievable bytes/s of every directed link (0 where a link is missing)."""
    n, leaves = topology.n_gpus, max(topology.n_leaves, 0)
    uplink = np.asarray(topology.leaf_uplink_bw, dtype=np.float64).reshape(leaves)
    return np.concatenate([np.full(2 * n, float(topology.nvlink_bw)),
                           np.full(2 * n, float(topology.nic_bw)), uplink, uplink])


def link_class(n_gpus: int, n_leaves: int) -> np.ndarray:
    """[n_links] class of every link: nvlink | nic | uplink (as ExchangeTime.bottleneck)."""
    return np.array(["nvlink"] * (2 * n_gpus) + ["nic"] * (2 * n_gpus)
                    + ["uplink"] * (2 * max(n_leaves, 0)))


@dataclass(frozen=True, kw_only=True)
class FlowSet:
    """One exchange as flows: copies (or bytes) ``copies_f`` from GPU ``src_f`` to GPU
    ``dst_f`` over ``paths`` in the global link space of ``n_gpus`` GPUs and ``n_leaves``
    leaves (see :func:`n_links`). Summing copies over each flow's links gives LinkLoads.
    """

    copies_f: np.ndarray  # [F] float64
    src_f: np.ndarray  # [F] GPU the flow starts at
    dst_f: np.ndarray  # [F] GPU the flow ends at
    paths: Paths
    n_gpus: int
    n_leaves: int

    def __post_init__(self) -> None:
        assert self.copies_f.shape == self.src_f.shape == self.dst_f.shape
        assert self.paths.n_flows == len(self.copies_f)
        assert self.paths.link_ids.size == 0 or (
            self.paths.link_ids.min() >= 0 and self.paths.link_ids.max() < self.n_links)

    @property
    def n_links(self) -> int:
        return n_links(self.n_gpus, self.n_leaves)

    def scaled(self, factor: float) -> FlowSet:
        return replace(self, copies_f=self.copies_f * factor)

    def reversed(self) -> FlowSet:
        """The same exchange run backwards (combine after dispatch): every link is
        swapped for its opposite direction (out <-> in, up <-> down)."""
        n, leaves = self.n_gpus, max(self.n_leaves, 0)
        opposite = np.concatenate([np.arange(n, 2 * n), np.arange(n),
                                   np.arange(3 * n, 4 * n), np.arange(2 * n, 3 * n),
                                   4 * n + leaves + np.arange(leaves), 4 * n + np.arange(leaves)])
        return replace(self, src_f=self.dst_f, dst_f=self.src_f,
                       paths=Paths(indptr=self.paths.indptr,
                                   link_ids=opposite[self.paths.link_ids]))

    def loads(self) -> LinkLoads:
        """Copies per link: every flow's copies on each link of its path."""
        per_link = np.bincount(self.paths.link_ids, weights=self.copies_f[self.paths.flow_z],
                               minlength=self.n_links)
        return _split(per_link, self.n_gpus, self.n_leaves)


def concat_flows(flowsets: list[FlowSet]) -> FlowSet:
    """Several exchanges on the same topology as one (e.g. every EP group's dispatch)."""
    first = flowsets[0]
    assert all((f.n_gpus, f.n_leaves) == (first.n_gpus, first.n_leaves) for f in flowsets)
    sizes = np.cumsum([0] + [f.paths.link_ids.size for f in flowsets[:-1]])
    indptr = np.concatenate([[0]] + [f.paths.indptr[1:] + off
                                     for f, off in zip(flowsets, sizes, strict=True)])
    return replace(
        first,
        copies_f=np.concatenate([f.copies_f for f in flowsets]),
        src_f=np.concatenate([f.src_f for f in flowsets]),
        dst_f=np.concatenate([f.dst_f for f in flowsets]),
        paths=Paths(indptr=indptr.astype(np.int64),
                    link_ids=np.concatenate([f.paths.link_ids for f in flowsets])),
    )


def _split(per_link: np.ndarray, n: int, leaves: int) -> LinkLoads:
    leaves = max(leaves, 0)
    return LinkLoads(nvl_out=per_link[:n], nvl_in=per_link[n:2 * n],
                     nic_out=per_link[2 * n:3 * n], nic_in=per_link[3 * n:4 * n],
                     up=per_link[4 * n:4 * n + leaves], down=per_link[4 * n + leaves:])


_HOPS = 6  # the longest path: NVLink out/in to a proxy, NIC out, uplink, downlink, NIC in


class _Accumulator:
    """Turns (src GPU, dst GPU, copies) pairs into flows over the links of one topology.

    Every pair is one flow, its path one row of link ids (-1 = no link). Loads and flows
    both come from these rows, so the routing of a copy is written once.
    """

    def __init__(self, topology) -> None:
        self.topo = topology
        self.n, self.leaves = topology.n_gpus, max(topology.n_leaves, 0)
        self._src: list[np.ndarray] = []
        self._dst: list[np.ndarray] = []
        self._copies: list[np.ndarray] = []
        # Per call, the link of each hop [P] (-1 = none), None for a hop no pair takes:
        # kept as columns, as loads need them one at a time (stacking them into [P, hops]
        # cost two more P x hops copies per call).
        self._hops: list[list[np.ndarray | None]] = []

    def _add(self, src, dst, copies, columns: list[np.ndarray | None]) -> None:
        assert len(columns) <= _HOPS
        self._src.append(src)
        self._dst.append(dst)
        self._copies.append(copies)
        self._hops.append(columns)

    def nvlink(self, src: np.ndarray, dst: np.ndarray, copies: np.ndarray) -> None:
        assert (self.topo.domain_of[src] == self.topo.domain_of[dst]).all()
        self._add(src, dst, copies, [src, self.n + dst])

    def network(
        self, src: np.ndarray, dst: np.ndarray, copies: np.ndarray, *, pxn: bool = False
    ) -> None:
        """Copies from GPU ``src`` to GPU ``dst`` over the scale-out fabric.

        With ``pxn`` (NCCL's default) a copy for another rail first crosses NVLink to
        the source node's GPU on the destination's rail; a multi-plane fabric has no
        other way. The NVLink hop and the NIC transfer are one flow: the kernels
        pipeline them chunk by chunk.
        """
        topo, n = self.topo, self.n
        sender = src
        nvl_out = nvl_in = None
        if topo.multi_plane or (pxn and topo.rails > 1):
            # Another rail (plane) is reached through the node's GPU on that rail.
            local = topo.local_of[src]
            proxy_local = local - local % topo.rails + topo.rail_of[dst]
            proxy = topo.domain_of[src] * topo.gpus_per_domain + proxy_local
            hop = proxy != src
            assert (topo.domain_of[proxy] == topo.domain_of[src]).all()
            nvl_out, nvl_in = np.where(hop, src, -1), np.where(hop, n + proxy, -1)
            sender = proxy
        # A sender that is the destination itself means the copy never left NVLink.
        rdma = sender != dst
        assert (topo.leaf_of[sender[rdma]] >= 0).all(), "scale-out traffic without NICs"
        leaf_src, leaf_dst = topo.leaf_of[sender], topo.leaf_of[dst]
        cross = rdma & (leaf_src != leaf_dst)
        self._add(src, dst, copies, [
            nvl_out, nvl_in,
            np.where(rdma, 2 * n + sender, -1), np.where(rdma, 3 * n + dst, -1),
            np.where(cross, 4 * n + leaf_src, -1),
            np.where(cross, 4 * n + self.leaves + leaf_dst, -1),
        ])

    def _rows(self):
        """``(src, dst, copies, links)``: every pair's path as one row [P, _HOPS]."""
        if not self._hops:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, np.zeros(0), np.zeros((0, _HOPS), dtype=np.int64)
        links = np.full((sum(len(c) for c in self._copies), _HOPS), -1, dtype=np.int64)
        start = 0
        for copies, hops in zip(self._copies, self._hops, strict=True):
            for h, column in enumerate(hops):
                if column is not None:
                    links[start:start + len(copies), h] = column
            start += len(copies)
        return (np.concatenate(self._src).astype(np.int64),
                np.concatenate(self._dst).astype(np.int64),
                np.concatenate(self._copies), links)

    def result(self) -> LinkLoads:
        per_link = np.zeros(n_links(self.n, self.leaves))
        for copies, hops in zip(self._copies, self._hops, strict=True):
            for column in hops:  # one bincount per hop keeps memory at one column
                if column is None:
                    continue
                used = column >= 0
                if used.all():
                    per_link += np.bincount(column, weights=copies, minlength=len(per_link))
                else:
                    per_link += np.bincount(column[used], weights=copies[used],
                                            minlength=len(per_link))
        return _split(per_link, self.n, self.leaves)

    def flows(self) -> FlowSet:
        src, dst, copies, links = self._rows()
        used = links >= 0
        indptr = np.concatenate([[0], np.cumsum(used.sum(axis=1))]).astype(np.int64)
        return FlowSet(copies_f=copies, src_f=src, dst_f=dst,
                       paths=Paths(indptr=indptr, link_ids=links[used]),
                       n_gpus=self.n, n_leaves=self.leaves)


def _pairs(matrix_sg: np.ndarray, keep_sg: np.ndarray):
    s, g = np.nonzero((matrix_sg > 0) & keep_sg)
    return s, g, matrix_sg[s, g].astype(np.float64)


def dispatch_loads(
    counts: BatchCounts, *, kernel: str, topology, first_gpu: int, gpus_per_node: int,
    ll_nvlink: bool = True,
) -> LinkLoads:
    """Copies per link for dispatching one routed batch of the EP group whose rank 0
    is GPU ``first_gpu``; ``gpus_per_node`` GPUs of the group share an NVLink domain.

    ``ll_nvlink=False`` makes DeepEP low-latency send same-node copies over RDMA too
    (DeepEP's ``allow_nvlink_for_low_latency_mode=False``); a multi-plane fabric still
    needs NVLink to reach another plane.
    """
    return _dispatch(counts, kernel=kernel, topology=topology, first_gpu=first_gpu,
                     gpus_per_node=gpus_per_node, ll_nvlink=ll_nvlink).result()


def dispatch_flows(
    counts: BatchCounts, *, kernel: str, topology, first_gpu: int, gpus_per_node: int,
    ll_nvlink: bool = True,
) -> FlowSet:
    """The same dispatch as :func:`dispatch_loads`, as flows: one per (src GPU, dst GPU)
    pair each kernel stage sends, over all the links of its path.

    DeepEP normal's two stages are separate flows: the RDMA copy src -> forwarder (one
    per token and remote node) and the forwarder's NVLink copies -> expert GPUs (one
    per token and GPU). One RDMA copy fans out to 0..(gpus_per_node - 1) forwarded
    copies, so a single flow with one rate cannot carry both; the kernel pipelines
    them, so they run concurrently. ``reversed()`` gives the combine.
    """
    return _dispatch(counts, kernel=kernel, topology=topology, first_gpu=first_gpu,
                     gpus_per_node=gpus_per_node, ll_nvlink=ll_nvlink).flows()


def _dispatch(
    counts: BatchCounts, *, kernel: str, topology, first_gpu: int, gpus_per_node: int,
    ll_nvlink: bool = True,
) -> _Accumulator:
    group = _Group(counts.pairs_sg.shape[0], first_gpu, gpus_per_node)
    acc = _Accumulator(topology)
    _ROUTES[DISPATCH_KERNELS[kernel].route](counts, group, acc, ll_nvlink=ll_nvlink)
    return acc


class _Group:
    """Ranks of one EP group: GPU ids, nodes, and which rank pairs share a node."""

    def __init__(self, ep: int, first_gpu: int, gpus_per_node: int) -> None:
        self.rank = np.arange(ep)
        self.first_gpu, self.per_node = first_gpu, gpus_per_node
        self.gpu = first_gpu + self.rank
        self.node = self.rank // gpus_per_node
        self.local = self.rank % gpus_per_node
        self.same_node = self.node[:, None] == self.node[None, :]
        self.not_self = self.rank[:, None] != self.rank[None, :]


def _per_expert(counts: BatchCounts, g: _Group, acc: _Accumulator, *, ll_nvlink: bool) -> None:
    # NVLink-reachable peers get a P2P copy (unless disabled), the others an RDMA put.
    via_nvlink = g.not_self & g.same_node if ll_nvlink else np.zeros_like(g.same_node)
    s, d, c = _pairs(counts.pairs_sg, via_nvlink)
    acc.nvlink(g.gpu[s], g.gpu[d], c)
    s, d, c = _pairs(counts.pairs_sg, g.not_self & ~via_nvlink)
    acc.network(g.gpu[s], g.gpu[d], c)


def _per_gpu(counts: BatchCounts, g: _Group, acc: _Accumulator, **_) -> None:
    s, d, c = _pairs(counts.reach_gpu_sg, g.not_self & g.same_node)
    acc.nvlink(g.gpu[s], g.gpu[d], c)
    s, d, c = _pairs(counts.reach_gpu_sg, ~g.same_node)
    acc.network(g.gpu[s], g.gpu[d], c, pxn=True)


def _node_forward(counts: BatchCounts, g: _Group, acc: _Accumulator, **_) -> None:
    # Inside the source's node: straight over NVLink.
    s, d, c = _pairs(counts.reach_gpu_sg, g.not_self & g.same_node)
    acc.nvlink(g.gpu[s], g.gpu[d], c)
    # To other nodes: one RDMA copy per (token, node) to the same-local-index GPU ...
    n_nodes = counts.reach_node_sn.shape[1]
    remote_sn = g.node[:, None] != np.arange(n_nodes)[None, :]
    s, n, c = _pairs(counts.reach_node_sn, remote_sn)
    acc.network(g.gpu[s], g.first_gpu + n * g.per_node + g.local[s], c)
    # ... which forwards it over NVLink to the other expert GPUs of that node.
    forward = ~g.same_node & (g.local[:, None] != g.local[None, :])
    s, d, c = _pairs(counts.reach_gpu_sg, forward)
    acc.nvlink(g.first_gpu + g.node[d] * g.per_node + g.local[s], g.gpu[d], c)


_ROUTES = {"node-forward": _node_forward, "per-expert": _per_expert, "per-gpu": _per_gpu}
assert set(_ROUTES) == set(get_args(Route)), "every route of the kernel catalogue moves copies"


def bytes_per_copy(kernel: str, *, hidden: int, dtype: str, dispatch: bool) -> int:
    """Logical bytes of one token copy as the kernels' own benchmarks count them.

    FP8 carries one fp32 scale per 128 values; a kernel may add a header to every
    dispatched copy (the catalogue's ``dispatch_header_bytes``; docs/routing.md
    section 7).
    """
    payload = hidden + hidden // 128 * 4 if dtype == "fp8" else 2 * hidden
    return payload + (DISPATCH_KERNELS[kernel].dispatch_header_bytes if dispatch else 0)
