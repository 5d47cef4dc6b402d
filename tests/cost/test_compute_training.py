"""Training GEMMs (moesim.cost.compute): the backward pass split into its input (dgrad)
and weight (wgrad) gradients, how much slower backward GEMMs run, FP4 GEMMs for NVFP4
training, and sliding-window attention.

ROUND is a made-up GPU with the plain roofline (no curves, no overheads), so forward and
backward times can be compared exactly; the fitted H100 preset (curves, overheads)
checks that the split holds however a spec is fitted.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from moesim import HardwareSpec
from moesim.config.loading import hardware_preset, model_preset
from moesim.cost import compute

ROUND = HardwareSpec(name="round", bf16_tflops=1000, fp8_tflops=2000, hbm_GBps=3000,
                     hbm_GB=80, sms=132, gemm_efficiency=0.7, attention_efficiency=0.5,
                     memory_efficiency=0.8)
SLOW_BACKWARD = dataclasses.replace(ROUND, backward_gemm_efficiency=0.5)
V3 = model_preset("deepseek-v3")  # MLA
MIXTRAL = model_preset("mixtral-8x7b")  # GQA
TOKENS_GE = np.array([[4096, 0, 130, 4096], [1, 2, 3, 8000]])  # [GPUs, local experts]


def gemm_parts(m, hw, **kw):
    """(forward, backward, dgrad, wgrad) of every GEMM function, by name."""
    fns = {
        "attention": lambda **g: compute.attention_seconds(m, hw, tokens=4096, seq_len=4096, **g),
        "ffn": lambda **g: compute.ffn_seconds(m, hw, tokens=4096, intermediate=2048, **g),
        "experts": lambda **g: compute.grouped_expert_seconds(m, hw, TOKENS_GE, **g),
        "grouped_ffn": lambda **g: compute.grouped_ffn_time(
            hw, hidden=m.hidden_size, intermediate=2048, tokens_ge=TOKENS_GE, dtype="fp8",
            **g),
        "expert_ffn": lambda **g: compute.expert_ffn_time(
            hw, hidden=m.hidden_size, intermediate=2048, rows=[0, 8192, 9000],
            active_experts=[0, 1, 3], dtype="bf16", **g),
        "lm_head": lambda **g: compute.lm_head_seconds(m, hw, tokens=4096, **g),
    }
    return {name: (fn(), fn(backward=True), fn(grad="input"), fn(grad="weight"))
            for name, fn in fns.items()}


@pytest.mark.parametrize("hw", [ROUND, hardware_preset("h100")], ids=["round", "h100"])
@pytest.mark.parametrize("m", [V3, MIXTRAL], ids=["mla", "gqa"])
def test_dgrad_and_wgrad_add_up_to_the_backward_pass(m, hw):
    for name, (_, backward, dgrad, wgrad) in gemm_parts(m, hw).items():
        np.testing.assert_allclose(np.asarray(dgrad) + wgrad, backward, rtol=1e-12,
                                   err_msg=name)


def test_a_gemms_two_gradients_are_equal_halves_of_twice_the_forward_work():
    for name, (fwd, backward, dgrad, wgrad) in gemm_parts(V3, ROUND).items():
        if name == "attention":
            continue
        np.testing.assert_allclose(backward, 2 * np.asarray(fwd), rtol=1e-12, err_msg=name)
        np.testing.assert_array_equal(dgrad, wgrad, err_msg=name)


def test_the_attention_core_backward_is_all_input_gradient():
    # The projections' wgrad does not depend on the sequence; dgrad carries the core,
    # whose cost grows with the keys each query sees.
    short, long = (dict(m=V3, hw=ROUND, tokens=4096, seq_len=s) for s in (512, 8192))
    assert compute.attention_seconds(**short, grad="weight") == \
        compute.attention_seconds(**long, grad="weight")
    assert compute.attention_seconds(**long, grad="input") > \
        compute.attention_seconds(**short, grad="input")
    core = (compute.attention_seconds(**long, grad="input")
            - compute.attention_seconds(**long, grad="weight"))
    core_flops = compute.BACKWARD_ATTENTION_CORE * compute.attention_core_flops(V3, 4096, 8192)
    assert core == pytest.approx(core_flops / (1000e12 * 0.5), rel=1e-9)


def test_a_backward_gemm_at_half_efficiency_takes_twice_as_long():
    # Compute-bound GEMMs (thousands of rows per GPU), plain roofline: their time is
    # FLOPs / (peak x efficiency).
    for name, (fwd, backward, dgrad, wgrad) in gemm_parts(V3, ROUND).items():
        slow_fwd, slow_back, slow_dgrad, slow_wgrad = gemm_parts(V3, SLOW_BACKWARD)[name]
        np.testing.assert_array_equal(slow_fwd, fwd, err_msg=name)
        np.testing.assert_allclose(slow_wgrad, 2 * np.asarray(wgrad), rtol=1e-9, err_msg=name)
        if name == "attention":  # the core is no GEMM: dgrad keeps its core time
            core = np.asarray(dgrad) - wgrad
            np.testing.assert_allclose(slow_dgrad, 2 * np.asarray(wgrad) + core, rtol=1e-9)
            continue
        np.testing.assert_allclose(slow_dgrad, 2 * np.asarray(dgrad), rtol=1e-9, err_msg=name)
        np.testing.assert_allclose(slow_back, 2 * np.asarray(backward), rtol=1e-9, err_msg=name)


def test_grad_names_only_the_input_or_weight_gradient():
    with pytest.raises(ValueError, match="grad"):
        compute.ffn_seconds(V3, ROUND, tokens=8, intermediate=8, grad="bias")


def test_hopper_has_no_fp4_gemms():
    h100 = hardware_preset("h100")
    with pytest.raises(ValueError, match="'h100'.*fp4_tflops"):
        h100.peak_flops("fp4")
    with pytest.raises(ValueError, match="fp4_tflops"):
        compute.ffn_seconds(V3, h100, tokens=4096, intermediate=2048, dtype="fp4")


def test_blackwell_runs_fp4_gemms_at_its_datasheet_rate():
    b200 = hardware_preset("b200")
    assert b200.peak_flops("fp4") == 9000e12 == 2 * b200.peak_flops("fp8")
    assert hardware_preset("gb200").peak_flops("fp4") == 10_000e12
    fp8 = compute.ffn_seconds(V3, b200, tokens=16384, intermediate=18432, dtype="fp8")
    fp4 = compute.ffn_seconds(V3, b200, tokens=16384, intermediate=18432, dtype="fp4")
    assert fp4 < fp8


def test_precisions_map_to_gemm_dtypes():
    assert {p: compute.gemm_dtype_for(p) for p in compute.PRECISION_GEMM_DTYPE} == {
        "bf16": "bf16", "fp8": "fp8", "fp8-block": "fp8", "mxfp8": "fp8", "nvfp4": "fp4"}
    assert compute.dtype_bytes("fp4") == 0.5 + 1 / 16  # E2M1 and an E4M3 scale per 16
    assert (compute.dtype_bytes("fp8"), compute.dtype_bytes("bf16")) == (1, 2)
    with pytest.raises(ValueError, match="nvfp8"):
        compute.gemm_dtype_for("nvfp8")


def test_a_sliding_window_caps_the_keys_each_query_sees():
    # 8 tokens, window 4: queries 1..4 see 1..4 keys, queries 5..8 see 4: 26 / 8.
    qk, v = 128 + 64, 128  # MLA: nope + rope dims, value dim
    assert compute.attention_core_flops(V3, 1, 8, window=4) == 2.0 * 26 / 8 * 128 * (qk + v)
    full = dict(m=MIXTRAL, hw=ROUND, tokens=8192, seq_len=8192)
    assert compute.attention_seconds(**full, window=4096) < compute.attention_seconds(**full)
    for window in (8192, 100_000):  # a window as long as the sequence changes nothing
        assert compute.attention_seconds(**full, window=window) == \
            compute.attention_seconds(**full)
    assert compute.attention_seconds(**full, window=0, backward=True) == \
        compute.attention_seconds(**full, backward=True)


def test_model_flops_count_the_windowed_layers_with_their_window():
    # GPT-OSS-like: half of Mixtral's 32 layers attend within 128 tokens.
    swa = dataclasses.replace(MIXTRAL, sliding_window=128, sliding_window_layers=16)
    attn = 2.0 * compute.attention_projection_params(MIXTRAL)
    full = attn + compute.attention_core_flops(MIXTRAL, 1, 4096)
    near = attn + compute.attention_core_flops(MIXTRAL, 1, 4096, window=128)
    saved = compute.model_flops_per_token(MIXTRAL, 4096) - compute.model_flops_per_token(swa, 4096)
    assert saved == pytest.approx(16 * (full - near), rel=1e-12)
    # Without windowed layers the count is the plain causal one, bit for bit.
    unused = dataclasses.replace(MIXTRAL, sliding_window=128)
    assert compute.model_flops_per_token(unused, 4096) == \
        compute.model_flops_per_token(MIXTRAL, 4096)
    too_many = dataclasses.replace(MIXTRAL, sliding_window=128, sliding_window_layers=33)
    with pytest.raises(ValueError, match="sliding_window_layers"):
        compute.model_flops_per_token(too_many, 4096)
