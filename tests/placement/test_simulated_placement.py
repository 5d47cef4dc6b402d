"""Placement as a what-if axis of a simulated step: redundant experts even out the GPUs
that skewed routing overloads, and the scenario refuses placements that cannot be."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import moesim
from moesim import InputError

REPO = Path(__file__).resolve().parents[2]
SKEWED = ["model.num_layers=5", "parallel.tokens_per_gpu=512", "routing.layer_samples=2",
          "routing.assignment=zipf", "routing.zipf_exponent=1.0"]
TRACE = REPO / "examples" / "dsmoe16b-trace.yaml"


def run(*overrides, path=None):
    return moesim.simulate(moesim.load_scenario(path, overrides=list(overrides))).summary


def test_redundant_experts_even_out_a_skewed_synthetic_step():
    plain = run(*SKEWED)
    placed = run(*SKEWED, "placement.policy=eplb-hierarchical",
                 "placement.redundant_experts=64")
    assert placed["placement"] == "eplb-hierarchical" and placed["redundant_experts"] == 64
    assert placed["max_over_mean_gpu_load"] < 0.5 * plain["max_over_mean_gpu_load"]
    assert placed["step_time_s"] < 0.7 * plain["step_time_s"]
    # The hierarchical policy keeps each node-limited group on its node: no extra RDMA.
    assert placed["rdma_bytes"] == pytest.approx(plain["rdma_bytes"], rel=0.05)
    anywhere = run(*SKEWED, "placement.policy=eplb-global", "placement.redundant_experts=64")
    assert anywhere["rdma_bytes"] > 1.2 * plain["rdma_bytes"]


@pytest.mark.parametrize("loads", ["window", "trace"])
def test_redundant_experts_even_out_a_replayed_trace(loads):
    plain = run(path=TRACE)
    placed = run("placement.policy=eplb-global", "placement.redundant_experts=16",
                 f"placement.loads={loads}", path=TRACE)
    assert placed["max_over_mean_gpu_load"] < plain["max_over_mean_gpu_load"] - 0.1
    assert placed["step_time_s"] < plain["step_time_s"]


def test_loads_from_a_file(tmp_path):
    trace = moesim.RoutingTrace.load(REPO / "traces" / "samples" / "tiny-v1.npz")
    rows = [np.bincount(layer[layer >= 0], minlength=trace.num_experts)
            for layer in trace.expert_ids.astype(int)]
    path = tmp_path / "loads.csv"
    path.write_text("\n".join(",".join(map(str, row)) for row in rows) + "\n")
    from_file = run("placement.policy=eplb-global", "placement.redundant_experts=16",
                    f"placement.loads={path}", path=TRACE)
    from_trace = run("placement.policy=eplb-global", "placement.redundant_experts=16",
                     "placement.loads=trace", path=TRACE)
    assert from_file["step_time_s"] == from_trace["step_time_s"]
    path.write_text("1,2,3\n")
    with pytest.raises(InputError) as info:
        run("placement.policy=eplb-global", "placement.redundant_experts=16",
            f"placement.loads={path}", path=TRACE)
    assert info.value.source == str(path) and "64" in info.value.allowed


@pytest.mark.parametrize("cf", [0.8, 1.0, 1.25])
def test_tokens_are_conserved_on_replicated_slots(cf):
    s = run(*SKEWED, "placement.policy=eplb-hierarchical", "placement.redundant_experts=64",
            f"routing.capacity_factor={cf}")
    assert s["tokens_dispatched"] == s["tokens_computed"] + s["tokens_dropped"]
    if cf < 1:
        assert s["tokens_dropped"] > 0


def test_any_expert_count_that_fills_the_slots_works():
    """12 experts on EP8: refused as they are, fine with 4 redundant slots (2 per GPU)."""
    base = ["model.routed_experts=12", "model.top_k=2", "model.expert_groups=null",
            "model.topk_groups=null", "routing.max_devices=null", "parallel.ep=8",
            "model.num_layers=4", "parallel.tokens_per_gpu=256"]
    with pytest.raises(InputError) as info:
        moesim.load_scenario(overrides=base)
    assert info.value.field == "parallel.ep" and "eplb" in info.value.allowed
    s = run(*base, "placement.policy=eplb-global", "placement.redundant_experts=4")
    assert s["tokens_dispatched"] == s["tokens_computed"] > 0


@pytest.mark.parametrize("overrides, field", [
    (["placement.redundant_experts=64"], "placement.redundant_experts"),
    (["placement.policy=eplb-global", "placement.redundant_experts=10"],
     "placement.redundant_experts"),
    (["placement.policy=eplb-global", "placement.loads=trace"], "placement.loads"),
    (["placement.policy=eplb-global", "placement.loads=loads.csv"], "placement.loads"),
    (["placement.policy=eplb-hierarchical", "routing.max_devices=null",
      "model.expert_groups=null", "parallel.ep=48", "parallel.gpus=48",
      "placement.redundant_experts=32"], "placement.policy"),
])
def test_impossible_placements_name_the_field(overrides, field):
    with pytest.raises(InputError) as info:
        moesim.load_scenario(overrides=overrides)
    assert info.value.field == field and info.value.source == "--set"
