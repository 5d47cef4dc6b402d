"""The planner: its winner is the brute-force optimum, it never picks a setup that does
not fit, and its bounds never cut off a setup that could have won."""

from __future__ import annotations

import pytest

from moesim.config.loading import load_scenario
from moesim.memory.model import memory_per_gpu
from moesim.planning.bounds import step_bound
from moesim.planning.search import search
from moesim.planning.spec import parse_plan
from moesim.simulation import simulate
from moesim.sweep.run import simulate_point

BASE = {"model": {"preset": "deepseek-v2-lite", "num_layers": 4}, "topology": "h800-cluster",
        "parallel": {"ep": 8, "tokens_per_gpu": 512}, "routing": {"layer_samples": 1}}


def serial(points):
    return ((p, simulate_point(p)) for p in points)


def brute_force(result):
    """Every point simulated, the cheapest that fits and meets the target."""
    plan = result.plan
    best = None
    for c in result.candidates:
        if c.point.scenario is None or c.status in ("memory", "constraint"):
            continue
        row = simulate_point(c.point)
        cost = plan.cost.of(row["gpus"], row["tokens_per_s"])
        meets = all(row[k] >= v if k.startswith("tokens") else row[k] <= v
                    for k, v in plan.target.given().items())
        if meets and (best is None or (cost, -row["tokens_per_s"]) < best[0]):
            best = ((cost, -row["tokens_per_s"]), c.point.index)
    return best


@pytest.mark.parametrize("plan_fields", [
    {"target": {"tokens_per_s": 700_000}, "cost": {"metric": "gpus"}},
    {"target": {"step_time_s": 0.1}, "cost": {"metric": "gpu_hours", "token_budget": 1e9}},
    {"cost": {"metric": "dollars", "token_budget": 1e9, "price_per_gpu_hour": 2.0}},
])
def test_the_winner_is_the_brute_force_optimum(plan_fields):
    plan = parse_plan({"base": BASE, "search": {"parallel.gpus": [8, 16],
                                                "parallel.ep": [8, 16],
                                                "routing.capacity_factor": [None, 1.0]},
                       **plan_fields}, source="p.yaml")
    result = search(plan, source="p.yaml", run_batch=serial)
    best = brute_force(result)
    assert result.winner is not None and best is not None
    assert result.winner.point.index == best[1]
    assert result.simulated < len(result.candidates)  # it pruned something


def test_a_setup_that_does_not_fit_is_never_the_winner():
    # DeepSeek-V3 decode on H800s: EP8 holds 32 experts a layer (76 GiB of FP8 weights
    # alone), EP64 four; the much faster-looking EP8 is dropped before simulating.
    plan = parse_plan({
        "set": ["mode=decode", "parallel.tokens_per_gpu=null", "routing.max_devices=null",
                "serving={batch: 64, isl: 1024, osl: 1024}"],
        "search": {"parallel.ep": [8, 64]}, "cost": {"metric": "gpus"}}, source="p.yaml")
    result = search(plan, source="p.yaml", run_batch=serial)
    statuses = {c.point.values["parallel.ep"]: c.status for c in result.candidates}
    assert statuses[8] == "memory"
    assert result.winner is not None and result.winner.point.values["parallel.ep"] == 64
    assert result.winner.row["fits_in_memory"]


def test_nothing_fits_says_so_with_the_smallest_need():
    plan = parse_plan({"search": {"parallel.ep": [64]}, "set": ["parallel.gpus=64"]},
                      source="p.yaml")
    result = search(plan, source="p.yaml", run_batch=serial)
    assert result.winner is None and result.simulated == 0
    assert "No setup fits in GPU memory" in " ".join(result.explanation)


@pytest.mark.parametrize("overrides", [
    [],
    ["parallel.ep=32"],
    ["parallel.micro_batches=1"],
    ["routing.capacity_factor=1.0"],
    ["mode=inference"],
    ["routing.assignment=zipf", "routing.zipf_exponent=1.2"],
    ["placement.policy=eplb-global", "placement.redundant_experts=64"],
    ["mode=prefill", "parallel.tokens_per_gpu=null", "serving={batch: 2, isl: 1024, osl: 64}"],
    ["mode=decode", "parallel.tokens_per_gpu=null", "serving={batch: 64, isl: 1024, osl: 64}",
     "parallel.moe_tp=2", "parallel.ep=32", "parallel.gpus=64"],
])
def test_the_step_bound_never_exceeds_the_simulated_step(overrides):
    scenario = load_scenario(None, overrides=["model.num_layers=6",
                                              "parallel.tokens_per_gpu=512", *overrides])
    bound = step_bound(scenario)
    summary = simulate(scenario).summary
    assert 0 < bound.step_s <= summary["step_time_s"]
    assert bound.tokens == summary["tokens_per_step"]


def test_memory_is_screened_with_the_same_model_the_summary_reports():
    scenario = load_scenario(None, overrides=["model.num_layers=4",
                                              "parallel.tokens_per_gpu=256"])
    assert simulate(scenario).summary["memory_gib_per_gpu"] == pytest.approx(
        memory_per_gpu(scenario).total_gib)
