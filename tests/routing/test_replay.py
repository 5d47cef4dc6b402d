"""Replaying routing traces in the simulator: captured choices, re-routed scores."""

from __future__ import annotations

import numpy as np
import pytest

import moesim
from moesim import InputError, RoutingTrace

E, K = 256, 8
SMALL = ["model.num_layers=5", "parallel.tokens_per_gpu=256", "parallel.micro_batches=1",
         "mode=inference", "routing.max_devices=null"]


def scored_trace(*, layers: int = 2, tokens: int = 64 * 256, seed: int = 0,
                 with_scores: bool = True) -> RoutingTrace:
    """A trace whose choices are the top-K of its own softmax scores."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(layers, tokens, E)).astype(np.float32) * 2
    scores = np.exp(logits - logits.max(axis=-1, keepdims=True))
    scores /= scores.sum(axis=-1, keepdims=True)
    # Choose on the float16 scores the trace stores (ties: lower expert first), so
    # that re-routing them can reproduce the capture exactly.
    scores = scores.astype(np.float16).astype(np.float32)
    ids = np.argsort(-scores, axis=-1, kind="stable")[..., :K]
    weights = np.take_along_axis(scores, ids, axis=-1)
    return RoutingTrace(
        expert_ids=ids, weights=weights, scores=scores if with_scores else None,
        seq_id=np.arange(tokens) // 256, pos=np.arange(tokens) % 256,
        metadata={"num_experts": E, "gate": {"kind": "softmax-topk"},
                  "source": {"kind": "test"}},
    )


def run(trace, *overrides):
    scenario = moesim.load_scenario(overrides=[*SMALL, *overrides])
    return moesim.simulate(scenario, trace=trace)


def test_captured_replay_computes_exactly_the_traced_assignments():
    """With as many trace tokens as the step routes (EP64 x 256 tokens), every window
    covers the trace once, so each layer's expert loads are the trace layer's."""
    trace = scored_trace()
    result = run(trace, "routing.replay=captured")
    assert result.summary["routing_source"] == "trace (captured)"
    first_moe = result.scenario.model.first_dense_layers
    for li in range(result.scenario.model.moe_layers):
        layer = result.experts[result.experts["layer"] == first_moe + li]
        expected = np.bincount(trace.expert_ids[li % 2].ravel(), minlength=E)
        assert np.array_equal(layer["tokens"].to_numpy(), expected)


def test_rerouting_under_a_smaller_m_lowers_rdma_bytes():
    """Re-routing the stored scores with at most 2 nodes per token (instead of 8)
    sends fewer RDMA copies; the same scores without a limit reproduce the capture."""
    trace = scored_trace()
    free = run(trace, "routing.replay=reroute", "routing.max_devices=null",
               "routing.gate=softmax-topk")
    captured = run(trace, "routing.replay=captured")
    limited = run(trace, "routing.replay=reroute", "routing.max_devices=2")
    assert free.summary["rdma_bytes"] == captured.summary["rdma_bytes"]
    assert limited.summary["rdma_bytes"] < 0.6 * free.summary["rdma_bytes"]


def test_capacity_drops_replayed_tokens_and_counts_stay_consistent():
    trace = scored_trace(seed=1)
    s = run(trace, "routing.capacity_factor=0.8").summary
    assert s["tokens_dropped"] > 0
    assert s["tokens_dispatched"] == s["tokens_computed"] + s["tokens_dropped"]


def test_slots_recorded_as_dropped_count_as_dropped():
    trace = scored_trace()
    ids = trace.expert_ids.copy()
    ids[:, ::2, 0] = -1  # the capture dropped the first choice of every other token
    weights = np.where(ids < 0, 0, trace.weights)
    holed = RoutingTrace(expert_ids=ids, weights=weights, seq_id=trace.seq_id, pos=trace.pos,
                         metadata=trace.metadata)
    s = run(holed).summary
    assert s["tokens_dropped"] == s["tokens_dispatched"] // (2 * K)
    assert s["tokens_dispatched"] == s["tokens_computed"] + s["tokens_dropped"]


def test_recorded_source_ranks_are_kept():
    """Rank r's tokens come from the trace tokens recorded on rank r (mod the ranks)."""
    trace = scored_trace(tokens=4 * 256)
    # Rank 0 recorded only expert 0..7, the other ranks only experts 248..255.
    ids = np.where(np.arange(4 * 256)[None, :, None] < 256, np.arange(K),
                   np.arange(E - K, E)).astype(np.int16)
    ids = np.broadcast_to(ids, trace.expert_ids.shape).copy()
    ranked = RoutingTrace(expert_ids=ids, weights=trace.weights, seq_id=trace.seq_id,
                          pos=trace.pos, src_rank=np.arange(4 * 256) // 256,
                          metadata=trace.metadata)
    result = run(ranked)
    layer = result.experts[result.experts["layer"] == 3]
    # 64 ranks map onto 4 recorded ranks: 16 of them replay rank 0.
    assert layer["tokens"].to_numpy()[:K].tolist() == [16 * 256] * K
    assert layer["tokens"].to_numpy()[E - K:].tolist() == [48 * 256] * K


def test_a_trace_longer_or_shorter_than_the_step_is_tiled_deterministically():
    short = scored_trace(tokens=1000, layers=1)
    a = run(short).summary
    b = run(short).summary
    assert a == b
    assert a["tokens_dispatched"] == 2 * 64 * 256 * K  # two MoE layers, all GPUs, K each


@pytest.mark.parametrize(("trace_kwargs", "overrides", "field"), [
    ({}, ["model.routed_experts=128", "parallel.ep=32"], "trace"),
    ({"with_scores": False}, ["routing.replay=reroute"], "routing.replay"),
    ({}, ["model.top_k=6"], "routing.replay"),
])
def test_traces_that_cannot_drive_the_scenario_are_rejected(trace_kwargs, overrides, field):
    with pytest.raises(InputError) as err:
        run(scored_trace(**trace_kwargs), *overrides)
    assert err.value.field == field


def test_a_scenario_names_its_trace_next_to_it(tmp_path):
    scored_trace().save(tmp_path / "t.npz")
    (tmp_path / "s.yaml").write_text(
        "model: {preset: deepseek-v3, num_layers: 5}\ntopology: h800-cluster\nmode: inference\n"
        "trace: t.npz\nparallel: {ep: 64, tokens_per_gpu: 256}\nrouting: {max_devices: null}\n")
    scenario = moesim.load_scenario(tmp_path / "s.yaml")
    assert moesim.simulate(scenario).summary["routing_source"] == "trace (captured)"
    (tmp_path / "t.npz").write_bytes(b"PK broken")
    with pytest.raises(InputError, match="t.npz"):
        moesim.simulate(scenario)


def test_a_captured_replay_never_ignores_a_tighter_device_limit():
    """The capture chose among all 8 nodes; asked to simulate M = 4 it refuses and names
    the way out (re-routing the stored scores), and re-routing obeys M."""
    trace = scored_trace()
    with pytest.raises(InputError) as err:
        run(trace, "routing.max_devices=4")
    assert err.value.field == "routing.max_devices"
    assert "up to 8 nodes" in err.value.problem and "reroute" in err.value.allowed
    rerouted = run(trace, "routing.max_devices=4", "routing.replay=reroute",
                   "routing.gate=softmax-topk")
    assert rerouted.summary["routing_gate"] == "softmax-topk"
    assert not rerouted.warnings


def test_rerouting_with_another_gate_warns_and_the_summary_names_the_gates():
    trace = scored_trace()
    captured = run(trace)
    assert captured.summary["routing_gate"] == "softmax-topk"  # the trace's own gate
    other = run(trace, "routing.replay=reroute", "routing.gate=group-limited-sigmoid")
    assert other.summary["routing_gate"] == "group-limited-sigmoid"
    (warning,) = other.warnings
    assert "softmax-topk" in warning and "group-limited-sigmoid" in warning


def test_a_barely_trained_trace_gets_a_warning_with_its_numbers():
    trace = scored_trace()
    hot = np.broadcast_to(np.arange(K), trace.expert_ids.shape).astype(np.int16)
    skewed = RoutingTrace(expert_ids=hot, weights=trace.weights, seq_id=trace.seq_id,
                          pos=trace.pos, metadata={**trace.metadata, "source": {
                              "kind": "own-model", "training": {"steps": 20}}})
    (warning,) = run(skewed).warnings
    assert "trained for 20 steps" in warning and "load CV" in warning
    assert not run(trace).warnings


def test_capacity_reports_the_affinity_it_drops_per_device_or_per_expert():
    """Dropping the lowest gate weights first drops a smaller share of the affinity than
    of the assignments; at the routers (expert scope) or at the GPUs (device scope), the
    assignments are conserved."""
    trace = scored_trace(seed=2)
    for scope in ("device", "expert"):
        s = run(trace, "routing.capacity_factor=0.9", f"routing.capacity_scope={scope}").summary
        assert s["tokens_dispatched"] == s["tokens_computed"] + s["tokens_dropped"]
        assert 0 < s["dropped_affinity_fraction"] < s["dropped_token_fraction"]
    free = run(trace).summary
    assert free["dropped_affinity_fraction"] == free["tokens_dropped"] == 0


def test_affinity_kept_falls_as_the_device_limit_tightens():
    trace = scored_trace()
    assert run(trace).summary["affinity_kept"] == pytest.approx(1.0)
    kept = [run(trace, "routing.replay=reroute", "routing.gate=softmax-topk",
                f"routing.max_devices={m}").summary["affinity_kept"] for m in (1, 2, 4, 8)]
    assert kept == sorted(kept) and kept[0] < 0.8 and kept[-1] == pytest.approx(1.0)
    assert "affinity_kept" not in moesim.simulate(moesim.load_scenario(
        overrides=SMALL)).summary  # synthetic picks carry no scores


def test_a_layer_routed_once_gives_every_window_what_routing_it_alone_gives():
    """Re-routing routes each trace layer's tokens once and the windows take their rows:
    the same ids, gate weights and chosen affinity as routing each window on its own
    (the unrestricted top-K's sum only in another float32 order)."""
    from moesim.routing.replay import LayerRoutes, route_scores, score_mass

    trace = scored_trace(tokens=3000, layers=1)
    scenario = moesim.load_scenario(overrides=[*SMALL, "routing.replay=reroute",
                                               "routing.max_devices=3"])
    rng = np.random.default_rng(7)
    windows = [rng.permutation(3000)[:500], (2900 + np.arange(400)) % 3000,
               np.arange(256)]
    for cover in (windows, [np.arange(3000), *windows]):  # some tokens, then all
        routes = LayerRoutes(scenario, trace, 0, cover, gpus_per_domain=8)
        for tokens in windows:
            scores = trace.scores[0, tokens].astype(np.float32)
            ids, weights = route_scores(scenario, scores, gpus_per_domain=8)
            got_ids, got_weights = routes.logical(tokens)
            assert np.array_equal(got_ids, ids) and np.array_equal(got_weights, weights)
            chosen, free = score_mass(scores, ids)
            mass = routes.score_mass(tokens)
            assert mass[0] == chosen and mass[1] == pytest.approx(free, rel=1e-6)


def test_rerouting_a_trace_file_maps_its_scores_and_routes_as_from_memory(tmp_path,
                                                                        monkeypatch):
    """A trace loaded from its file (large arrays mapped, pages handed back layer by
    layer) simulates exactly as the same trace in memory."""
    from moesim.tracefile import format as trace_format

    monkeypatch.setattr(trace_format, "MAP_BYTES", 0)
    trace = scored_trace(seed=3)
    trace.save(tmp_path / "t.npz")
    overrides = ["routing.replay=reroute", "routing.max_devices=4",
                 "routing.gate=group-limited-sigmoid"]
    from_file = moesim.simulate(moesim.load_scenario(
        overrides=[*SMALL, *overrides, f"trace={tmp_path / 't.npz'}"]))
    in_memory = run(trace, *overrides)
    assert not RoutingTrace.load(tmp_path / "t.npz").scores.flags.writeable
    summary = {k: v for k, v in from_file.summary.items() if k != "routing_trace"}
    assert summary == {k: v for k, v in in_memory.summary.items() if k != "routing_trace"}
    assert from_file.experts.equals(in_memory.experts)
