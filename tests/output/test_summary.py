"""The summary's keys are declared once (``moesim.output.summary.Summary``), documented
in docs/metrics.md, and every simulated step returns exactly its mode's keys."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import moesim
from moesim.output.summary import Summary, check_summary, summary_problem

REPO = Path(__file__).resolve().parents[2]
SMALL = ["model.num_layers=4", "parallel.tokens_per_gpu=256", "routing.layer_samples=1"]
SERVING = {"ttft_s", "input_tokens_per_s_per_gpu", "tpot_s", "output_tokens_per_s_per_gpu",
           "requests_per_step", "attention_dp", "attention_tp", "moe_tp", "isl", "osl",
           "kv_dtype", "attention_keys_per_token", "routed_tokens_per_gpu",
           "kv_cache_bytes_per_gpu", "attention_tp_allreduce_time_s",
           "moe_tp_allreduce_time_s"}


def documented_keys() -> set[str]:
    text = (REPO / "docs" / "metrics.md").read_text()
    table = text.split("## Summary keys", 1)[1].split("\n## ", 1)[0]
    first_cells = re.findall(r"^\| ([^|]+) \|", table, flags=re.M)
    return {key for cell in first_cells for key in re.findall(r"`(\w+)`", cell)}


def test_docs_metrics_documents_exactly_the_declared_keys():
    assert documented_keys() == set(Summary.__annotations__)


def test_a_training_step_has_the_required_keys_and_its_routing_detail():
    summary = moesim.simulate(moesim.load_scenario(overrides=SMALL)).summary
    assert summary.keys() == Summary.__required_keys__ | {"routing_draws", "max_devices"}


@pytest.mark.parametrize("example, own", [
    ("v3-prefill-h200.yaml", {"ttft_s", "input_tokens_per_s_per_gpu"}),
    ("v3-decode-h200.yaml", {"tpot_s", "output_tokens_per_s_per_gpu"}),
])
def test_a_serving_step_adds_its_mode_keys(example, own):
    scenario = moesim.load_scenario(REPO / "examples" / example,
                                    overrides=["model.num_layers=4"])
    keys = moesim.simulate(scenario).summary.keys()
    mode_keys = (SERVING - {"ttft_s", "input_tokens_per_s_per_gpu", "tpot_s",
                            "output_tokens_per_s_per_gpu"}) | own
    limit = {"max_devices"} if scenario.routing.max_devices is not None else set()
    assert keys == Summary.__required_keys__ | mode_keys | {"routing_draws"} | limit
    capped = moesim.simulate(moesim.load_scenario(overrides=[
        *SMALL, "routing.capacity_factor=1.0"])).summary
    assert capped["capacity_scope"] == "device" and capped["never_drop_fraction"] == 0


def test_an_undeclared_missing_or_mistyped_key_is_caught():
    summary = dict(moesim.simulate(moesim.load_scenario(overrides=SMALL)).summary)
    assert summary_problem(summary, most=1e100) is None
    assert check_summary(summary) is summary
    assert summary_problem({**summary, "step_time": 1.0}) == (
        "step_time", "one of the summary keys (docs/metrics.md)")
    assert summary_problem({k: v for k, v in summary.items() if k != "mfu"}) == (
        "mfu", "present")
    assert summary_problem({**summary, "tokens_dropped": 1.5}) == ("tokens_dropped",
                                                                   "an integer")
    assert summary_problem({**summary, "fits_in_memory": 1}) == ("fits_in_memory",
                                                                  "true or false")
    assert summary_problem({**summary, "memory_breakdown_gib": {"x": "1"}}) == (
        "memory_breakdown_gib", "a mapping of names to numbers")
    # The keys of one mode or feature come together, and synthetic routing names its draws.
    assert summary_problem({k: v for k, v in summary.items() if k != "routing_draws"}) == (
        "routing_draws", "present with routing_source synthetic")
    assert summary_problem({**summary, "capacity_factor": 1.0}) == (
        "capacity_scope", "present with capacity_factor")
    # Read back from a folder, a number must be finite and not absurdly large too.
    assert summary_problem({**summary, "mfu": float("inf")}) is None
    for wrong in (float("inf"), float("nan"), 1e101):
        assert summary_problem({**summary, "mfu": wrong}, most=1e100) == ("mfu", "a number")
    with pytest.raises(AssertionError, match="tokens_dropped"):
        check_summary({**summary, "tokens_dropped": 1.5})
