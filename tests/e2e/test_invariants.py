"""Invariants every simulated step obeys, checked through ``moesim.simulate``.

The engine's promises: bytes sent = bytes received per link class; tokens dispatched =
tokens computed + tokens dropped; no span ends before it starts; the same seed gives
the same result. "Tokens" in the summary's counts are (token, expert) assignments of
the forward pass, summed over MoE layers and EP groups.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moesim
from moesim.config.kernels import KERNEL_NAMES

# (topology, GPUs per node, EP sizes that fit it)
LAYOUTS = [("h800-cluster", 8, (8, 16)), ("dgx-h100-superpod", 8, (16,)), ("h800-node", 8, (4, 8))]


def small_scenario(
    *,
    kernel: str = "deepep-normal",
    mode: str = "train",
    topology: str = "h800-cluster",
    ep: int = 16,
    groups: int = 1,
    tokens_per_gpu: int = 64,
    micro_batches: int = 1,
    num_layers: int = 3,
    seed: int = 0,
    **routing,
) -> moesim.Scenario:
    """DeepSeek-V2-Lite shapes (E = 64, K = 6, first layer dense), a few layers."""
    return moesim.scenario_from_dict({
        "name": "invariants",
        "mode": mode,
        "seed": seed,
        "model": {"preset": "deepseek-v2-lite", "num_layers": num_layers},
        "topology": topology,
        "parallel": {"ep": ep, "gpus": ep * groups, "tokens_per_gpu": tokens_per_gpu,
                     "micro_batches": micro_batches, "dispatch_kernel": kernel,
                     "dispatch_dtype": "fp8"},
        "routing": {"gate": "softmax-topk", **routing},
    })


def check_invariants(result: moesim.SimResult) -> None:
    sc, s = result.scenario, result.summary
    m, p = sc.model, sc.parallel

    # Tokens: every forward assignment is either computed or dropped.
    assignments = m.moe_layers * p.total_gpus * p.tokens_per_gpu * m.top_k
    assert s["tokens_dispatched"] == assignments
    assert s["tokens_dispatched"] == s["tokens_computed"] + s["tokens_dropped"]
    assert s["dropped_token_fraction"] == pytest.approx(s["tokens_dropped"] / assignments)
    if sc.routing.capacity_factor is None:
        assert s["tokens_dropped"] == 0

    # The experts table adds up to the summary, layer by layer.
    experts = result.experts
    assert len(experts) == m.moe_layers * m.routed_experts
    assert sorted(experts["layer"].unique()) == list(range(m.first_dense_layers, m.num_layers))
    assert experts["tokens"].sum() == s["tokens_computed"]
    assert experts["dropped"].sum() == s["tokens_dropped"]
    per_layer = experts.groupby("layer")[["tokens", "dropped"]].sum().sum(axis=1)
    assert (per_layer == p.total_gpus * p.tokens_per_gpu * m.top_k).all()
    assert (experts[["tokens", "dropped"]] >= 0).all().all()

    # Spans: nothing ends before it starts or starts before its GPU got there.
    spans = result.spans
    assert (spans["end_s"] >= spans["start_s"]).all()
    assert (spans["start_s"] >= spans["arrive_s"]).all()
    assert (spans["arrive_s"] >= 0).all()
    assert s["step_time_s"] == pytest.approx(spans["end_s"].max())
    assert set(spans["gpu"]) == set(range(p.total_gpus))

    # Links: bytes out of GPUs = bytes into GPUs per class; up = down on the uplinks.
    links = result.links
    from_gpu = links["src"].str.startswith("gpu")
    to_gpu = links["dst"].str.startswith("gpu")
    for kind in ("nvlink", "nic"):
        of_kind = links["kind"] == kind
        sent = links.loc[of_kind & from_gpu, "bytes"].sum()
        received = links.loc[of_kind & to_gpu, "bytes"].sum()
        assert sent == pytest.approx(received, rel=1e-12)
    uplinks = links["kind"] == "uplink"
    up = links.loc[uplinks & links["src"].str.startswith("leaf"), "bytes"].sum()
    down = links.loc[uplinks & links["src"].str.startswith("spine"), "bytes"].sum()
    assert up == pytest.approx(down, rel=1e-12)
    assert (links["bytes"] >= 0).all() and (links["busy_s"] >= 0).all()
    # The summary counts each byte once, on the GPU link it leaves by.
    nvlink_sent = links.loc[(links["kind"] == "nvlink") & from_gpu, "bytes"].sum()
    rdma_sent = links.loc[(links["kind"] == "nic") & from_gpu, "bytes"].sum()
    assert s["nvlink_bytes"] == pytest.approx(nvlink_sent)
    assert s["rdma_bytes"] == pytest.approx(rdma_sent)

    for key in ("step_time_s", "tokens_per_s", "dispatch_time_s", "combine_time_s",
                "expert_compute_time_s", "attention_time_s", "comm_exposed_time_s", "mfu",
                "max_over_mean_gpu_load"):
        assert math.isfinite(s[key]) and s[key] >= 0, key
    assert s["max_over_mean_gpu_load"] >= 1.0


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("mode", ["train", "inference"])
def test_invariants_for_each_kernel_and_mode(kernel, mode):
    """Two EP groups of 16 on four H800 nodes, two micro-batches, Zipf routing, a
    capacity factor: the invariants hold for every kernel, training or inference."""
    result = moesim.simulate(small_scenario(
        kernel=kernel, mode=mode, ep=16, groups=2, micro_batches=2, assignment="zipf",
        zipf_exponent=1.0, capacity_factor=1.1))
    check_invariants(result)
    assert result.summary["ep_groups"] == 2
    assert result.summary["rdma_bytes"] > 0 and result.summary["nvlink_bytes"] > 0
    assert result.summary["tokens_dropped"] > 0  # Zipf hot spots overflow cf 1.1
    spans = result.spans
    assert spans["backward"].any() == (mode == "train")


@st.composite
def scenarios(draw):
    topology, per_node, eps = draw(st.sampled_from(LAYOUTS))
    ep = draw(st.sampled_from(eps))
    groups = 1 if topology == "h800-node" and ep == 8 else draw(st.integers(1, 2))
    nodes = max(1, ep // per_node)
    routing = {"assignment": draw(st.sampled_from(["uniform", "zipf"]))}
    if routing["assignment"] == "zipf":
        routing["zipf_exponent"] = draw(st.sampled_from([0.5, 1.0, 2.0]))
    if draw(st.booleans()):
        routing["capacity_factor"] = draw(st.sampled_from([0.5, 0.9, 1.0, 1.25, 2.0]))
        routing["drop_policy"] = draw(st.sampled_from(["probs", "position"]))
    if draw(st.booleans()):
        scope = draw(st.sampled_from(["node", "device"]))
        units, per_unit = (nodes, 64 // nodes) if scope == "node" else (ep, 64 // ep)
        low = -(-6 // per_unit)
        if low <= units:
            routing["max_devices"] = draw(st.integers(low, units))
            routing["limit_scope"] = scope
    micro_batches = draw(st.sampled_from([1, 2]))
    return small_scenario(
        kernel=draw(st.sampled_from(KERNEL_NAMES)),
        mode=draw(st.sampled_from(["train", "inference"])),
        topology=topology, ep=ep, groups=groups,
        tokens_per_gpu=draw(st.sampled_from([16, 32, 64])) * micro_batches,
        micro_batches=micro_batches,
        num_layers=draw(st.integers(2, 4)),
        seed=draw(st.integers(0, 1000)),
        layer_samples=draw(st.sampled_from([None, 1, 2])),
        **routing,
    )


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios())
def test_invariants_hold_for_random_small_scenarios(scenario):
    check_invariants(moesim.simulate(scenario))


def test_same_seed_same_result_other_seed_other_routing():
    """The seed fixes everything: summary and all three tables repeat exactly; another
    seed routes differently (the per-expert loads change)."""
    scenario = small_scenario(assignment="zipf", capacity_factor=1.0, micro_batches=2,
                              groups=2, seed=7)
    a, b = moesim.simulate(scenario), moesim.simulate(scenario)
    assert a.summary == b.summary
    for table in ("spans", "links", "experts"):
        pd.testing.assert_frame_equal(getattr(a, table), getattr(b, table))

    other = moesim.simulate(small_scenario(assignment="zipf", capacity_factor=1.0,
                                           micro_batches=2, groups=2, seed=8))
    assert not np.array_equal(a.experts["tokens"], other.experts["tokens"])
    assert a.summary["tokens_dispatched"] == other.summary["tokens_dispatched"]


def test_capacity_below_one_drops_what_the_budget_cannot_hold():
    """cf = 0.8, uniform routing, EP 16, 64 tokens per GPU, K = 6: a micro-batch routes
    A = 16 x 64 x 6 = 6144 assignments and each GPU may keep ceil(0.8 x 6144 / 16) = 308
    of the ~384 it receives (all GPUs are far over budget), so exactly
    6144 - 16 x 308 = 1216 assignments per MoE layer are dropped (19.8%)."""
    result = moesim.simulate(small_scenario(capacity_factor=0.8, num_layers=3))
    check_invariants(result)
    s = result.summary
    assert s["tokens_dropped"] == 2 * (6144 - 16 * 308)
    assert s["dropped_token_fraction"] == pytest.approx(1216 / 6144)
    assert s["dropped_token_fraction"] >= 1 - 0.8 - 16 / 6144  # the general lower bound
    # The budget is per GPU: every GPU computes exactly 308 per layer.
    per_gpu = result.experts.assign(gpu=result.experts["expert"] // 4).groupby(
        ["layer", "gpu"])["tokens"].sum()
    assert (per_gpu == 308).all()


def test_generous_capacity_drops_nothing():
    result = moesim.simulate(small_scenario(capacity_factor=16.0))
    check_invariants(result)
    assert result.summary["tokens_dropped"] == 0
    assert result.summary["dropped_token_fraction"] == 0.0
