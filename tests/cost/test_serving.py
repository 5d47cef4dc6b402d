"""Serving steps: ``mode: prefill`` (time to first token) and ``mode: decode`` (time per
output token) of a request batch, with attention and expert tensor parallelism.

The numbers are derived by hand through the plain roofline every kernel follows,
``max(FLOPs / (peak x eff), bytes / (HBM x memory eff))``, on an H200 given in full
here (989.5 dense BF16 TFLOP/s, 4800 GB/s HBM; efficiencies: GEMM 0.65, attention 0.5,
memory 0.8; no fitted curves or overheads), so that refitting the shipped preset does
not move them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import moesim
from moesim import HardwareSpec, InputError
from moesim.cli.main import app
from moesim.cost import compute, serving

REPO = Path(__file__).resolve().parents[2]
DECODE = str(REPO / "examples" / "v3-decode-h200.yaml")
PREFILL = str(REPO / "examples" / "v3-prefill-h200.yaml")

ROOFLINE_H200 = {"name": "h200-roofline", "bf16_tflops": 989.5, "fp8_tflops": 1979,
                 "hbm_GBps": 4800, "hbm_GB": 141, "sms": 132, "gemm_efficiency": 0.65,
                 "attention_efficiency": 0.5, "memory_efficiency": 0.8}
HW = HardwareSpec(**ROOFLINE_H200)


def hbm_s(nbytes: float) -> float:
    """Seconds to move ``nbytes`` over the H200's HBM at 80% efficiency."""
    return nbytes / (4800e9 * 0.8)


# Mixtral-8x7B cut to 2 layers, with every token routed to all 8 experts: whatever the
# batch, every expert's weights are read once per step. On one H200 (ep 1) nothing
# travels between GPUs, so the step is the kernels' roofline plus the exchanges' fixed
# overhead.
MIXTRAL = {"preset": "mixtral-8x7b", "num_layers": 2, "top_k": 8}


def scenario(mode="decode", *, batch=1, isl=1024, osl=256, model=None, gpus=1, ep=1,
             kv_dtype="bf16", seed=0, **parallel):
    return moesim.scenario_from_dict({
        "name": "serving-test", "mode": mode, "seed": seed, "model": model or MIXTRAL,
        "topology": "dgx-h200", "hardware": ROOFLINE_H200,
        "parallel": {"ep": ep, "gpus": gpus, **parallel},
        "serving": {"batch": batch, "isl": isl, "osl": osl, "kv_dtype": kv_dtype},
    })


def run(sc) -> dict:
    return moesim.simulate(sc).summary


# ---------------------------------------------------------------- decode kernels


def test_decode_attention_kernel_gqa_is_the_kv_cache_over_hbm():
    """Mixtral's GQA (32 heads, 8 KV heads of 128) decoding 4 requests over 1000 cached
    tokens: 4 FLOPs per KV byte, far below the H200's ~129 FLOP/B balance point, so the
    kernel reads 4 x 1000 x 4096 KV bytes plus the queries and outputs."""
    hw = HW
    kv_per_token = 2 * 8 * 128 * 2  # keys and values of 8 heads, BF16
    t = compute.attention_decode_time(hw, batch=4, context=1000, heads=32, score_dim=128,
                                      value_dim=128, kv_bytes_per_token=kv_per_token)
    nbytes = 4 * 1000 * 4096 + 4 * 32 * (128 + 128) * 2
    assert float(t) == pytest.approx(nbytes / (4800e9 * 0.8), rel=1e-9)


def test_decode_attention_kernel_mla_with_128_heads_is_compute_bound():
    """DeepSeek-V3's absorbed MLA: 128 heads score over the 576-wide latent and read
    512-wide values, 2 x 128 x 1088 FLOPs per cached token against 576 x 2 bytes: 242
    FLOP/B, above the balance point, so 128-head MLA decode is compute-bound (as
    FlashMLA's compute-bound numbers show)."""
    hw = HW
    m = moesim.load_scenario(DECODE).model
    score, value, cached = compute.attention_dims(m)
    assert (score, value, cached) == (576, 512, 576)
    t = compute.attention_decode_time(hw, batch=64, context=4608, heads=128, score_dim=score,
                                      value_dim=value, kv_bytes_per_token=576 * 2)
    flops = 2 * 64 * 4608 * 128 * (576 + 512)
    assert float(t) == pytest.approx(flops / (989.5e12 * 0.5), rel=1e-9)


def test_attention_tp_halves_gqa_kv_reads_but_not_mla():
    """With attention_tp = 2 a GPU holds half of GQA's KV heads, but MLA's one latent per
    token is replicated on every TP rank."""
    gqa = scenario().model
    mla = moesim.scenario_from_dict({"model": "deepseek-v2-lite", "topology": "dgx-h200",
                                     "parallel": {"ep": 8, "tokens_per_gpu": 8}}).model
    one = serving.kv_bytes_per_token_per_gpu(gqa, "bf16", 1)
    assert one == 2 * 8 * 128 * 2
    assert serving.kv_bytes_per_token_per_gpu(gqa, "bf16", 2) == one / 2
    assert serving.kv_bytes_per_token_per_gpu(gqa, "fp8", 2) == one / 4
    assert serving.kv_bytes_per_token_per_gpu(gqa, "bf16", 16) == 2 * 1 * 128 * 2  # replicated
    latent = (512 + 64) * 2
    assert serving.kv_bytes_per_token_per_gpu(mla, "bf16", 1) == latent
    assert serving.kv_bytes_per_token_per_gpu(mla, "bf16", 2) == latent


# ---------------------------------------------------------------- decode steps


def test_small_batch_decode_step_is_the_weights_read_once():
    """Batch 1: every kernel is memory-bound, so the step is the bytes it moves over HBM
    (attention projections, all 8 experts' weights, the KV cache, the LM head) plus the
    two exchanges' fixed overhead per layer."""
    s = run(scenario(batch=1, isl=1024, osl=256))
    h, qkv, inter, vocab = 4096, (32 + 2 * 8) * 128, 14336, 32000
    proj = (h * 2 + h * qkv * 2 + qkv * 2) + (h * 2 + h * h * 2 + h * 2)
    core = 1152 * 4096 + 32 * 256 * 2  # context isl + osl/2 = 1152 cached tokens
    rows = 8 * 128  # one token per expert, padded to the grouped GEMM's 128 rows
    experts = 8 * 3 * h * inter * 2 + rows * (h * (2 + 2) + inter * (2 * 2 + 2))
    head = h * 2 + h * vocab * 2 + vocab * 2
    expected = (2 * hbm_s(proj + core + experts) + hbm_s(head)
                + s["dispatch_time_s"] + s["combine_time_s"])
    assert s["tpot_s"] == pytest.approx(expected, rel=0.01)
    assert s["tpot_s"] == s["step_time_s"]


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_doubling_a_small_batch_barely_changes_tpot(batch):
    t1 = run(scenario(batch=batch))["tpot_s"]
    t2 = run(scenario(batch=2 * batch))["tpot_s"]
    assert 1.0 < t2 / t1 < 1.03


def test_tpot_grows_with_context_by_the_kv_cache_read():
    """At batch 8 the decode attention is memory-bound: 2000 more cached tokens per
    request cost 8 x 2000 x 4096 bytes per layer over HBM, and nothing else changes."""
    short = run(scenario(batch=8, isl=1000))["tpot_s"]
    long = run(scenario(batch=8, isl=3000))["tpot_s"]
    slope = hbm_s(8 * 2000 * (2 * 8 * 128 * 2) * 2)  # 2 layers
    assert long - short == pytest.approx(slope, rel=0.01)


@pytest.mark.parametrize(("model", "kv_per_token", "ratio"), [
    (MIXTRAL, 2 * 8 * 128 * 2, 0.5),  # GQA: TP 2 holds 4 of the 8 KV heads
    ({"preset": "deepseek-v2-lite", "num_layers": 2}, (512 + 64) * 2, 1.0),  # MLA latent
])
def test_attention_tp_2_halves_the_gqa_context_slope_but_not_mla(model, kv_per_token, ratio):
    """Two GPUs, 8 requests per attention-DP rank: the context slope per GPU is the KV
    bytes that GPU reads, halved by attention TP for GQA, unchanged for MLA (v2-lite's
    16 heads keep its decode attention memory-bound)."""
    def slope(tp):
        short, long = (run(scenario(batch=8, isl=isl, model=model, gpus=2, ep=2,
                                    attention_tp=tp))["tpot_s"] for isl in (1000, 3000))
        return long - short

    layers = model["num_layers"]
    assert slope(1) == pytest.approx(hbm_s(8 * 2000 * kv_per_token * layers), rel=0.01)
    assert slope(2) == pytest.approx(ratio * slope(1), rel=0.01)


def test_large_batch_decode_is_compute_bound_and_grows_with_the_batch():
    """512 requests per GPU: each expert runs 512 rows, far past the weights' reach, so
    doubling the batch nearly doubles the step."""
    t256 = run(scenario(batch=256))["tpot_s"]
    t512 = run(scenario(batch=512))["tpot_s"]
    assert 1.9 < t512 / t256 <= 2.0


def test_decode_throughput_keys():
    s = run(scenario(batch=8, gpus=2, ep=2))
    assert s["attention_dp"] == 2 and s["requests_per_step"] == 16
    assert s["tokens_per_step"] == 16
    assert s["output_tokens_per_s_per_gpu"] == pytest.approx(16 / s["tpot_s"] / 2)
    assert s["attention_keys_per_token"] == 1024 + 256 / 2
    assert s["kv_cache_bytes_per_gpu"] == 8 * (1024 + 256) * (2 * 8 * 128 * 2) * 2
    # MFU stays defined: the forward FLOPs of 16 new tokens (each attending to its 1152
    # cached tokens, through all 8 experts) and 16 LM-head rows over the BF16 peak.
    attn = 2 * 4096 * 128 * (2 * 32 + 2 * 8) + 2 * 32 * (128 + 128) * 1152
    experts = 8 * 2 * 3 * 4096 * 14336
    flops = 16 * (2 * (attn + experts) + 2 * 4096 * 32000)
    assert s["mfu"] == pytest.approx(flops / (s["tpot_s"] * 2 * 989.5e12), rel=1e-9)
    assert s["mfu"] < 0.1  # memory-bound
    assert "ttft_s" not in s


def test_expert_tp_splits_the_expert_weights_and_adds_an_all_reduce():
    """moe_tp 2 on 2 GPUs (ep 1): each GPU runs both GPUs' tokens on half of every
    expert's width, reading half the weights, then all-reduces the outputs over NVLink."""
    plain = run(scenario(batch=1, gpus=2, ep=1))
    split = run(scenario(batch=1, gpus=2, ep=1, moe_tp=2))
    assert plain["moe_tp_allreduce_time_s"] == 0
    assert split["moe_tp_allreduce_time_s"] > 0
    gemm = split["expert_compute_time_s"] - split["moe_tp_allreduce_time_s"]
    assert 0.45 < gemm / plain["expert_compute_time_s"] < 0.6


# ---------------------------------------------------------------- prefill


def test_prefill_attention_of_one_layer_by_hand():
    """One prompt of 4096 tokens: the projections (QKV 4096 -> 6144, O 4096 -> 4096) and
    the causal core (2048.5 keys per query on average, 32 heads of 128) are all
    compute-bound."""
    isl = 4096
    result = moesim.simulate(scenario("prefill", batch=1, isl=isl))
    spans = result.spans
    attn = spans[(spans["phase"] == "attention") & (spans["layer"] == 0)]
    seconds = float((attn["end_s"] - attn["start_s"]).iloc[0])
    proj_flops = 2 * isl * (4096 * 6144 + 4096 * 4096)
    core_flops = 2 * isl * (isl + 1) / 2 * 32 * (128 + 128)
    expected = proj_flops / (989.5e12 * 0.65) + core_flops / (989.5e12 * 0.5)
    assert seconds == pytest.approx(expected, rel=0.01)
    assert result.summary["ttft_s"] == result.summary["step_time_s"]


def test_ttft_grows_superlinearly_with_the_prompt():
    """The causal attention core is quadratic in the prompt, the rest linear: doubling the
    prompt more than doubles the TTFT, and attention's share of it grows."""
    s = {isl: run(scenario("prefill", batch=1, isl=isl)) for isl in (2048, 4096, 8192)}
    assert s[4096]["ttft_s"] > 2 * s[2048]["ttft_s"]
    assert s[8192]["ttft_s"] > 2 * s[4096]["ttft_s"]
    share = [s[i]["attention_time_s"] / s[i]["ttft_s"] for i in (2048, 4096, 8192)]
    assert share[0] < share[1] < share[2]
    prompt = s[8192]
    assert prompt["tokens_per_step"] == 8192 and prompt["requests_per_step"] == 1
    assert prompt["input_tokens_per_s_per_gpu"] == pytest.approx(8192 / prompt["ttft_s"])
    assert "tpot_s" not in prompt


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_same_seed_same_result(mode):
    a = run(scenario(mode, batch=2, isl=512, gpus=8, ep=8, seed=3,
                     model={"preset": "mixtral-8x7b", "num_layers": 2}))
    b = run(scenario(mode, batch=2, isl=512, gpus=8, ep=8, seed=3,
                     model={"preset": "mixtral-8x7b", "num_layers": 2}))
    key = "ttft_s" if mode == "prefill" else "tpot_s"
    assert a[key] == b[key] and a == b


def test_serving_scenario_round_trips():
    sc = scenario(batch=4, gpus=2, ep=2, attention_tp=2)
    assert moesim.scenario_from_dict(sc.to_dict()) == sc


# ---------------------------------------------------------------- bad input


def _error(data: dict) -> InputError:
    with pytest.raises(InputError) as info:
        moesim.simulate(moesim.scenario_from_dict(data))
    return info.value


BASE = {"model": MIXTRAL, "topology": "dgx-h200", "parallel": {"ep": 8}}


def test_prefill_without_serving_names_serving():
    err = _error({**BASE, "mode": "prefill"})
    assert err.field == "serving" and "serving" in str(err)


def test_serving_modes_and_other_modes_keep_to_their_fields():
    serving_ = {"batch": 4, "isl": 128, "osl": 128}
    err = _error({**BASE, "mode": "train", "serving": serving_,
                  "parallel": {"ep": 8, "tokens_per_gpu": 64}})
    assert err.field == "serving"
    err = _error({**BASE, "mode": "inference",
                  "parallel": {"ep": 8, "tokens_per_gpu": 64, "attention_tp": 2}})
    assert err.field == "parallel.attention_tp" and err.allowed.startswith("1")
    err = _error({**BASE, "mode": "decode", "serving": serving_,
                  "parallel": {"ep": 8, "tokens_per_gpu": 64}})
    assert err.field == "parallel.tokens_per_gpu"
    err = _error({**BASE, "mode": "train"})
    assert err.field == "parallel.tokens_per_gpu" and "missing" in str(err)


@pytest.mark.parametrize(("parallel", "model", "field", "allowed"), [
    ({"ep": 8, "attention_tp": 8}, {"num_heads": 12, "num_kv_heads": 4},
     "parallel.attention_tp", "1, 2, 4"),  # 8 does not divide 12 heads
    ({"ep": 8, "attention_tp": 2}, {"num_heads": 24, "num_kv_heads": 3},
     "parallel.attention_tp", "1"),  # 2 neither divides nor is a multiple of 3 KV heads
    ({"ep": 8, "attention_tp": 3}, {}, "parallel.attention_tp", "1, 2, 4, 8"),  # 8 GPUs
    ({"ep": 4, "gpus": 8, "moe_tp": 3}, {}, "parallel.moe_tp", "1, 2"),
    # gpus left to ep x moe_tp: every divisor of the 14336 width (up to 64) would fit
    ({"ep": 2, "moe_tp": 3}, {}, "parallel.moe_tp", "1, 2, 4, 7, 8, 14, 16, 28, 32, 56, 64"),
    ({"ep": 8, "micro_batches": 3}, {}, "parallel.micro_batches", "divisors of 4"),
])
def test_impossible_layouts_name_the_field_and_the_allowed_values(parallel, model, field,
                                                                   allowed):
    err = _error({**BASE, "model": {**MIXTRAL, **model}, "mode": "decode",
                  "parallel": parallel, "serving": {"batch": 4, "isl": 128, "osl": 128}})
    assert (err.field, err.allowed) == (field, allowed)


def test_attention_tp_not_dividing_the_heads_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "never"
    result = CliRunner().invoke(app, [
        "simulate", DECODE, "--set", "model.num_heads=48",
        "--set", "parallel.attention_tp=32", "--out", str(out)])
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("moesim: error: ") and len(message.splitlines()) == 1
    assert "parallel.attention_tp" in message and "48 attention heads" in message
    assert "allowed: 1, 2, 4, 8, 16)" in message
    assert not out.exists()


def test_cli_json_prints_the_serving_keys():
    result = CliRunner().invoke(app, ["simulate", DECODE,
                                      "--set", "model.num_layers=5", "--json"])
    assert result.exit_code == 0, result.output
    s = json.loads(result.output)
    assert s["mode"] == "decode" and s["tpot_s"] == s["step_time_s"] > 0
    assert s["output_tokens_per_s_per_gpu"] == pytest.approx(
        64 * 32 / s["tpot_s"] / 32)
    text = CliRunner().invoke(app, ["simulate", PREFILL,
                                    "--set", "model.num_layers=5"])
    assert text.exit_code == 0, text.output
    assert "time to first token" in text.output and "input tokens/s per GPU" in text.output


def test_every_mode_a_scenario_may_name_has_its_step_costs():
    import typing

    from moesim.config.scenario import Scenario
    from moesim.cost.modes import MODES

    named = typing.get_args(Scenario.__pydantic_fields__["mode"].annotation)
    assert set(named) == set(MODES)
