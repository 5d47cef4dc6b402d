"""Stories about cluster topologies: presets, fabric shapes, mistakes, bisection, drawing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

from moesim.config.loading import hardware_preset
from moesim.errors import InputError
from moesim.topologies import Topology, load_topology, preset_names
from moesim.topologies.analysis import bisection_bandwidth, summarize

GB = 1e9
PRESETS = [
    "dgx-b200",
    "dgx-b200-superpod",
    "dgx-b300",
    "dgx-b300-superpod",
    "dgx-h100",
    "dgx-h100-superpod",
    "dgx-h200",
    "dgx-h200-superpod",
    "gb200-nvl72",
    "gb300-nvl72",
    "h800-cluster",
    "h800-node",
]
# DGX presets: (node preset, SuperPOD preset, GPU hardware preset, NVLink GB/s per direction)
DGX = [
    ("dgx-h100", "dgx-h100-superpod", "h100", 450),
    ("dgx-h200", "dgx-h200-superpod", "h200", 450),
    ("dgx-b200", "dgx-b200-superpod", "b200", 900),
]


def write_topology(
    tmp_path: Path,
    *,
    kind: str = "rail-optimized",
    rails: int = 1,
    gpus_per_domain: int = 2,
    domains_per_leaf: int = 2,
    spines: int = 2,
    oversubscription: float = 1.0,
    max_gpus: int = 64,
    extra: str = "",
) -> str:
    """A small custom topology file; NIC and uplink efficiency match (non-blocking)."""
    spine_line = f"spines: {spines}" if kind == "rail-optimized" else f"spines_per_plane: {spines}"
    text = f"""\
schema: moesim.topology/1
name: tiny
source: test
gpu: h800
gpus_per_domain: {gpus_per_domain}
default_gpus: {gpus_per_domain}
max_gpus: {max_gpus}
links:
  nvlink: {{bandwidth_GBps: 200, efficiency: 0.8, latency_us: 0.5}}
  nic: {{bandwidth_GBps: 50, efficiency: 0.9, latency_us: 1.0}}
  uplink: {{efficiency: 0.9, latency_us: 0.25}}
fabric:
  kind: {kind}
  rails: {rails}
  domains_per_leaf: {domains_per_leaf}
  {spine_line}
  oversubscription: {oversubscription}
{extra}"""
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return str(path)


def test_the_presets_are_shipped():
    assert preset_names() == PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_with_sound_links(name):
    topo = load_topology(name)
    assert isinstance(topo, Topology)
    assert topo.name == name
    assert topo.n_gpus == topo.spec.default_gpus
    graph = topo.graph
    for u, v, data in graph.edges(data=True):
        assert data["kind"] in {"nvlink", "nic", "uplink"}
        assert data["bandwidth"] > 0 and data["latency"] > 0
        assert 0 < data["efficiency"] <= 1
        # Every link is two directed edges with the same figures.
        assert graph.edges[v, u] == data
    kinds = nx.get_node_attributes(graph, "kind")
    assert sum(k == "gpu" for k in kinds.values()) == topo.n_gpus
    for array in (topo.domain_of, topo.local_of, topo.rail_of, topo.leaf_of):
        assert array.dtype == np.int32 and array.shape == (topo.n_gpus,)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_names_a_hardware_preset(name):
    # The simulator looks the topology's GPU up among the hardware presets.
    assert hardware_preset(load_topology(name).gpu).bf16_tflops > 0


def nics_per_node(topo: Topology, domain: int = 0) -> int:
    """NIC links leaving the GPUs of one NVLink domain (node)."""
    return sum(
        1
        for u, v, kind in topo.graph.edges(data="kind")
        if kind == "nic" and u.startswith("gpu") and topo.graph.nodes[u]["domain"] == domain
    )


@pytest.mark.parametrize(("name", "gpu", "nvlink"), [(n, g, bw) for n, _, g, bw in DGX])
def test_dgx_node_is_one_nvlink_domain_of_8_without_nics(name, gpu, nvlink):
    topo = load_topology(name)
    assert (topo.gpu, topo.fabric_kind) == (gpu, "none")
    assert (topo.n_gpus, topo.n_domains, topo.max_gpus) == (8, 1, 8)
    assert topo.nvlink_bw_nominal == nvlink * GB
    # The efficiency is fitted (test_perfdb_models checks it against the fitted spec).
    eff = topo.spec.links.nvlink.efficiency
    assert 0.3 < eff < 1.0
    assert topo.nvlink_bw == pytest.approx(eff * nvlink * GB)
    assert summarize(topo)["nvlink_nominal_GBps"] == nvlink
    assert (topo.n_leaves, topo.n_spines, nics_per_node(topo)) == (0, 0, 0)
    assert {k for _, _, k in topo.graph.edges(data="kind")} == {"nvlink"}
    # Half the node talks to the other half over NVLink only.
    assert bisection_bandwidth(topo) == pytest.approx(4 * eff * nvlink * GB)
    with pytest.raises(InputError):
        load_topology(name, gpus=16)


@pytest.mark.parametrize("gpus", [16, 64])
@pytest.mark.parametrize(("name", "gpu", "nvlink"), [(s, g, bw) for _, s, g, bw in DGX])
def test_dgx_superpod_has_8_rails_of_400g_nics_per_node(name, gpu, nvlink, gpus):
    topo = load_topology(name, gpus=gpus)
    assert topo.gpu == gpu and topo.fabric_kind == "rail-optimized"
    assert (topo.n_gpus, topo.n_domains, topo.gpus_per_domain) == (gpus, gpus // 8, 8)
    assert topo.nvlink_bw_nominal == nvlink * GB
    # Eight 400 Gb/s (50 GB/s) ConnectX-7 per node, one per GPU, each on its own rail.
    assert topo.nic_bw_nominal == 50 * GB and topo.nic_bw == pytest.approx(45 * GB)
    for domain in range(topo.n_domains):
        assert nics_per_node(topo, domain) == 8
    assert topo.rails == 8
    np.testing.assert_array_equal(topo.rail_of, topo.local_of)
    # Up to 32 nodes share an SU: one leaf per rail; every leaf reaches all 16 spines.
    assert (topo.n_leaves, topo.n_spines) == (8, 16)
    # Non-blocking: half the nodes reach the other half at the full NIC rate.
    assert bisection_bandwidth(topo) == pytest.approx(gpus // 2 * 45 * GB)


@pytest.mark.parametrize("name", [s for _, s, _, _ in DGX])
def test_full_dgx_superpod_is_4_sus_of_32_nodes(name):
    topo = load_topology(name, gpus=1024)
    assert (topo.n_domains, topo.n_leaves, topo.n_spines) == (128, 32, 16)
    assert topo.max_gpus == 1024 and topo.domains_per_leaf == 32
    # GPU 8 * 33 + 2 sits in node 33 (second SU) on rail 2.
    assert topo.leaf_of[8 * 33 + 2] == 2 * 4 + 1
    np.testing.assert_allclose(topo.leaf_uplink_bw, 32 * 45 * GB)
    with pytest.raises(InputError) as err:
        load_topology(name, gpus=1032)
    assert err.value.allowed == "1..1024"


def test_b200_nvlink_is_twice_the_h100s_and_the_fabric_is_the_same():
    for node, pod in (("dgx-b200", "dgx-h100"), ("dgx-b200-superpod", "dgx-h100-superpod")):
        b200, h100 = load_topology(node), load_topology(pod)
        assert b200.nvlink_bw_nominal == 2 * h100.nvlink_bw_nominal
        assert b200.nic_bw == h100.nic_bw
    h200 = load_topology("dgx-h200-superpod")
    assert h200.nvlink_bw_nominal == load_topology("dgx-h100-superpod").nvlink_bw_nominal
    assert load_topology("dgx-h100-superpod").gpu == "h100"


def test_h800_cluster_at_64_gpus_has_8_nodes_on_8_planes():
    topo = load_topology("h800-cluster", gpus=64)
    assert (topo.n_gpus, topo.n_domains, topo.rails) == (64, 8, 8)
    assert topo.multi_plane and topo.fabric_kind == "multi-plane"
    np.testing.assert_array_equal(topo.rail_of, topo.local_of)
    np.testing.assert_array_equal(topo.domain_of, np.arange(64) // 8)
    # One leaf per plane holds all 8 nodes: no spines needed.
    assert (topo.n_leaves, topo.n_spines) == (8, 0)
    assert topo.graph.nodes["gpu13"] == {
        "kind": "gpu",
        "domain": 1,
        "local": 5,
        "rail": 5,
        "leaf": int(topo.leaf_of[13]),
    }


@pytest.mark.parametrize("gpus", [64, 2048])
def test_planes_of_the_multi_plane_fabric_never_meet(gpus):
    topo = load_topology("h800-cluster", gpus=gpus)
    switches = [n for n, k in topo.graph.nodes(data="kind") if k in ("leaf", "spine")]
    fabric = topo.graph.subgraph(switches)
    rail0 = {f"leaf{leaf}" for leaf in topo.leaf_of[topo.rail_of == 0]}
    rail1 = {f"leaf{leaf}" for leaf in topo.leaf_of[topo.rail_of == 1]}
    assert rail0 and rail1
    for a in rail0:
        for b in rail1:
            assert not nx.has_path(fabric, a, b)
    for plane, spines in enumerate(topo.plane_spines):
        for s in spines:
            leaves = {int(n[len("leaf") :]) for n in topo.graph.predecessors(f"spine{s}")}
            assert {int(topo.leaf_rail[leaf]) for leaf in leaves} == {plane}


def test_full_h800_cluster_builds_fast_with_spines():
    start = time.perf_counter()
    topo = load_topology("h800-cluster", gpus=2048)
    assert time.perf_counter() - start < 2.0
    assert (topo.n_domains, topo.n_leaves, topo.n_spines) == (256, 64, 32)
    assert len(topo.plane_spines) == 8 and all(len(s) == 4 for s in topo.plane_spines)
    # Non-blocking: each leaf's uplinks carry what its 32 NICs can send.
    np.testing.assert_allclose(topo.leaf_uplink_bw, 32 * 45 * GB)


def test_rail_optimized_leaves_reach_every_spine():
    topo = load_topology("dgx-h100-superpod", gpus=512)
    assert (topo.n_domains, topo.n_leaves, topo.n_spines) == (64, 16, 16)
    assert not topo.multi_plane and topo.plane_spines == ()
    for leaf in range(topo.n_leaves):
        assert sum(1 for n in topo.graph.successors(f"leaf{leaf}") if n.startswith("spine")) == 16
    # GPU 8 * 33 + 2 sits in node 33 (second SU) on rail 2.
    assert topo.leaf_of[8 * 33 + 2] == 2 * 2 + 1


def test_a_single_partial_domain_is_allowed():
    topo = load_topology("h800-node", gpus=4)
    assert (topo.n_gpus, topo.n_domains) == (4, 1)
    assert bisection_bandwidth(topo) == pytest.approx(2 * 160 * GB)


def test_more_gpus_than_the_cluster_has_is_refused():
    with pytest.raises(InputError) as err:
        load_topology("h800-cluster", gpus=2056)
    assert err.value.field == "gpus" and err.value.source == "h800-cluster"
    assert err.value.allowed == "1..2048"
    assert "more than the topology has" in str(err.value)


@pytest.mark.parametrize("gpus", [0, -8, 2.5, "64"])
def test_nonsense_gpu_counts_are_refused(gpus):
    with pytest.raises(InputError) as err:
        load_topology("h800-cluster", gpus=gpus)
    assert err.value.field == "gpus"


def test_partial_nodes_across_domains_are_refused():
    with pytest.raises(InputError) as err:
        load_topology("h800-cluster", gpus=12)
    assert err.value.field == "gpus"
    assert "partial domain" in str(err.value)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(InputError) as err:
        load_topology("h900-cluster")
    assert err.value.allowed == ", ".join(PRESETS)


def test_missing_file_names_the_file(tmp_path):
    path = str(tmp_path / "nowhere.yaml")
    with pytest.raises(InputError) as err:
        load_topology(path)
    assert err.value.source == path


def test_broken_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("schema: moesim.topology/1\nlinks: {nvlink: [1, 2\n")
    with pytest.raises(InputError) as err:
        load_topology(str(path))
    assert err.value.source == str(path)
    assert "broken YAML" in str(err.value)


def test_unknown_field_names_file_field_and_allowed_keys(tmp_path):
    path = write_topology(tmp_path, extra="  spine_count: 3\n")
    with pytest.raises(InputError) as err:
        load_topology(path)
    assert err.value.source == path
    assert err.value.field == "fabric.spine_count"
    assert "spines" in err.value.allowed.split(", ")


def test_wrong_type_names_the_dotted_field(tmp_path):
    path = write_topology(tmp_path)
    text = Path(path).read_text().replace("bandwidth_GBps: 200", "bandwidth_GBps: fast")
    Path(path).write_text(text)
    with pytest.raises(InputError) as err:
        load_topology(path)
    assert err.value.field == "links.nvlink.bandwidth_GBps"


def test_missing_field_and_wrong_kind_are_named(tmp_path):
    path = write_topology(tmp_path)
    Path(path).write_text(Path(path).read_text().replace("gpu: h800\n", ""))
    with pytest.raises(InputError) as err:
        load_topology(path)
    assert err.value.field == "gpu" and "missing" in str(err.value)

    path = write_topology(tmp_path, kind="fat-tree")
    with pytest.raises(InputError) as err:
        load_topology(path)
    assert err.value.field == "fabric.kind" and "multi-plane" in err.value.allowed


def test_fields_of_the_other_fabric_kind_are_refused(tmp_path):
    path = write_topology(tmp_path, extra="  spines_per_plane: 2\n")
    with pytest.raises(InputError) as err:
        load_topology(path)
    assert err.value.field == "fabric.spines_per_plane"


def test_rails_must_divide_the_domain(tmp_path):
    path = write_topology(tmp_path, gpus_per_domain=6, rails=4, max_gpus=60)
    with pytest.raises(InputError) as err:
        load_topology(path)
    assert err.value.field == "fabric.rails" and err.value.allowed == "1, 2, 3, 6"


def test_h800_node_bisection_is_half_the_node_over_nvlink():
    topo = load_topology("h800-node")
    assert bisection_bandwidth(topo) == pytest.approx(4 * 160 * GB)
    assert summarize(topo)["bisection_GBps"] == pytest.approx(640)


def test_non_blocking_two_leaf_cluster_bisection_is_half_the_nics(tmp_path):
    # 4 domains of 2 GPUs, 2 domains per leaf: the halves sit on different leaves.
    topo = load_topology(write_topology(tmp_path), gpus=8)
    assert (topo.n_leaves, topo.n_spines) == (2, 2)
    assert bisection_bandwidth(topo) == pytest.approx(4 * 45 * GB)


def test_oversubscription_two_halves_traffic_across_spines(tmp_path):
    topo = load_topology(write_topology(tmp_path, oversubscription=2.0), gpus=8)
    assert bisection_bandwidth(topo) == pytest.approx(2 * 45 * GB)
    np.testing.assert_allclose(topo.leaf_uplink_bw, 2 * 45 * GB)
    assert summarize(topo)["oversubscription"] == 2.0


def test_oversubscription_does_not_matter_when_halves_share_a_leaf(tmp_path):
    # One leaf holds all four domains: nothing crosses the spines.
    topo = load_topology(write_topology(tmp_path, domains_per_leaf=4, oversubscription=2.0), gpus=8)
    assert (topo.n_leaves, topo.n_spines) == (1, 0)
    assert bisection_bandwidth(topo) == pytest.approx(4 * 45 * GB)


def test_rail_optimized_builds_spines_for_cross_rail_traffic(tmp_path):
    topo = load_topology(write_topology(tmp_path, rails=2, domains_per_leaf=4), gpus=8)
    assert (topo.n_leaves, topo.n_spines) == (2, 2)
    plane = load_topology(
        write_topology(tmp_path, kind="multi-plane", rails=2, domains_per_leaf=4), gpus=8
    )
    assert (plane.n_leaves, plane.n_spines) == (2, 0)


@pytest.mark.parametrize(
    "case",
    [
        ("h800-node", 8, {}),
        ("h800-cluster", 64, {}),
        ("dgx-h100-superpod", 64, {}),
        ("dgx-b200-superpod", 64, {}),
        ("gb200-nvl72", 144, {}),
        ("tiny", 8, {}),
        ("tiny", 12, {"oversubscription": 3.0}),
        (
            "tiny",
            24,
            {
                "kind": "multi-plane",
                "rails": 2,
                "domains_per_leaf": 2,
                "spines": 3,
                "gpus_per_domain": 4,
                "oversubscription": 1.5,
            },
        ),
        ("tiny", 3, {"rails": 2, "gpus_per_domain": 4}),
    ],
)
def test_aggregated_bisection_equals_full_graph_max_flow(tmp_path, case):
    name, gpus, options = case
    topo = load_topology(write_topology(tmp_path, **options) if name == "tiny" else name, gpus=gpus)
    full = bisection_bandwidth(topo, aggregate=False)
    assert full > 0
    assert bisection_bandwidth(topo) == pytest.approx(full, rel=1e-12)


def test_bisection_of_the_full_h800_cluster_is_fast_and_non_blocking():
    topo = load_topology("h800-cluster", gpus=2048)
    start = time.perf_counter()
    bisection = bisection_bandwidth(topo)
    assert time.perf_counter() - start < 2.0
    assert bisection == pytest.approx(1024 * 45 * GB)


def test_summary_reports_per_gpu_bandwidths_and_link_classes():
    summary = summarize(load_topology("h800-cluster", gpus=2048))
    assert summary["nvlink_nominal_GBps"] == 200 and summary["nvlink_achievable_GBps"] == 160
    assert summary["nic_nominal_GBps"] == 50 and summary["nic_achievable_GBps"] == 45
    assert (summary["n_gpus"], summary["n_domains"], summary["rails"]) == (2048, 256, 8)
    links = {c["kind"]: c for c in summary["links"]}
    assert links["nvlink"]["count"] == 2 * 2048 and links["nic"]["count"] == 2 * 2048
    # 32 NICs x 50 GB/s per leaf, spread over the 4 spines of its plane.
    assert links["uplink"]["bandwidth_GBps"] == 400 and links["uplink"]["count"] == 2 * 64 * 4
    assert links["nic"]["latency_us"] == 1.0
    assert summary["bisection_GBps"] == pytest.approx(1024 * 45)
    assert json.loads(json.dumps(summary)) == summary


def test_topology_is_read_only():
    topo = load_topology("h800-cluster")
    with pytest.raises(nx.NetworkXError):
        topo.graph.add_edge("gpu0", "gpu1")
    with pytest.raises(ValueError):
        topo.rail_of[0] = 3


@pytest.mark.parametrize("name", PRESETS)
def test_figure_draws_each_preset(tmp_path, name):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from moesim.topologies.draw import figure

    fig = figure(load_topology(name))
    assert isinstance(fig, Figure)
    out = tmp_path / f"{name}.png"
    fig.savefig(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_big_cluster_figure_says_it_shows_a_sample():
    from moesim.topologies.draw import figure

    fig = figure(load_topology("h800-cluster", gpus=2048))
    assert "showing 8 of 256 domains" in fig.axes[0].get_title()


def _h800_with(tmp_path, *changes: tuple[str, str]) -> str:
    text = Path("topologies/h800-cluster.yaml").read_text()
    for old, new in changes:
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "t.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(("changes", "needle"), [
    ([("max_gpus: 2048", "max_gpus: 1000000000000")],
     "max_gpus: input should be less than or equal to 65536"),
    ([("default_gpus: 64", "default_gpus: 3200000000")], "default_gpus: input should be less"),
    ([("gpus_per_domain: 8", "gpus_per_domain: 100000")], "gpus_per_domain: input should be"),
    ([("spines_per_plane: 4", "spines_per_plane: 1000000")], "spines_per_plane: input should"),
    ([("max_gpus: 2048", "max_gpus: 65536"), ("spines_per_plane: 4", "spines_per_plane: 4096")],
     "fabric.spines_per_plane: 8,388,608 leaf-spine links at max_gpus 65,536"),
    ([("max_gpus: 2048", "max_gpus: 65536")], "gpus: 3200000000 GPUs is more than the "
                                              "topology has (65536)"),
])
def test_topology_sizes_are_bounded_by_the_gpu_limit(tmp_path, changes, needle):
    from typer.testing import CliRunner

    from moesim.cli.main import app

    path = _h800_with(tmp_path, *changes)
    result = CliRunner().invoke(app, ["topo", "show", path, "--gpus", "3200000000"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"moesim: error: {path}: "), result.output
    assert needle in lines[0]


def test_the_topology_gpu_limit_is_the_scenarios():
    from moesim.config.parallel import MAX_GPUS
    from moesim.topologies.spec import MAX_GPUS as TOPOLOGY_MAX_GPUS

    assert TOPOLOGY_MAX_GPUS == MAX_GPUS
