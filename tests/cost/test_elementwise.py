"""The non-GEMM kernels of one layer (moesim.cost.elementwise): each moves a number of
HBM bytes that can be counted by hand, at ``hbm_GBps x memory_efficiency`` plus
``kernel_overhead_us`` per launch.

The GPU below is a made-up round one (1000 GB/s HBM at 80%, 2 us per launch, no fitted
curves), so that every time here is bytes / 0.8e12 + 2 us per launch.
"""

from __future__ import annotations

import dataclasses

import pytest

from moesim import HardwareSpec, ModelShape
from moesim.config.loading import hardware_preset, model_preset
from moesim.cost import compute, elementwise

HW = HardwareSpec(name="round", bf16_tflops=1000, fp8_tflops=2000, hbm_GBps=1000, hbm_GB=80,
                  sms=100, gemm_efficiency=0.5, attention_efficiency=0.5,
                  memory_efficiency=0.8, kernel_overhead_us=2.0)
LAUNCH_S = 2e-6

# A small GQA MoE layer: hidden 64, 8 experts of width 32 (top-2) and one shared expert.
TINY = ModelShape(name="tiny", hidden_size=64, num_layers=4, first_dense_layers=1,
                  dense_intermediate_size=128, moe_intermediate_size=32, routed_experts=8,
                  shared_experts=1, top_k=2, vocab_size=1000, attention="gqa", num_heads=4,
                  num_kv_heads=2, head_dim=16)
LOW = ("fp8", "fp8-block", "mxfp8")


def hbm_s(nbytes: float, launches: int = 1) -> float:
    return nbytes / 0.8e12 + launches * LAUNCH_S


def kernels(*, precision="bf16", backward=False, moe=True, tokens=10, rows=20, m=TINY, hw=HW):
    return elementwise.layer_kernels(m, hw, tokens=tokens, routed_rows=rows if moe else 0,
                                     precision=precision, backward=backward, moe=moe)


def test_an_rmsnorm_reads_its_input_and_weight_and_writes_its_output():
    # 10 tokens x 64 values in and out, in BF16, and the 64-value weight: 2688 bytes,
    # twice per layer (before attention, before the FFN).
    one = 10 * 64 * 2 + 10 * 64 * 2 + 64 * 2
    assert one == 2688
    assert kernels()["rmsnorm"] == pytest.approx(2 * hbm_s(one), rel=1e-12)


def test_a_permute_gathers_each_routed_row_once():
    # 20 expert rows of 64 BF16 values read from their tokens and written in expert
    # order, with a 4-byte row map entry each: 5200 bytes in one kernel.
    assert kernels()["permute"] == pytest.approx(hbm_s(20 * (2 * 64 * 2 + 4)), rel=1e-12)


def test_unpermute_sums_each_tokens_rows_into_one_output():
    # Reads the 20 rows with their index and FP32 routing weight, writes the 10 tokens.
    nbytes = 20 * (64 * 2 + 4 + 4) + 10 * 64 * 2
    assert kernels()["unpermute"] == pytest.approx(hbm_s(nbytes), rel=1e-12)


def test_swiglu_reads_gate_and_up_and_writes_their_product():
    got = kernels()
    assert got["swiglu_routed"] == pytest.approx(hbm_s(3 * 20 * 32 * 2), rel=1e-12)
    assert got["swiglu_shared"] == pytest.approx(hbm_s(3 * 10 * 32 * 2), rel=1e-12)


def test_bf16_trains_without_quantize_kernels_and_each_fp8_recipe_adds_them():
    assert not [k for k in kernels(precision="bf16") if k.startswith("quantize")]
    for precision in LOW:
        for backward in (False, True):
            got = kernels(precision=precision, backward=backward)
            assert got["quantize_cast"] > 0
            # Only per-tensor scaling reads the tensor once more for its amax.
            assert ("quantize_amax" in got) == (precision == "fp8")
            # The other kernels do not depend on the precision.
            plain = kernels(backward=backward)
            assert {k: v for k, v in got.items() if not k.startswith("quantize")} == plain


def test_the_recipes_cast_bytes_per_value():
    # Read BF16 (2 bytes), write a rowwise and a columnwise copy with their scales.
    r = elementwise.RECIPES
    assert r["fp8"].cast_bytes(1) == 2 + 2 * 1  # + an amax pass of 2 bytes
    assert r["fp8-block"].cast_bytes(128) == 128 * 2 + 2 * (128 + 4)  # FP32 per 1x128
    assert r["mxfp8"].cast_bytes(32) == 32 * 2 + 2 * (32 + 1)  # E8M0 per 32
    assert r["nvfp4"].cast_bytes(16) == 16 * 2 + 2 * (8 + 1)  # E4M3 per 16 FP4 values
    assert r["fp8-block"].cast_bytes(128 * 128, weight=True) == 128 * 128 * 4 + 2 * 4


def test_per_tensor_fp8_quantizes_every_gemm_input_in_forward():
    # GQA attention: the QKV input (10 x 64) and the output projection's input
    # (10 x 4 heads x 16); FFNs: routed (20 rows) and shared (10 rows) expert inputs
    # of width 64 and their down projections' inputs of width 32.
    tensors = [10 * 64, 10 * 64, 20 * 64, 20 * 32, 10 * 64, 10 * 32]
    got = kernels(precision="fp8")
    assert got["quantize_amax"] == pytest.approx(sum(hbm_s(2 * n) for n in tensors), rel=1e-12)
    assert got["quantize_cast"] == pytest.approx(sum(hbm_s(4 * n) for n in tensors), rel=1e-12)


def test_backward_quantizes_each_gemm_output_gradient():
    # QKV output (10 x (4 + 2 x 2) x 16), attention output (10 x 64); per FFN the
    # gate/up output (rows x 2 x width) and the down output (rows x 64).
    grads = [10 * 8 * 16, 10 * 64, 20 * 64, 20 * 64, 10 * 64, 10 * 64]
    got = kernels(precision="mxfp8", backward=True)
    assert got["quantize_cast"] == pytest.approx(
        sum(hbm_s(n * (2 + 2 * (1 + 1 / 32))) for n in grads), rel=1e-12)


def test_nvfp4_needs_a_gpu_with_fp4_tensor_cores():
    with pytest.raises(ValueError, match="fp4_tflops"):
        kernels(precision="nvfp4", hw=hardware_preset("h100"))
    got = kernels(precision="nvfp4", hw=hardware_preset("b200"))
    assert got["quantize_amax"] > 0 and got["quantize_cast"] > 0


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="fp16"):
        kernels(precision="fp16")


def test_a_dense_layer_has_no_router_and_no_permutes():
    dense = kernels(moe=False)
    assert set(dense) == {"rmsnorm", "rope", "swiglu_dense", "residual_add"}
    assert dense["swiglu_dense"] == pytest.approx(hbm_s(3 * 10 * 128 * 2), rel=1e-12)
    with pytest.raises(ValueError, match="routed rows"):
        elementwise.layer_kernels(TINY, HW, tokens=10, routed_rows=5, precision="bf16",
                                  backward=False, moe=False)


def test_an_moe_layer_routes_with_a_small_gate_gemm_and_score_kernels():
    got = kernels()
    assert got["router_gemm"] == float(compute.gemm_time(HW, groups=1, m=10, n=8, k=64,
                                                          dtype="bf16"))
    # Scores: read BF16 logits, keep FP32 scores, write top-2 FP32 weights and ids.
    assert got["router_topk"] == pytest.approx(hbm_s(10 * 8 * 6 + 10 * 2 * 8), rel=1e-12)
    # Backward: the gate GEMM's input and weight gradients.
    back = kernels(backward=True)
    assert back["router_gemm"] == pytest.approx(
        float(compute.gemm_time(HW, groups=1, m=10, n=64, k=8, dtype="bf16"))
        + float(compute.gemm_time(HW, groups=1, m=64, n=8, k=10, dtype="bf16")), rel=1e-12)


def test_a_model_without_shared_experts_runs_no_shared_swiglu():
    lone = dataclasses.replace(TINY, shared_experts=0)
    assert "swiglu_shared" not in kernels(m=lone)


def test_norms_and_activations_move_twice_their_forward_bytes_in_backward():
    fwd, back = kernels(), kernels(backward=True)
    for name in ("rmsnorm", "swiglu_routed", "swiglu_shared"):
        launches = 2 if name == "rmsnorm" else 1
        assert back[name] - launches * LAUNCH_S == pytest.approx(
            2 * (fwd[name] - launches * LAUNCH_S), rel=1e-12)
    # RoPE rotates back and residual adds sum gradients: the same bytes as forward.
    assert back["rope"] == fwd["rope"] and back["residual_add"] == fwd["residual_add"]


def test_mla_normalises_its_latents_and_ropes_only_the_rope_dims():
    v3 = model_preset("deepseek-v3")
    got = kernels(m=v3, tokens=4, rows=32)
    # q latent (1536) and kv latent (512) of 4 tokens, each with its weight.
    norms = [2 * 4 * r * 2 + r * 2 for r in (1536, 512)]
    assert got["mla_latent_norm"] == pytest.approx(sum(hbm_s(b) for b in norms), rel=1e-12)
    # q: 128 heads x 64 RoPE dims; k: one shared 64-dim RoPE key.
    rope = [2 * 4 * 128 * 64 * 2, 2 * 4 * 64 * 2]
    assert got["rope"] == pytest.approx(sum(hbm_s(b) for b in rope), rel=1e-12)
    assert "mla_latent_norm" not in kernels()


def test_weights_are_cast_once_per_step_with_both_copies():
    assert elementwise.weight_quantize_seconds(HW, weights=1e6, precision="bf16") == 0.0
    # Per-tensor FP8: an amax read (2 bytes) and a cast (2 in, 1 + 1 out) per weight.
    got = elementwise.weight_quantize_seconds(HW, weights=1e6, precision="fp8")
    assert got == pytest.approx(hbm_s(2e6) + hbm_s(4e6), rel=1e-12)
