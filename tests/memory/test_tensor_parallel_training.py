"""Memory per GPU with tensor (sequence-parallel) and context parallelism in the whole
training step (docs/memory.md, "Tensor and context parallelism"), by hand on
DeepSeek-V3's shapes cut to 9 layers (3 dense, 6 MoE) on 128 H800s at pp 2, EP32:
stage 0 holds the 3 dense layers, 2 MoE layers and the embedding, stage 1 4 MoE
layers, the final norm and the LM head.

DeepSeek-V3 per token (test_whole_step.py): attention 201,344 B of which 36,992 B are
per token whatever the heads (norm input and output 2 x 7168, the query latent and its
norm 2 x 1536, the KV latent with the RoPE key 576 and its norm 512, in BF16) and
164,352 B per head's worth (128 heads x (q 192 + k 192 + v 128 + output 128) BF16 and
an FP32 log-sum-exp); an MoE block 369,760 B, a dense FFN 139,264 B, the LM head
545,792 B.
"""

from __future__ import annotations

import pytest

from moesim.config.loading import load_scenario
from moesim.config.training_layout import training_layout
from moesim.memory import memory_per_gpu
from moesim.memory import model as memory

GIB = 2**30
H, V, I_DENSE, I_MOE = 7168, 129_280, 18_432, 2048
EXPERT = 3 * H * I_MOE
LAYER_NORMS = 2 * H + 1536 + 512


def attention_params(heads: int) -> int:
    """MLA's projections with ``heads`` heads on the GPU: q_a and kv_a whole."""
    return (H * 1536 + 1536 * heads * 192 + H * 576 + 512 * heads * 256
            + heads * 128 * H)


ATTN_TOKEN, ATTN_HEADS = 36_992, 164_352
ATTN, MOE, DENSE, HEAD = 201_344, 369_760, 139_264, 545_792


def v3_9(*extra: str, global_batch: int = 256):
    return load_scenario(None, overrides=[
        "model.num_layers=9", "model.mtp_layers=0", "parallel.ep=32",
        "parallel.tokens_per_gpu=null", "parallel.micro_batches=1", "training.seq_len=4096",
        "training.micro_batch=2", "engine=fast", "parallel.gpus=128", "parallel.pp=2",
        f"training.global_batch={global_batch}", *extra])


def stage_params(scenario, rank: int) -> memory.ParamCounts:
    chunks = memory.stage_chunks(scenario, training_layout(scenario))[rank]
    return memory.stage_param_counts(scenario, chunks)


def rank_activations(scenario, rank: int) -> float:
    layout = training_layout(scenario)
    chunks = memory.stage_chunks(scenario, layout)[rank]
    return memory.stage_activation_bytes(scenario, layout, rank, chunks)


# ---------------------------------------------------------------- tp = cp = 1 unchanged


# memory_per_gpu of the whole training step just before tensor and context parallelism
# (repr of every float): 1F1B with an MTP module, interleaved with selective
# recomputation and BF16 moments, Qwen3-30B-A3B (GQA) zero-bubble with full
# recomputation and NCCL all-to-all, DeepSeek-V3's own DualPipe layout.
BEFORE = {
    ("model.num_layers=9", "parallel.ep=32", "parallel.tokens_per_gpu=null",
     "training.seq_len=4096", "training.micro_batch=2", "parallel.gpus=128", "parallel.pp=2",
     "training.global_batch=256", "model.mtp_layers=1"): (75.54192268848419, 0, {
        "dense_weights": 6.04241943359375, "routed_experts": 1.96875,
        "shared_experts": 0.24609375, "gradients": 16.5145263671875,
        "optimizer": 6.495798110961914, "activations": 41.73486328125,
        "comm_buffers": 0.5394717454910278, "kv_cache": 0.0, "runtime": 2.0}),
    ("model.num_layers=9", "parallel.ep=32", "parallel.tokens_per_gpu=null",
     "training.seq_len=4096", "training.micro_batch=1", "parallel.gpus=128", "parallel.pp=2",
     "parallel.vp=2", "training.schedule=interleaved", "training.global_batch=256",
     "training.recompute=selective", "training.optimizer_state_dtype=bf16"): (
        39.153639912605286, 0, {
            "dense_weights": 5.690460205078125, "routed_experts": 1.3125,
            "shared_experts": 0.1640625, "gradients": 14.33404541015625,
            "optimizer": 2.990907669067383, "activations": 12.1221923828125,
            "comm_buffers": 0.5394717454910278, "kv_cache": 0.0, "runtime": 2.0}),
    ("model=qwen3-30b-a3b", "routing.gate=softmax-topk", "routing.max_devices=null",
     "parallel.ep=16", "parallel.tokens_per_gpu=null", "training.seq_len=4096",
     "parallel.gpus=64", "parallel.pp=4", "training.schedule=zero-bubble",
     "training.global_batch=128", "training.recompute=full",
     "parallel.dispatch_kernel=nccl-alltoall"): (16.054007053375244, 3, {
        "dense_weights": 0.9717674255371094, "routed_experts": 0.7734375,
        "shared_experts": 0.0, "gradients": 3.4904098510742188,
        "optimizer": 5.005037784576416, "activations": 3.5633544921875,
        "comm_buffers": 0.25, "kv_cache": 0.0, "runtime": 2.0}),
    ("parallel.gpus=2048", "parallel.ep=64", "parallel.pp=16", "parallel.tokens_per_gpu=null",
     "training.schedule=dualpipe", "training.global_batch=15360", "training.micro_batch=1",
     "training.seq_len=4096", "model.mtp_layers=1", "training.optimizer_state_dtype=bf16",
     "training.recompute=selective"): (122.45611023902893, 1, {
        "dense_weights": 2.815673828125, "routed_experts": 2.625,
        "shared_experts": 0.65625, "gradients": 12.19384765625,
        "optimizer": 5.358497619628906, "activations": 96.08154296875,
        "comm_buffers": 0.7252981662750244, "kv_cache": 0.0, "runtime": 2.0}),
}


@pytest.mark.parametrize("overrides", list(BEFORE))
def test_tp_1_cp_1_is_bit_identical_to_before(overrides):
    total, stage, breakdown = BEFORE[overrides]
    estimate = memory_per_gpu(load_scenario(None, overrides=list(overrides)))
    assert estimate.breakdown_gib == breakdown
    assert estimate.total_gib == total
    assert estimate.stage == stage


# ---------------------------------------------------------------- parameters


def test_tp_2_splits_attention_heads_dense_ffn_shared_experts_and_vocabulary():
    """tp 2: the per-head projections (q_b, kv_b, o), the dense FFN, the shared expert
    and the embedding's and head's vocabulary halve; MLA's q_a and kv_a, the norms, the
    routers and the routed experts (256 / 32 = 8 slots per MoE layer) do not."""
    one, two = v3_9(), v3_9("parallel.tp=2")
    assert (training_layout(two).dp, training_layout(two).expert_dp) == (32, 2)
    # Stage 0: 3 dense + 2 MoE layers, the embedding.
    assert stage_params(two, 0) == memory.ParamCounts(
        gemm=5 * attention_params(64) + 3 * 3 * H * (I_DENSE // 2),
        other=V // 2 * H + 5 * LAYER_NORMS + 2 * 256 * H,
        shared=2 * 3 * H * (I_MOE // 2),
        routed=2 * 8 * EXPERT)
    # Stage 1: 4 MoE layers, the final norm and the LM head.
    assert stage_params(two, 1) == memory.ParamCounts(
        gemm=4 * attention_params(64),
        other=V // 2 * H + H + 4 * LAYER_NORMS + 4 * 256 * H,
        shared=4 * 3 * H * (I_MOE // 2),
        routed=4 * 8 * EXPERT)
    # Against tp 1: exactly the per-head and split parts halve.
    per_head = 1536 * 128 * 192 + 512 * 128 * 256 + 128 * 128 * H
    p1, p2 = stage_params(one, 0), stage_params(two, 0)
    assert p1.gemm - p2.gemm == 5 * per_head // 2 + 3 * 3 * H * I_DENSE // 2
    assert p1.other - p2.other == V * H // 2
    assert p2.shared == p1.shared / 2
    assert p2.routed == p1.routed
    # Gradients follow the parameters.
    estimate = memory_per_gpu(two)
    params = stage_params(two, estimate.stage)
    assert estimate.breakdown_gib["gradients"] == pytest.approx(
        4 * (params.dense + params.routed) / GIB)


def test_gqa_kv_heads_are_replicated_beyond_tp():
    """Qwen3-30B-A3B, 32 query and 4 KV heads of 128: at tp 8 each GPU holds 4 query
    heads and one KV head (replicated on 2 GPUs), as Megatron does."""
    scenario = load_scenario(None, overrides=[
        "model=qwen3-30b-a3b", "routing.gate=softmax-topk", "routing.max_devices=null",
        "parallel.ep=16", "parallel.tokens_per_gpu=null", "parallel.gpus=64",
        "parallel.pp=4", "parallel.tp=8", "training.global_batch=64"])
    params = stage_params(scenario, 1)
    h = 2048
    assert params.gemm == 12 * (h * (4 + 2 * 1) * 128 + 4 * 128 * h)
    assert params.shared == 0


def test_cp_splits_no_parameter_and_the_optimizer_shards_over_dp_x_cp():
    """cp 2 at the same 128 GPUs: the same parameters per GPU; the dense optimizer state
    shards over the dp x cp = 32 x 2 = 64 GPUs of the stage holding the same weights
    (Megatron-Core's distributed optimizer on intra_dp_cp_group), the routed experts'
    over expert_dp = 64 / 32 = 2: the same optimizer bytes as cp 1's dp = 64."""
    one, cp2 = v3_9(), v3_9("parallel.cp=2")
    layout = training_layout(cp2)
    assert (layout.dp, layout.cp, layout.expert_dp) == (32, 2, 2)
    for rank in (0, 1):
        assert stage_params(cp2, rank) == stage_params(one, rank)
    a, b = memory_per_gpu(one), memory_per_gpu(cp2)
    for key in ("dense_weights", "routed_experts", "shared_experts", "gradients",
                "optimizer", "comm_buffers", "runtime"):
        assert b.breakdown_gib[key] == a.breakdown_gib[key]
    params = stage_params(cp2, b.stage)
    assert b.breakdown_gib["optimizer"] == pytest.approx(
        12 * (params.dense / 64 + params.routed / 2) / GIB)


def test_the_tp_optimizer_shards_over_dp_and_expert_dp():
    """tp 2: dense state over dp x cp = 32, routed over expert_dp = 2."""
    scenario = v3_9("parallel.tp=2")
    estimate = memory_per_gpu(scenario)
    params = stage_params(scenario, estimate.stage)
    assert estimate.breakdown_gib["optimizer"] == pytest.approx(
        12 * (params.dense / 32 + params.routed / 2) / GIB)


# ---------------------------------------------------------------- activations


def test_tp_2_blocks_by_hand():
    """Sequence parallelism, 4096 tokens per GPU: the norms, latents, router and
    dispatched assignments of the GPU's 4096 tokens; the heads' tensors (64 heads) and
    the split FFN widths of the 8192 tokens its TP group gathers."""
    m = v3_9().model
    t = 4096
    b = memory.training_block_bytes(m, tokens=t, tp=2)
    head_half = 64 * (192 + 192 + 128 + 128) * 2 + 64 * 4
    assert memory.attention_token_bytes(m) == ATTN_TOKEN
    assert memory.attention_head_bytes(m, 2) == head_half == ATTN_HEADS // 2
    assert b.attention == t * ATTN_TOKEN + 2 * t * head_half
    assert b.dense == t * 2 * H * 2 + 2 * t * 3 * (I_DENSE // 2) * 2
    per_token = 2 * H * 2 + 256 * 4 + 8 * 12
    shared = 2 * t * 3 * (I_MOE // 2) * 2
    assignments = 8 * t * (2 * H * 2 + 3 * I_MOE * 2)
    assert b.moe == t * per_token + shared + assignments
    assert b.head == t * 2 * H * 2 + 2 * t * (V // 2) * 4
    assert b.layer_input == t * H * 2
    # Each block is tp = 1's of 8192 tokens, halved.
    full = memory.training_block_bytes(m, tokens=2 * t)
    assert (full.attention, full.dense, full.moe, full.head) == (
        2 * t * ATTN, 2 * t * DENSE, 2 * t * MOE, 2 * t * HEAD)
    for name in ("attention", "dense", "moe", "projection", "layer_input", "head"):
        assert 2 * getattr(b, name) == getattr(full, name)


def test_gqa_replicated_kv_heads_cost_activations_too():
    """Qwen3-30B-A3B at tp 8: 4 query heads and 1 (replicated) KV head per GPU over the
    8 T tokens of the TP group: 8 T x ((2 x 4 + 2 x 1) x 128 x 2 + 4 x 4) B, 20,608 B per
    token of T against tp 1's 18,560."""
    m = load_scenario(None, overrides=["model=qwen3-30b-a3b"]).model
    t = 1024
    b = memory.training_block_bytes(m, tokens=t, tp=8)
    assert b.attention == t * 2 * 2048 * 2 + 8 * t * ((2 * 4 + 2) * 128 * 2 + 4 * 4)
    assert memory.training_block_bytes(m, tokens=t).attention == t * (
        2 * 2048 * 2 + (2 * 32 + 2 * 4) * 128 * 2 + 32 * 4)


def test_tp_2_halves_the_activations_at_the_same_global_batch():
    """256 sequences of 4096 tokens: tp 1 runs dp 64 replicas of 2 micro-batches of
    8192 tokens per GPU, tp 2 dp 32 replicas of 4 micro-batches of 4096 tokens per GPU.
    1F1B at pp 2: rank 0 holds 2 micro-batches either way, of half the bytes."""
    one, two = v3_9(), v3_9("parallel.tp=2")
    l1, l2 = training_layout(one), training_layout(two)
    assert (l1.micro_batches, l1.tokens_per_microbatch) == (2, 8192)
    assert (l2.micro_batches, l2.tokens_per_microbatch) == (4, 4096)
    rank0 = 2 * 4096 * (5 * ATTN + 3 * DENSE + 2 * MOE)
    assert rank_activations(two, 0) == rank0
    assert rank_activations(one, 0) == 2 * rank0
    rank1 = 4096 * (4 * (ATTN + MOE) + HEAD)
    assert rank_activations(two, 1) == rank1
    assert rank_activations(one, 1) == 2 * rank1


def test_cp_2_halves_the_activations_at_the_same_global_batch():
    """cp 2: each GPU keeps 8192 / 2 = 4096 tokens of a micro-batch, its own sequence
    chunk's queries and one chunk's keys and values for all 128 heads (ring attention
    passes the others around and keeps one ring buffer): half of cp 1's."""
    one, cp2 = v3_9(), v3_9("parallel.cp=2")
    assert training_layout(cp2).tokens_per_microbatch == 4096
    for rank in (0, 1):
        assert 2 * rank_activations(cp2, rank) == rank_activations(one, rank)
    both = v3_9("parallel.cp=2", "parallel.tp=2")
    assert training_layout(both).tokens_per_microbatch == 2048
    for rank in (0, 1):
        assert 4 * rank_activations(both, rank) == rank_activations(one, rank)


def test_full_recompute_keeps_sequence_parallel_layer_inputs():
    """Full recomputation at tp 2: each of stage 0's 5 layers keeps its input for the
    4096 tokens of the GPU (14,336 B each) for 2 micro-batches, plus one whole layer
    of one micro-batch (the larger of a dense and an MoE layer: the MoE one). With
    sequence parallelism 4096 tokens per GPU keep 4096 x the per-token bytes of tp 1."""
    scenario = v3_9("parallel.tp=2", "training.recompute=full")
    assert rank_activations(scenario, 0) == (
        2 * 5 * 4096 * H * 2 + 4096 * (ATTN + MOE))


V3_2048 = ["parallel.gpus=2048", "parallel.ep=64", "parallel.pp=16",
           "parallel.tokens_per_gpu=null", "training.schedule=dualpipe",
           "training.global_batch=15360", "training.micro_batch=1", "training.seq_len=4096",
           "model.mtp_layers=1", "training.optimizer_state_dtype=bf16",
           "training.recompute=selective"]


@pytest.mark.parametrize("split", ["parallel.tp=2", "parallel.cp=2"])
def test_deepseek_v3_s_layout_fits_with_tp_or_cp_2(split):
    """DeepSeek-V3 on 2048 H800s (test_whole_step.py): 96.1 GiB of activations on GPU 1
    at tp = cp = 1; tp 2 or cp 2 keeps 2048 tokens per GPU of each of the 17
    micro-batches of 4 MoE layers in flight (selective: 51,840 + 318,560 B per token
    and layer), 48.0 GiB, and the GPU fits in 80 GiB."""
    scenario = load_scenario(None, overrides=[*V3_2048, split])
    layout = training_layout(scenario)
    assert (layout.dp, layout.micro_batches, layout.tokens_per_microbatch) == (64, 240, 2048)
    estimate = memory_per_gpu(scenario)
    assert estimate.stage == 1
    assert estimate.breakdown_gib["activations"] == pytest.approx(
        17 * 4 * 2048 * (51_840 + 318_560) / GIB)
    assert estimate.fits
