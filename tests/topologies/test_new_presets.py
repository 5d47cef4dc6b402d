"""Stories about the Blackwell Ultra topology presets: a DGX B300 node, the DGX B300
SuperPOD of NVIDIA's XDR reference architecture, and GB300 NVL72 racks."""

from __future__ import annotations

import numpy as np
import pytest

import moesim
from moesim.config.loading import hardware_preset
from moesim.errors import InputError
from moesim.topologies import Topology, load_topology, preset_names
from moesim.topologies.analysis import bisection_bandwidth

GB = 1e9
NEW = ["dgx-b300", "dgx-b300-superpod", "gb300-nvl72"]


def test_the_new_presets_are_shipped():
    assert set(NEW) <= set(preset_names())


@pytest.mark.parametrize("name", NEW)
def test_every_new_preset_loads_and_names_a_gpu_preset(name):
    topo = load_topology(name)
    assert isinstance(topo, Topology) and topo.name == name
    assert topo.n_gpus == topo.spec.default_gpus
    assert topo.spec.source
    assert hardware_preset(topo.gpu).bf16_tflops > 0
    assert topo.gpu in {"b300", "gb300"}
    # NVLink 5: 1.8 TB/s per GPU both ways.
    assert topo.nvlink_bw_nominal == 900 * GB


def test_dgx_b300_is_one_nvlink_domain_of_8_without_nics():
    topo = load_topology("dgx-b300")
    assert (topo.gpu, topo.fabric_kind, topo.n_gpus, topo.n_domains) == ("b300", "none", 8, 1)
    assert (topo.n_leaves, topo.n_spines) == (0, 0)
    # The NVLink efficiency is DGX B200's fit, carried over.
    assert topo.nvlink_bw == load_topology("dgx-b200").nvlink_bw
    with pytest.raises(InputError):
        load_topology("dgx-b300", gpus=16)


def test_dgx_b300_superpod_su_is_72_nodes_on_8_rails_of_800g():
    """RA-11339-001 Table 3: one SU = 72 DGX B300 = 576 GPUs behind 8 leaves (one per
    rail), non-blocking; 8 SUs = 4,608 GPUs, 64 leaves, 36 spines."""
    su = load_topology("dgx-b300-superpod")
    assert (su.n_gpus, su.n_domains, su.rails, su.gpus_per_domain) == (576, 72, 8, 8)
    assert su.nic_bw_nominal == 100 * GB and su.nic_bw == pytest.approx(90 * GB)
    np.testing.assert_array_equal(su.rail_of, su.local_of)
    assert su.n_leaves == 8 and su.domains_per_leaf == 72
    # Non-blocking: half the nodes reach the other half at the full NIC rate.
    assert bisection_bandwidth(su) == pytest.approx(576 // 2 * 90 * GB)
    full = load_topology("dgx-b300-superpod", gpus=4608)
    assert (full.n_domains, full.n_leaves, full.n_spines) == (576, 64, 36)
    np.testing.assert_allclose(full.leaf_uplink_bw, 72 * 90 * GB)
    with pytest.raises(InputError):
        load_topology("dgx-b300-superpod", gpus=4616)


def test_b300_doubles_the_b200_superpods_nic_and_keeps_its_nvlink():
    b300, b200 = load_topology("dgx-b300-superpod", gpus=64), load_topology(
        "dgx-b200-superpod", gpus=64)
    assert b300.nic_bw_nominal == 2 * b200.nic_bw_nominal
    assert b300.nvlink_bw_nominal == b200.nvlink_bw_nominal


def test_gb300_nvl72_racks_of_72_with_an_800g_nic_per_gpu():
    rack = load_topology("gb300-nvl72")
    assert (rack.gpu, rack.n_gpus, rack.n_domains, rack.gpus_per_domain) == ("gb300", 72, 1, 72)
    pod = load_topology("gb300-nvl72", gpus=576)
    assert (pod.n_domains, pod.rails, pod.max_gpus) == (8, 4, 576)
    assert pod.nic_bw_nominal == 100 * GB
    nvl72 = load_topology("gb200-nvl72", gpus=576)
    assert pod.nic_bw_nominal == 2 * nvl72.nic_bw_nominal
    # The same fabric shape as gb200-nvl72 (an assumption, see the preset).
    assert (pod.n_leaves, pod.n_spines) == (nvl72.n_leaves, nvl72.n_spines)
    assert pod.nvlink_bw == nvl72.nvlink_bw  # GB200's NVLink fit, carried over
    with pytest.raises(InputError):
        load_topology("gb300-nvl72", gpus=100)  # a partial second rack


@pytest.mark.parametrize(("topology", "model", "ep", "extra"), [
    ("dgx-b300", "qwen3-30b-a3b", 8, []),
    ("dgx-b300-superpod", "kimi-k2", 64, []),
    # Cut to 4 layers, GPT-OSS keeps every other one sliding.
    ("gb300-nvl72", "gpt-oss-120b", 64, ["model.sliding_window_layers=2"]),
])
def test_a_scenario_runs_on_each_new_topology(topology, model, ep, extra):
    """The topology brings its GPU preset; a short step simulates end to end."""
    s = moesim.load_scenario(overrides=[
        f"topology={topology}", f"model={model}", f"parallel.ep={ep}", "routing={}",
        "model.num_layers=4", "parallel.tokens_per_gpu=256", "routing.layer_samples=1",
        *extra])
    assert s.hardware.name == load_topology(topology).gpu
    result = moesim.simulate(s)
    assert result.summary["step_time_s"] > 0
