"""Numbers that describe a topology as a whole: bisection bandwidth and the summary."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np

if TYPE_CHECKING:
    from .build import Topology

_SOURCE, _SINK = "_source", "_sink"
_GB, _US = 1e9, 1e-6


def first_half(topology: Topology) -> np.ndarray:
    """Boolean mask of the GPUs on the sending side of the bisection.

    The cut follows domain order (first half of the domains against the rest) because
    that is how expert-parallel ranks fill a cluster; one domain is split by local index.
    """
    if topology.n_domains > 1:
        return topology.domain_of < topology.n_domains // 2
    return topology.local_of < topology.n_gpus // 2


def bisection_bandwidth(topology: Topology, *, aggregate: bool = True) -> float:
    """Achievable bytes/s per direction from the first half of the GPUs to the second.

    This is the maximum flow through the directed graph with capacity = bandwidth x
    efficiency. ``aggregate`` merges each half's GPUs into the super-source/sink first:
    they hang off it with unbounded capacity, so every minimum cut keeps them on its side
    and the flow value is unchanged, while the graph shrinks from thousands of GPUs to the
    switches alone.
    """
    sending = first_half(topology)
    if sending.all() or not sending.any():
        return 0.0
    flow = nx.DiGraph()
    flow.add_nodes_from((_SOURCE, _SINK))
    side = {f"gpu{g}": (_SOURCE if sending[g] else _SINK) for g in range(topology.n_gpus)}
    if aggregate:
        capacity: dict[tuple[str, str], float] = defaultdict(float)
        for u, v, data in topology.graph.edges(data=True):
            u, v = side.get(u, u), side.get(v, v)
            # Edges inside one side, into the source or out of the sink carry no flow.
            if u in (v, _SINK) or v == _SOURCE:
                continue
            capacity[u, v] += data["bandwidth"] * data["efficiency"]
        flow.add_edges_from((u, v, {"capacity": c}) for (u, v), c in capacity.items())
    else:
        flow.add_edges_from(
            (u, v, {"capacity": data["bandwidth"] * data["efficiency"]})
            for u, v, data in topology.graph.edges(data=True)
        )
        # No capacity attribute: networkx treats these edges as unbounded.
        flow.add_edges_from(
            (_SOURCE, gpu) if end == _SOURCE else (gpu, _SINK) for gpu, end in side.items()
        )
    return float(nx.maximum_flow_value(flow, _SOURCE, _SINK))


def link_classes(topology: Topology) -> list[dict[str, Any]]:
    """One entry per distinct (kind, bandwidth, efficiency, latency) of directed edges."""
    counts: dict[tuple[str, float, float, float], int] = defaultdict(int)
    for _, _, data in topology.graph.edges(data=True):
        key = (data["kind"], data["bandwidth"], data["efficiency"], data["latency"])
        counts[key] += 1
    order = {"nvlink": 0, "nic": 1, "uplink": 2}
    return [
        {
            "kind": kind,
            "count": count,
            "bandwidth_GBps": _round(bandwidth / _GB),
            "achievable_GBps": _round(bandwidth * efficiency / _GB),
            "efficiency": efficiency,
            "latency_us": _round(latency / _US),
        }
        for (kind, bandwidth, efficiency, latency), count in sorted(
            counts.items(), key=lambda item: (order.get(item[0][0], 9), item[0][1:])
        )
    ]


def summarize(topology: Topology) -> dict[str, Any]:
    """The summary dict behind :meth:`Topology.summary` (GB/s per direction, µs)."""
    t = topology
    return {
        "name": t.name,
        "description": t.description,
        "source": t.source,
        "gpu": t.gpu,
        "n_gpus": t.n_gpus,
        "n_domains": t.n_domains,
        "gpus_per_domain": t.gpus_per_domain,
        "max_gpus": t.max_gpus,
        "fabric_kind": t.fabric_kind,
        "multi_plane": t.multi_plane,
        "rails": t.rails,
        "domains_per_leaf": t.domains_per_leaf,
        "n_leaves": t.n_leaves,
        "n_spines": t.n_spines,
        "nvlink_nominal_GBps": _round(t.nvlink_bw_nominal / _GB),
        "nvlink_achievable_GBps": _round(t.nvlink_bw / _GB),
        "nic_nominal_GBps": _round(t.nic_bw_nominal / _GB),
        "nic_achievable_GBps": _round(t.nic_bw / _GB),
        "links": link_classes(t),
        "oversubscription": t.oversubscription,
        "bisection_GBps": _round(bisection_bandwidth(t) / _GB),
    }


def _round(value: float) -> float:
    # Float noise from GB/s x efficiency (160.00000000000003) reads like a real digit.
    return round(float(value), 6)
