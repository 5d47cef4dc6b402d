"""The report says what was simulated, truthfully: the routing source (a replayed trace
by name and replay mode, synthetic popularity otherwise), the limits in words (never
"None"), the network model the scenario chose, and a what-if table with per-GPU
throughput, its change and the drop rate."""

from __future__ import annotations

import pytest

import moesim
from moesim.reports import figures
from moesim.reports.document import Figure, Paragraph, Table
from moesim.reports.simulation_report import build_report
from moesim.tracefile.format import RoutingTrace

TRACE_SCENARIO = ["model.num_layers=4", "parallel.tokens_per_gpu=512"]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def report_text(result, variants=()) -> tuple[str, list]:
    blocks, figs = build_report(result, list(variants))
    texts = [b.text for b in blocks if isinstance(b, Paragraph)]
    texts += [b.caption for b in blocks if isinstance(b, Figure)]
    texts += [cell for b in blocks if isinstance(b, Table) for row in (b.header, *b.rows)
              for cell in row]
    return "\n".join(texts), blocks


def test_a_replayed_trace_under_the_flow_network_is_named_as_such(repo):
    sc = moesim.load_scenario(repo / "examples/dsmoe16b-trace.yaml",
                              overrides=[*TRACE_SCENARIO, "network=flow"])
    text, _ = report_text(moesim.simulate(sc))
    assert "tiny-v1.npz" in text and "replay captured" in text
    assert "popularity" not in text and "uniform assignment" not in text
    assert "flow-level network (max-min fair sharing" in text
    assert "analytical network" not in text
    assert "None" not in text


def test_a_trace_given_in_memory_is_not_called_synthetic(repo):
    sc = moesim.load_scenario(repo / "examples/dsmoe16b-trace.yaml",
                              overrides=[*TRACE_SCENARIO, "trace=null",
                                         "routing.replay=reroute"])
    result = moesim.simulate(sc, trace=RoutingTrace.load(repo / "traces/samples/tiny-v1.npz"))
    text, _ = report_text(result)
    assert "routing from trace own-model (replay reroute" in text
    assert "popularity" not in text and "synthetic" not in text
    assert "analytical network (latency plus the busiest link)" in text


def test_synthetic_routing_limits_and_placement_in_words(small_overrides):
    sc = moesim.load_scenario(overrides=[
        *small_overrides, "routing.max_devices=null", "routing.assignment=zipf",
        "routing.zipf_exponent=1.2", "routing.capacity_factor=1.25",
        "placement.policy=eplb-hierarchical", "placement.redundant_experts=64"])
    text, _ = report_text(moesim.simulate(sc))
    assert "synthetic routing with Zipf expert popularity (exponent 1.2)" in text
    assert "no device limit" in text
    assert "capacity factor 1.25 per GPU (probs drops first)" in text
    assert "placement eplb-hierarchical with 64 redundant experts" in text
    assert "None" not in text


def test_no_limits_never_print_none(small_overrides):
    sc = moesim.load_scenario(overrides=[*small_overrides, "routing.max_devices=null"])
    text, _ = report_text(moesim.simulate(sc))
    assert "no device limit" in text and "no capacity limit" in text
    assert "uniform expert popularity" in text
    assert "None" not in text and "M = " not in text


def test_what_if_table_compares_per_gpu_throughput_and_drop_rate(small_overrides):
    base = moesim.simulate(moesim.load_scenario(overrides=small_overrides))
    variant = moesim.simulate(moesim.load_scenario(overrides=[
        *small_overrides, "routing.capacity_factor=1.0", "parallel.micro_batches=1"]))
    label = "routing.capacity_factor=1.0, parallel.micro_batches=1"
    _, blocks = report_text(base, [(label, variant)])
    table = next(b for b in blocks if isinstance(b, Table) and b.header[0] == "quantity"
                 and "baseline" in b.header)
    assert table.header == ("quantity", "baseline", label)
    rows = {row[0]: row[1:] for row in table.rows}
    for quantity in ("step time", "tokens/s per GPU", "tokens/s per GPU vs baseline",
                     "drop rate", "tokens/s", "MFU", "RDMA bytes", "NVLink bytes"):
        assert quantity in rows, quantity
    per_gpu = [s["tokens_per_s"] / s["gpus"] for s in (base.summary, variant.summary)]
    assert rows["tokens/s per GPU"] == tuple(f"{v:,.0f}" for v in per_gpu)
    assert rows["tokens/s per GPU vs baseline"] == (
        "-", f"{per_gpu[1] / per_gpu[0] - 1:+.1%}")
    assert rows["drop rate"] == tuple(f"{s['dropped_token_fraction']:.2%}"
                                      for s in (base.summary, variant.summary))


def test_figure_captions_carry_their_reading_aid(small_overrides):
    result = moesim.simulate(moesim.load_scenario(overrides=small_overrides))
    blocks, figs = build_report(result)
    captions = [b.caption for b in blocks if isinstance(b, Figure)]
    assert len(captions) == len(figs) == 5
    for caption in captions:
        assert any(aid in caption for aid in figures.READING.values()), caption
