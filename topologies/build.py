"""Build the networkx graph of a topology from its spec.

Node ids are strings with global indices: ``gpu{g}``, ``nvswitch{d}``, ``leaf{l}``,
``spine{s}``. Every physical link is two directed edges with the same attributes, so
that each direction is its own resource when the simulator shares bandwidth.

Leaf numbering is rail-major: leaf ``rail * leaves_per_rail + domain // domains_per_leaf``
serves rail ``rail`` of a block of ``domains_per_leaf`` consecutive domains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np

from .spec import TopologySpec

GB = 1e9  # bytes; link rates are quoted in decimal units
US = 1e-6  # seconds


@dataclass(frozen=True, kw_only=True, eq=False)
class Topology:
    """A cluster's GPUs, NVSwitch domains and leaf/spine fabric, ready for the simulator.

    Bandwidths are bytes/s per direction; ``*_bw`` are achievable (nominal x efficiency),
    ``*_bw_nominal`` the datasheet figure. Latencies are seconds per hop. Per-GPU arrays are
    int32 of length ``n_gpus``; ``rail_of`` and ``leaf_of`` are -1 without a fabric.
    """

    name: str
    description: str
    source: str
    gpu: str
    fabric_kind: str
    n_gpus: int
    gpus_per_domain: int
    n_domains: int
    max_gpus: int
    rails: int
    domains_per_leaf: int
    n_leaves: int
    n_spines: int
    oversubscription: float | None
    multi_plane: bool
    graph: nx.DiGraph
    domain_of: np.ndarray
    local_of: np.ndarray
    rail_of: np.ndarray
    leaf_of: np.ndarray
    leaf_rail: np.ndarray  # [n_leaves] the rail (plane) each leaf serves
    spine_plane: np.ndarray  # [n_spines] the plane of each spine; -1 when not multi-plane
    plane_spines: tuple[tuple[int, ...], ...]  # multi-plane: spines of each plane
    nvlink_bw: float
    nvlink_bw_nominal: float
    nic_bw: float
    nic_bw_nominal: float
    leaf_uplink_bw: np.ndarray  # [n_leaves] achievable, summed over the leaf's uplinks
    nvlink_latency: float
    nic_latency: float
    uplink_latency: float
    spec: TopologySpec



def build_topology(spec: TopologySpec, n_gpus: int) -> Topology:
    """The topology of ``spec`` with ``n_gpus`` GPUs (already checked by ``domains_for``)."""
    gpd, fabric = spec.gpus_per_domain, spec.fabric
    n_domains = -(-n_gpus // gpd)
    assert n_gpus >= 1 and (n_domains == 1 or n_gpus % gpd == 0)
    gpus = np.arange(n_gpus, dtype=np.int32)
    domain_of, local_of = gpus // gpd, gpus % gpd

    nvlink = spec.links.nvlink
    graph = nx.DiGraph(name=spec.name)
    edges: list[tuple[str, str, dict[str, Any]]] = []

    def link(
        a: str, b: str, kind: str, bandwidth: float, efficiency: float, latency: float
    ) -> None:
        attrs = {"kind": kind, "bandwidth": bandwidth, "efficiency": efficiency, "latency": latency}
        edges.append((a, b, attrs))
        edges.append((b, a, dict(attrs)))

    if fabric.kind == "none":
        rails, dpl, leaves_per_rail, rails_built = 0, 0, 0, 0
        rail_of = np.full(n_gpus, -1, dtype=np.int32)
        leaf_of = np.full(n_gpus, -1, dtype=np.int32)
    else:
        rails, dpl = fabric.rails, fabric.domains_per_leaf
        assert dpl is not None and gpd % rails == 0
        leaves_per_rail = -(-n_domains // dpl)
        # A lone partial domain may not reach every rail; empty leaves would only confuse.
        rails_built = min(rails, n_gpus)
        rail_of = (local_of % rails).astype(np.int32)
        leaf_of = (rail_of * leaves_per_rail + domain_of // dpl).astype(np.int32)
    n_leaves = rails_built * leaves_per_rail
    leaf_rail = np.repeat(np.arange(rails_built, dtype=np.int32), leaves_per_rail)

    graph.add_nodes_from(
        (
            f"gpu{g}",
            {
                "kind": "gpu",
                "domain": int(domain_of[g]),
                "local": int(local_of[g]),
                "rail": int(rail_of[g]),
                "leaf": int(leaf_of[g]),
            },
        )
        for g in range(n_gpus)
    )
    graph.add_nodes_from(
        (f"nvswitch{d}", {"kind": "nvswitch", "domain": d}) for d in range(n_domains)
    )
    graph.add_nodes_from(
        (f"leaf{leaf}", {"kind": "leaf", "rail": int(leaf_rail[leaf])}) for leaf in range(n_leaves)
    )
    for g in range(n_gpus):
        link(
            f"gpu{g}",
            f"nvswitch{domain_of[g]}",
            "nvlink",
            nvlink.bandwidth_GBps * GB,
            nvlink.efficiency,
            nvlink.latency_us * US,
        )

    spine_plane = np.zeros(0, dtype=np.int32)
    plane_spines: tuple[tuple[int, ...], ...] = ()
    leaf_uplink_bw = np.zeros(n_leaves, dtype=np.float64)
    nic, uplink = spec.links.nic, spec.links.uplink
    if fabric.kind != "none":
        assert nic is not None and uplink is not None
        for g in range(n_gpus):
            link(
                f"gpu{g}",
                f"leaf{leaf_of[g]}",
                "nic",
                nic.bandwidth_GBps * GB,
                nic.efficiency,
                nic.latency_us * US,
            )
        spines_of_leaf, spine_plane = _spines(spec, leaves_per_rail, rails_built)
        plane_spines = (
            tuple(
                tuple(int(s) for s in np.flatnonzero(spine_plane == p)) for p in range(rails_built)
            )
            if fabric.kind == "multi-plane"
            else ()
        )
        graph.add_nodes_from(
            (f"spine{s}", {"kind": "spine", "plane": int(spine_plane[s])})
            for s in range(len(spine_plane))
        )
        # The leaf's uplink budget follows the switch as designed (domains_per_leaf full
        # domains), not how many domains this run happens to place under it.
        downlink_bw = dpl * (gpd // rails) * nic.bandwidth_GBps * GB
        for leaf in range(n_leaves):
            spines = spines_of_leaf(leaf)
            if not spines:
                continue
            per_link = downlink_bw / fabric.oversubscription / len(spines)
            for s in spines:
                link(
                    f"leaf{leaf}",
                    f"spine{s}",
                    "uplink",
                    per_link,
                    uplink.efficiency,
                    uplink.latency_us * US,
                )
            leaf_uplink_bw[leaf] = per_link * uplink.efficiency * len(spines)
    graph.add_edges_from(edges)
    nx.freeze(graph)

    arrays = (domain_of, local_of, rail_of, leaf_of, leaf_rail, spine_plane, leaf_uplink_bw)
    for array in arrays:
        array.setflags(write=False)
    return Topology(
        name=spec.name,
        description=spec.description,
        source=spec.source,
        gpu=spec.gpu,
        fabric_kind=fabric.kind,
        n_gpus=n_gpus,
        gpus_per_domain=gpd,
        n_domains=n_domains,
        max_gpus=spec.max_gpus,
        rails=rails,
        domains_per_leaf=dpl,
        n_leaves=n_leaves,
        n_spines=len(spine_plane),
        oversubscription=None if fabric.kind == "none" else fabric.oversubscription,
        multi_plane=fabric.kind == "multi-plane",
        graph=graph,
        domain_of=domain_of,
        local_of=local_of,
        rail_of=rail_of,
        leaf_of=leaf_of,
        leaf_rail=leaf_rail,
        spine_plane=spine_plane,
        plane_spines=plane_spines,
        nvlink_bw=nvlink.bandwidth_GBps * GB * nvlink.efficiency,
        nvlink_bw_nominal=nvlink.bandwidth_GBps * GB,
        nic_bw=nic.bandwidth_GBps * GB * nic.efficiency if nic else 0.0,
        nic_bw_nominal=nic.bandwidth_GBps * GB if nic else 0.0,
        leaf_uplink_bw=leaf_uplink_bw,
        nvlink_latency=nvlink.latency_us * US,
        nic_latency=nic.latency_us * US if nic else 0.0,
        uplink_latency=uplink.latency_us * US if uplink else 0.0,
        spec=spec,
    )


def _spines(spec: TopologySpec, leaves_per_rail: int, rails_built: int):
    """Which spines each leaf reaches, and each spine's plane (-1 when shared by all)."""
    fabric = spec.fabric
    n_leaves = leaves_per_rail * rails_built
    if fabric.kind == "multi-plane":
        # A plane with a single leaf switches everything locally: no spines to build.
        per_plane = fabric.spines_per_plane if leaves_per_rail > 1 else 0
        assert per_plane is not None
        plane = np.repeat(np.arange(rails_built, dtype=np.int32), per_plane)
        return (
            lambda leaf: range(
                (leaf // leaves_per_rail) * per_plane, (leaf // leaves_per_rail + 1) * per_plane
            )
        ), plane
    # Rail-optimized: traffic between rails (or leaf blocks) crosses the spines, so any
    # second leaf needs them; every leaf reaches every spine.
    n_spines = fabric.spines if n_leaves > 1 else 0
    assert n_spines is not None
    return (lambda leaf: range(n_spines)), np.full(n_spines, -1, dtype=np.int32)
