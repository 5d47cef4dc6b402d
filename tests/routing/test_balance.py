"""The auxiliary-loss-free balance policy as a what-if: steps of bias updates even out a
skewed gate, a zero update speed changes nothing, and the scenario refuses what the
policy cannot do."""

from __future__ import annotations

import numpy as np
import pytest

import moesim
from moesim import InputError
from moesim.routing.balance import bias_history, checkpoints

SMALL = ["model.num_layers=4", "parallel.tokens_per_gpu=256", "parallel.ep=16",
         "routing.max_devices=2", "routing.layer_samples=1", "routing.assignment=zipf",
         "routing.zipf_exponent=1.0", "routing.balance=aux-free-bias"]


def run(*overrides, trace=None):
    scenario = moesim.load_scenario(overrides=[*SMALL, *overrides])
    return moesim.simulate(scenario, trace=trace)


def test_bias_updates_even_out_a_skewed_gate_step_after_step():
    """Zipf-skewed synthetic scores: expert max/mean 30 at step 0, about 3 after 12 steps
    at speed 0.02; with 2048 tokens per GPU the expert GEMMs show it in the step time."""
    result = run("routing.balance_steps=12", "routing.bias_update_speed=0.02",
                 "parallel.tokens_per_gpu=2048")
    series = result.balance
    assert list(series["step"]) == list(range(13))
    first, last = series.iloc[0], series.iloc[-1]
    assert last["gpu_max_over_mean"] < 0.6 * first["gpu_max_over_mean"]
    assert last["expert_max_over_mean"] < 0.2 * first["expert_max_over_mean"]
    timed = series.dropna(subset=["step_time_s"])
    assert list(timed["step"]) == checkpoints(12) == [0, 1, 2, 5, 10, 12]
    assert timed["step_time_s"].iloc[-1] < 0.95 * timed["step_time_s"].iloc[0]
    assert result.summary["step_time_s"] == timed["step_time_s"].iloc[-1]
    assert len(result.summary["balance_series"]) == 13


def test_a_zero_update_speed_leaves_the_bias_and_the_step_unchanged():
    result = run("routing.balance_steps=3", "routing.bias_update_speed=0")
    times = result.balance["step_time_s"].dropna().to_numpy()
    assert (times == times[0]).all()
    scenario = moesim.load_scenario(overrides=[*SMALL, "routing.balance_steps=3",
                                               "routing.bias_update_speed=0"])
    history = bias_history(scenario, None, gpus_per_domain=8, seed=0)
    assert not history.bias_ske.any()


def test_a_traces_stored_scores_are_balanced_too():
    """Sigmoid scores where experts 0..7 are every token's favourites: re-routed step
    after step with the bias update, their load spreads."""
    rng = np.random.default_rng(0)
    tokens, experts = 4096, 256
    logits = rng.normal(size=(1, tokens, experts)) + np.where(np.arange(experts) < 8, 2.5, 0)
    scores = (1 / (1 + np.exp(-logits))).astype(np.float16).astype(np.float32)
    ids = np.argsort(-scores, axis=-1, kind="stable")[..., :8]
    trace = moesim.RoutingTrace(
        expert_ids=ids, weights=np.take_along_axis(scores, ids, axis=-1), scores=scores,
        seq_id=np.arange(tokens) // 256, pos=np.arange(tokens) % 256,
        metadata={"num_experts": experts, "gate": {"kind": "group-limited-sigmoid"},
                  "source": {"kind": "test"}})
    result = run("routing.replay=reroute", "routing.balance_steps=8",
                 "routing.bias_update_speed=0.05", trace=trace)
    series = result.balance
    assert series["expert_max_over_mean"].iloc[-1] < 0.6 * series["expert_max_over_mean"].iloc[0]
    assert result.summary["routing_source"] == "trace (reroute)"


@pytest.mark.parametrize("overrides, field", [
    (["routing.gate=softmax-topk"], "routing.balance"),
])
def test_the_policy_needs_a_sigmoid_gate(overrides, field):
    with pytest.raises(InputError) as err:
        moesim.load_scenario(overrides=[*SMALL, *overrides])
    assert err.value.field == field and "group-limited-sigmoid" in err.value.allowed


def test_a_trace_is_balanced_only_by_re_routing_its_scores(tmp_path):
    (tmp_path / "s.yaml").write_text(
        "model: {preset: deepseek-v3, num_layers: 4}\ntopology: h800-cluster\n"
        "trace: t.npz\nparallel: {ep: 16, tokens_per_gpu: 256}\n"
        "routing: {balance: aux-free-bias, max_devices: null}\n")
    with pytest.raises(InputError) as err:
        moesim.load_scenario(tmp_path / "s.yaml")
    assert err.value.field == "routing.replay" and err.value.allowed == "reroute"
