"""Stories about the catalogues: every dispatch kernel and every gate is one row, and
everything that names kernels or gates (scenarios, traffic, the hardware spec, the
torch layers, the capture command) reads that row."""

from __future__ import annotations

import dataclasses
import typing

import numpy as np
import pytest

import moesim
from moesim import InputError
from moesim.cli import capture
from moesim.comm.traffic import _ROUTES, bytes_per_copy, dispatch_loads
from moesim.config import hardware, kernels
from moesim.config.gates import GATE_NAMES, GATES, SCENARIO_GATES
from moesim.config.kernels import DISPATCH_KERNELS, KERNEL_NAMES, DispatchKernel, Route
from moesim.config.loading import hardware_preset
from moesim.routing.batch import RoutedBatch, count_batch
from moesim.topologies import load_topology
from moesim.traces.layers import GATE_KINDS, GateConfig
from moesim.traces.model import default_gate_config

SMALL = ["model.num_layers=4", "parallel.tokens_per_gpu=256", "routing.layer_samples=1"]


def test_every_route_a_kernel_can_name_moves_copies():
    assert set(_ROUTES) == set(typing.get_args(Route))
    assert {k.route for k in DISPATCH_KERNELS.values()} <= set(_ROUTES)


def test_every_kernel_names_a_fitted_field_of_the_hardware_spec():
    spec = hardware_preset("h100")
    for kernel in DISPATCH_KERNELS.values():
        fitted = getattr(spec, kernel.overhead_field)
        assert spec.comm_overhead_s(kernel.name) == pytest.approx(fitted * 1e-6)


def test_a_kernel_without_a_hardware_field_fails_when_moesim_loads(monkeypatch):
    broken = DispatchKernel(name="my-kernel", summary="", route="per-gpu",
                            overhead_field="my_kernel_overhead_us")
    monkeypatch.setitem(kernels.DISPATCH_KERNELS, "my-kernel", broken)
    with pytest.raises(RuntimeError, match="my-kernel.*my_kernel_overhead_us"):
        hardware._check_kernel_fields()


def test_a_new_kernel_is_one_row(monkeypatch):
    """A kernel that moves copies like NCCL but adds a header: one row, and the traffic
    and byte counts follow it."""
    row = DispatchKernel(name="my-alltoall", summary="", route="per-gpu",
                         dispatch_header_bytes=32, overhead_field="nccl_latency_us")
    monkeypatch.setitem(kernels.DISPATCH_KERNELS, row.name, row)
    topo = load_topology("h800-cluster", gpus=16)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, size=(16 * 8, 1))
    counts = count_batch(RoutedBatch(ids_tk=ids, kept_tk=np.ones(ids.shape, dtype=bool),
                                     tokens_per_rank=8), n_experts=64, ep=16, gpus_per_node=8)
    where = dict(topology=topo, first_gpu=0, gpus_per_node=8)
    mine = dispatch_loads(counts, kernel=row.name, **where)
    nccl = dispatch_loads(counts, kernel="nccl-alltoall", **where)
    assert all(np.array_equal(getattr(mine, f.name), getattr(nccl, f.name))
               for f in dataclasses.fields(mine))
    assert bytes_per_copy(row.name, hidden=128, dtype="bf16", dispatch=True) == 256 + 32
    assert bytes_per_copy(row.name, hidden=128, dtype="bf16", dispatch=False) == 256


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_a_scenario_may_name_every_kernel(kernel):
    scenario = moesim.load_scenario(overrides=[*SMALL, f"parallel.dispatch_kernel={kernel}"])
    assert moesim.simulate(scenario).summary["dispatch_kernel"] == kernel


def test_an_unknown_kernel_lists_the_catalogue():
    with pytest.raises(InputError) as info:
        moesim.load_scenario(overrides=["parallel.dispatch_kernel=foo"])
    assert info.value.field == "parallel.dispatch_kernel"
    assert all(name in info.value.allowed for name in KERNEL_NAMES)


def test_scenarios_route_with_the_deepseek_gates_and_capture_trains_every_gate():
    assert SCENARIO_GATES == ("softmax-topk", "device-limited", "group-limited-sigmoid")
    assert GATE_KINDS == GATE_NAMES == capture.GATES
    with pytest.raises(InputError) as info:
        moesim.load_scenario(overrides=["routing.gate=switch-top1"])
    assert all(name in info.value.allowed for name in SCENARIO_GATES)


@pytest.mark.parametrize("name", GATE_NAMES)
def test_every_gate_has_a_torch_layer_with_its_properties(name):
    gate = GATES[name]
    config = default_gate_config(name, num_experts=8, top_k=3)
    assert config.kind == name
    assert config.top_k == (gate.fixed_top_k or 3)
    if gate.fixed_top_k is not None:
        with pytest.raises(InputError, match="top_k"):
            GateConfig(kind=name, num_experts=8, top_k=gate.fixed_top_k + 1)
    if gate.fixed_weights:
        with pytest.raises(InputError, match="fixes its weights"):
            GateConfig(kind=name, num_experts=8, top_k=config.top_k, scale=2.0)
