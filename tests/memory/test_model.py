"""Memory per GPU (docs/memory.md): what one GPU holds, checked by hand on DeepSeek-V3.

DeepSeek-V3 (hidden 7168, 61 layers of which 3 dense, 256 routed experts of width
2048, one shared expert, MLA) has 3 x 7168 x 2048 = 44,040,192 parameters per expert.
"""

from __future__ import annotations

import pytest

import moesim
from moesim.config.loading import load_scenario
from moesim.memory import BREAKDOWN_KEYS, explain, memory_per_gpu
from moesim.memory import model as memory

GIB = 2**30
EXPERT = 3 * 7168 * 2048  # one DeepSeek-V3 expert's SwiGLU weights
MOE_LAYERS = 61 - 3


def v3_decode(ep: int, *extra: str):
    """DeepSeek-V3 decode on the H800 cluster: 64 requests of 4096 + 1024 tokens per GPU,
    FP8 KV cache, DeepEP low-latency kernels."""
    return load_scenario(None, overrides=[
        "mode=decode", "parallel.tokens_per_gpu=null", f"parallel.ep={ep}",
        "parallel.micro_batches=1", "parallel.dispatch_kernel=deepep-low-latency",
        "serving={batch: 64, isl: 4096, osl: 1024, kv_dtype: fp8}",
        "routing.max_devices=null", *extra])


def v2_lite_training(*extra: str):
    return load_scenario(None, overrides=[
        "model=deepseek-v2-lite", "parallel.ep=8", "routing.gate=softmax-topk",
        "routing.max_devices=null", *extra])


def gib(nbytes: float) -> float:
    return nbytes / GIB


# ---------------------------------------------------------------- serving


def test_v3_decode_does_not_fit_an_h800_at_ep8_but_fits_at_ep64():
    """At EP8 each GPU holds 256 / 8 = 32 FP8 experts of each of the 58 MoE layers:
    58 x 32 x 44,040,192 x 1 B = 81.7e9 B = 76.1 GiB, over the H800's 80 GiB with the
    rest; at EP64 the experts take an eighth of that."""
    ep8, ep64 = memory_per_gpu(v3_decode(8)), memory_per_gpu(v3_decode(64))
    routed = MOE_LAYERS * 32 * EXPERT * 1
    assert routed == 81_738_596_352
    assert ep8.breakdown_gib["routed_experts"] == pytest.approx(gib(routed))
    assert ep64.breakdown_gib["routed_experts"] == pytest.approx(gib(routed) / 8)
    assert ep8.capacity_gib == 80
    assert not ep8.fits and ep8.total_gib > 100
    assert ep64.fits and ep64.total_gib < 50
    assert "exceeds the H800's 80 GiB" in explain(ep8)
    assert "routed experts 76.1" in explain(ep8)


def test_v3_decode_kv_cache_is_the_latent_of_every_cached_token():
    """MLA caches 512 + 64 values per token and layer, one FP8 byte each, for 64
    requests of 4096 + 1024 tokens over 61 layers; attention-DP GPUs all hold their own."""
    estimate = memory_per_gpu(v3_decode(64))
    assert estimate.breakdown_gib["kv_cache"] == pytest.approx(gib(576 * 61 * 64 * 5120))
    assert estimate.breakdown_gib["gradients"] == estimate.breakdown_gib["optimizer"] == 0.0


def test_serving_weights_are_fp8_gemms_with_bf16_embeddings_and_norms():
    """Dense weights at EP64: attention projections of 61 layers and 3 dense FFNs in FP8,
    embedding, LM head, norms and routers in BF16."""
    attention = (7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256
                 + 128 * 128 * 7168)
    gemm = 61 * attention + 3 * 3 * 7168 * 18432
    other = 2 * 129280 * 7168 + 61 * (2 * 7168 + 1536 + 512) + 7168 + 58 * 256 * 7168
    estimate = memory_per_gpu(v3_decode(64))
    assert estimate.breakdown_gib["dense_weights"] == pytest.approx(gib(gemm + 2 * other))
    assert estimate.breakdown_gib["shared_experts"] == pytest.approx(gib(58 * EXPERT))


def test_deepep_low_latency_buffers_hold_every_expert_s_tokens():
    """DeepEP's low-latency hint for 64 tokens per rank and 256 experts: two send and
    two receive buffers of 256 x 64 combine messages (7168 BF16 values + 56 x 4 bytes),
    two signalling buffers of 256 ints, then DeepEP's 32 MiB workspace."""
    buffers = 2 * (2 * 256 * 64 * (2 * 7168 + 56 * 4) + 1024)
    expected = (buffers + 128) // 128 * 128 + 32 * 2**20
    estimate = memory_per_gpu(v3_decode(8))
    assert estimate.breakdown_gib["comm_buffers"] == pytest.approx(gib(expected))


def test_redundant_experts_add_slots_per_gpu():
    """64 redundant slots over EP64: 5 slots per GPU instead of 4."""
    plain = memory_per_gpu(v3_decode(64))
    redundant = memory_per_gpu(v3_decode(64, "placement.policy=eplb-global",
                                         "placement.redundant_experts=64"))
    assert redundant.breakdown_gib["routed_experts"] == pytest.approx(
        plain.breakdown_gib["routed_experts"] * 5 / 4)
    assert redundant.breakdown_gib["comm_buffers"] > plain.breakdown_gib["comm_buffers"]


# ---------------------------------------------------------------- training


def test_v3_training_at_ep64_on_64_h800s_does_not_fit_without_pipeline_parallelism():
    """Every GPU holds all 61 layers: ~17.1e9 replicated parameters (attention, dense
    FFNs, embedding and LM head, norms, routers, shared experts) and 58 x 4 experts.
    BF16 weights and FP32 gradients of those alone are 6 B x 27.3e9 = 164 GB."""
    attention = (7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256
                 + 128 * 128 * 7168)
    dense = (61 * attention + 3 * 3 * 7168 * 18432 + 2 * 129280 * 7168
             + 61 * (2 * 7168 + 1536 + 512) + 7168 + 58 * 256 * 7168 + 58 * EXPERT)
    routed = 58 * 4 * EXPERT
    assert dense == 17_117_633_536 and routed == 10_217_324_544
    estimate = memory_per_gpu(load_scenario(None))
    parts = estimate.breakdown_gib
    assert parts["gradients"] == pytest.approx(gib(4 * (dense + routed)))
    # Distributed optimizer: FP32 master + Adam m, v (12 B) over 64 replicas of the dense
    # parameters, one replica (gpus / ep = 1) of the routed experts.
    assert parts["optimizer"] == pytest.approx(gib(12 * (dense / 64 + routed)))
    weights = parts["dense_weights"] + parts["shared_experts"] + parts["routed_experts"]
    assert weights == pytest.approx(gib(2 * (dense + routed)))
    assert (weights + parts["gradients"]) * GIB > 100e9
    assert not estimate.fits


def test_v3_training_keeps_every_layer_s_activations():
    """The step runs every forward before any backward: all 61 layers' saved tensors of
    the GPU's 4096 tokens are live at the turn (201,344 B per token in attention, 369,760
    in an MoE layer, 139,264 in a dense FFN, 545,792 in the LM head and its loss)."""
    m = load_scenario(None).model
    assert memory.attention_bytes_per_token(m) == 201_344
    assert memory.moe_bytes(m, tokens=1, assignments=8, expert_width=2048) == 369_760
    assert memory.dense_ffn_bytes_per_token(m) == 139_264
    assert memory.lm_head_bytes(m, rows=1) == 545_792
    per_token = 61 * 201_344 + 58 * 369_760 + 3 * 139_264 + 545_792
    estimate = memory_per_gpu(load_scenario(None))
    assert estimate.breakdown_gib["activations"] == pytest.approx(gib(4096 * per_token))
    forward = memory_per_gpu(load_scenario(None, overrides=["mode=inference"]))
    assert forward.breakdown_gib["activations"] < estimate.breakdown_gib["activations"] / 50


def test_bf16_moments_shrink_adam_from_12_to_8_bytes_per_parameter():
    fp32 = memory_per_gpu(load_scenario(None)).breakdown_gib["optimizer"]
    bf16 = memory_per_gpu(load_scenario(
        None, overrides=["training.optimizer_state_dtype=bf16"])).breakdown_gib["optimizer"]
    assert bf16 == pytest.approx(fp32 * 8 / 12)


def test_a_small_model_trains_within_an_h800():
    estimate = memory_per_gpu(v2_lite_training())
    assert estimate.fits
    assert set(estimate.breakdown_gib) == set(BREAKDOWN_KEYS)
    assert estimate.total_gib == pytest.approx(sum(estimate.breakdown_gib.values()))


def test_the_distributed_optimizer_shards_adam_over_the_data_parallel_replicas():
    """At EP1 every parameter has 8 replicas on 8 GPUs: without the distributed
    optimizer each GPU keeps 8 times the state; with EP8 on 16 GPUs the dense part is
    sharded 16 ways, the experts 2 ways."""
    def optimizer(*extra):
        return memory_per_gpu(v2_lite_training(*extra)).breakdown_gib["optimizer"]

    ep1 = ("parallel.ep=1", "parallel.gpus=8")
    assert optimizer(*ep1, "training.distributed_optimizer=false") == pytest.approx(
        8 * optimizer(*ep1))
    sharded = v2_lite_training("parallel.gpus=16")
    params = memory.param_counts(sharded)
    assert memory_per_gpu(sharded).breakdown_gib["optimizer"] == pytest.approx(
        gib(12 * (params.dense / 16 + params.routed / 2)))
    assert optimizer("parallel.gpus=16", "training.distributed_optimizer=false") == (
        pytest.approx(gib(12 * (params.dense + params.routed))))


# ---------------------------------------------------------------- the summary


SMALL = ["model.num_layers=4", "parallel.tokens_per_gpu=256", "routing.layer_samples=1"]


def test_the_summary_carries_the_estimate_and_a_warning_when_it_does_not_fit():
    scenario = load_scenario(None, overrides=SMALL)
    result = moesim.simulate(scenario)
    estimate = memory_per_gpu(scenario)
    s = result.summary
    assert s["memory_gib_per_gpu"] == estimate.total_gib
    assert s["memory_breakdown_gib"] == estimate.breakdown_gib
    assert s["memory_capacity_gib"] == 80
    assert s["fits_in_memory"] is True
    assert not any(w.startswith("memory:") for w in result.warnings)

    tight = moesim.simulate(load_scenario(None, overrides=[*SMALL, "hardware.hbm_GB=8"]))
    assert tight.summary["fits_in_memory"] is False
    (warning,) = [w for w in tight.warnings if w.startswith("memory:")]
    assert "exceeds the H800's 8 GiB" in warning
