"""Memory per GPU in the whole training step (docs/memory.md, "The whole training step"):
pipeline stages, DualPipe's two copies, data-parallel sharding, micro-batches in flight
and recomputation, checked by hand on DeepSeek-V3's shapes.

Per token, DeepSeek-V3's layers keep (test_model.py derives the first four):
attention 201,344 B, an MoE block 369,760 B (its 8 assignments included), a dense FFN
139,264 B, the LM head 545,792 B; a layer's input is 7168 x 2 = 14,336 B. With selective
recomputation (norm outputs, MLA's up-projected q/k/v and the MoE SwiGLU outputs
dropped): attention 7168 + 1536 + 576 + 128 x 128 = 25,664 BF16 values and 128 FP32
log-sum-exps = 51,840 B; MoE 7168 x 2 + 256 x 4 + 8 x 12 + 2 x 2048 x 2 = 23,648 B per
token and 8 x (2 x 7168 x 2 + 2 x 2048 x 2) = 294,912 B per token's assignments, 318,560
B; dense FFN 7168 x 2 + 3 x 18432 x 2 = 124,928 B; LM head 7168 x 2 + 129,280 x 4 =
531,456 B.
"""

from __future__ import annotations

import dataclasses

import pytest

from moesim.config.loading import load_scenario
from moesim.config.training_layout import TrainingLayout, training_layout, whole_step
from moesim.memory import explain, memory_per_gpu
from moesim.memory import model as memory

GIB = 2**30
H, V = 7168, 129_280
EXPERT = 3 * H * 2048  # one expert's SwiGLU weights
ATTENTION_PARAMS = 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168
# One MoE layer's parameters outside the routed experts: attention, its four norms
# (2h + q_lora + kv_lora), the router, the shared expert.
MOE_LAYER_DENSE = ATTENTION_PARAMS + (2 * H + 1536 + 512) + 256 * H + EXPERT
ATTN, MOE, DENSE, HEAD, INPUT = 201_344, 369_760, 139_264, 545_792, 14_336
ATTN_S, MOE_S, DENSE_S, HEAD_S = 51_840, 318_560, 124_928, 531_456
TOKENS = 4096  # one sequence of 4096 tokens per micro-batch


def gib(nbytes: float) -> float:
    return nbytes / GIB


def v3_pipeline(pp: int, *extra: str, schedule: str = "1f1b", global_batch: int = 1024,
                gpus: int = 512):
    """A 31-layer, all-MoE DeepSeek-V3 on ``gpus`` H800s at EP64, ``pp`` stages. The
    split counts the LM head as one more layer (``chunk_layers``): at pp 4 the 32 slots
    give 8 layers to each stage but the last, which holds 7 and the head."""
    return load_scenario(None, overrides=[
        f"parallel.gpus={gpus}", "parallel.ep=64", f"parallel.pp={pp}",
        "parallel.tokens_per_gpu=null", "model.num_layers=31", "model.first_dense_layers=0",
        "model.mtp_layers=0", f"training.schedule={schedule}",
        f"training.global_batch={global_batch}", "training.micro_batch=1",
        "training.seq_len=4096", *extra])


def rank_activations(scenario, rank: int) -> float:
    layout = training_layout(scenario)
    chunks = memory.stage_chunks(scenario, layout)[rank]
    return memory.stage_activation_bytes(scenario, layout, rank, chunks)


# ---------------------------------------------------------------- the older form


# memory_per_gpu before the whole training step existed, at commit 0d90397 (repr of every
# float): the default scenario (V3, EP64 on 64 H800s, 4096 tokens in 2 micro-batches),
# V2-Lite at EP8 on 16 GPUs, V3 on 128 GPUs with BF16 moments and gradients and NCCL
# all-to-all, and V3 in mode inference.
BEFORE = {
    (): (404.98604637384415, {
        "dense_weights": 27.126264572143555, "routed_experts": 19.03125,
        "shared_experts": 4.7578125, "gradients": 101.83065414428711,
        "optimizer": 117.17663222551346, "activations": 132.338134765625,
        "comm_buffers": 0.7252981662750244, "kv_cache": 0.0, "runtime": 2.0}),
    ("model=deepseek-v2-lite", "parallel.ep=8", "parallel.gpus=16", "routing.gate=softmax-topk",
     "routing.max_devices=null", "parallel.micro_batches=2", "parallel.tokens_per_gpu=8192"): (
        65.46841740608215, {
            "dense_weights": 1.6052160263061523, "routed_experts": 3.3515625,
            "shared_experts": 0.837890625, "gradients": 11.589338302612305,
            "optimizer": 10.970852494239807, "activations": 34.9649658203125,
            "comm_buffers": 0.14859163761138916, "kv_cache": 0.0, "runtime": 2.0}),
    ("parallel.gpus=128", "training.optimizer_state_dtype=bf16",
     "parallel.dispatch_kernel=nccl-alltoall", "training.grad_dtype=bf16",
     "parallel.micro_batches=2"): (275.6651663184166, {
        "dense_weights": 27.126264572143555, "routed_experts": 19.03125,
        "shared_experts": 4.7578125, "gradients": 50.915327072143555,
        "optimizer": 39.058877408504486, "activations": 132.338134765625,
        "comm_buffers": 0.4375, "kv_cache": 0.0, "runtime": 2.0}),
    ("mode=inference",): (32.24237084388733, {
        "dense_weights": 15.389265060424805, "routed_experts": 9.515625,
        "shared_experts": 2.37890625, "gradients": 0.0, "optimizer": 0.0,
        "activations": 2.2332763671875, "comm_buffers": 0.7252981662750244,
        "kv_cache": 0.0, "runtime": 2.0}),
}


@pytest.mark.parametrize("overrides", list(BEFORE))
def test_the_older_form_is_bit_identical_to_before(overrides):
    """``parallel.tokens_per_gpu`` at pp 1 (and the forward-only modes) estimate exactly
    what they did before pipelines existed (the whole step's own fields are refused
    there; an MTP module is not part of the EP form)."""
    total, breakdown = BEFORE[overrides]
    for extra in ((), ("model.mtp_layers=1",)):
        scenario = load_scenario(None, overrides=[*overrides, *extra])
        assert not whole_step(scenario)
        estimate = memory_per_gpu(scenario)
        assert estimate.breakdown_gib == breakdown
        assert estimate.total_gib == total
        assert estimate.stage is None


# ---------------------------------------------------------------- parameters


def test_doubling_pp_halves_the_worst_stage_s_routed_experts():
    """31 MoE layers and the head over 4 stages: 8 layers on stage 0, each with 256 /
    64 = 4 expert slots of 44,040,192 BF16 weights; over 8 stages 4 layers, half the
    bytes."""
    pp4, pp8 = memory_per_gpu(v3_pipeline(4)), memory_per_gpu(v3_pipeline(8))
    assert pp4.breakdown_gib["routed_experts"] == pytest.approx(gib(8 * 4 * EXPERT * 2))
    assert pp8.breakdown_gib["routed_experts"] == pytest.approx(
        pp4.breakdown_gib["routed_experts"] / 2)
    assert pp8.breakdown_gib["shared_experts"] == pytest.approx(
        pp4.breakdown_gib["shared_experts"] / 2)
    assert pp4.stage == pp8.stage == 0  # most micro-batches in flight, and the embedding


def test_layers_split_contiguously_dense_first_on_stage_0():
    """DeepSeek-V3's 61 layers, its head and its MTP module are 63 slots over 16 stages:
    15 stages of 4, then the last layer with the head and the MTP module; the 3 dense
    layers and the embedding on stage 0."""
    scenario = load_scenario(None, overrides=[
        "parallel.gpus=2048", "parallel.pp=16", "parallel.tokens_per_gpu=null",
        "training.global_batch=15360", "model.mtp_layers=1"])
    stages = [chunks[0] for chunks in memory.stage_chunks(scenario, training_layout(scenario))]
    assert [c.layers for c in stages] == [4] * 15 + [1]
    assert (stages[0].dense, stages[0].moe, stages[0].embedding) == (3, 1, True)
    assert all(c.dense == 0 and not c.embedding and not c.head for c in stages[1:15])
    assert (stages[15].head, stages[15].mtp, stages[15].embedding) == (True, 1, False)


def test_the_mtp_module_is_one_more_moe_layer_with_a_projection():
    """On one GPU (EP1) DeepSeek-V3's main model has 671,026,404,352 parameters (the
    report's 671B); the MTP module adds one MoE layer (attention, norms, router, shared
    and 256 routed experts), its 7168 x 14336 projection and three RMSNorms, sharing the
    embedding and the head: 11,610,067,968 (the Hugging Face checkpoint's 685B also
    stores a copy of the embedding and head with it)."""
    scenario = load_scenario(None, overrides=[
        "parallel.ep=1", "parallel.gpus=1", "routing.max_devices=null"])
    whole = memory.Chunk(dense=3, moe=58, embedding=True, head=True, mtp=0)
    plain = memory.stage_param_counts(scenario, [whole])
    assert plain == memory.param_counts(scenario)
    assert plain.dense + plain.routed == 671_026_404_352
    mtp = memory.stage_param_counts(
        scenario, [memory.Chunk(dense=3, moe=58, embedding=True, head=True, mtp=1)])
    module = MOE_LAYER_DENSE + 256 * EXPERT + 2 * H * H + 3 * H
    assert module == 11_610_067_968
    assert mtp.dense + mtp.routed - (plain.dense + plain.routed) == module


def test_an_mtp_stage_without_the_embedding_keeps_a_copy():
    """Megatron-Core builds the embedding on the MTP's stage too: at pp 4 the MTP module
    (one more slot of the split: 9, 8, 8 and 6 layers) adds to the last stage one MoE
    layer (its 4 expert slots routed), the projection, three norms and a V x h
    embedding. Under DualPipe the last stage sits on the GPU of the first and shares its
    embedding."""
    scenario = v3_pipeline(4, "model.mtp_layers=1")
    [last] = memory.stage_chunks(scenario, training_layout(scenario))[3]
    assert last == memory.Chunk(dense=0, moe=6, embedding=False, head=True, mtp=1)
    plain = memory.stage_param_counts(scenario, [dataclasses.replace(last, mtp=0)])
    mtp = memory.stage_param_counts(scenario, [last])
    assert mtp.dense - plain.dense == MOE_LAYER_DENSE + 2 * H * H + 3 * H + V * H
    assert mtp.routed - plain.routed == 4 * EXPERT

    dual = v3_pipeline(4, "model.mtp_layers=1", schedule="dualpipe")
    rank0 = memory.stage_chunks(dual, training_layout(dual))[0]
    assert [c.embedding for c in rank0] == [True, False] and rank0[1].mtp == 1
    # One embedding, one head and its final norm, 9 + 6 + 1 layers' norms and routers,
    # the MTP's three norms.
    assert memory.stage_param_counts(dual, rank0).other == (
        2 * V * H + H + 16 * (2 * H + 1536 + 512) + 3 * H + 16 * 256 * H)


def test_dualpipe_keeps_two_stages_parameters():
    """DualPipe's GPU s holds stage s and stage pp - 1 - s (deepseek-ai/DualPipe:
    "Parameter 2x"): at pp 4, GPU 1 holds 16 layers where 1F1B's holds 8, and GPU 0
    stage 0's 8 layers and the embedding and stage 3's 7 layers and the head, with their
    FP32 gradients and their optimizer state."""
    onef, dual = v3_pipeline(4), v3_pipeline(4, schedule="dualpipe")
    rank1 = memory.stage_param_counts(dual, memory.stage_chunks(dual, training_layout(dual))[1])
    stage1 = memory.stage_param_counts(onef, memory.stage_chunks(onef, training_layout(onef))[1])
    assert (rank1.routed, rank1.shared, rank1.dense) == (
        2 * stage1.routed, 2 * stage1.shared, 2 * stage1.dense)
    dual = memory_per_gpu(dual)
    assert dual.stage == 0
    dense = 15 * MOE_LAYER_DENSE + 2 * V * H + H  # embedding, head, final norm
    routed = 15 * 4 * EXPERT
    assert dual.breakdown_gib["routed_experts"] == pytest.approx(gib(2 * routed))
    assert dual.breakdown_gib["gradients"] == pytest.approx(gib(4 * (dense + routed)))
    weights = sum(dual.breakdown_gib[k] for k in ("dense_weights", "shared_experts",
                                                  "routed_experts"))
    assert weights == pytest.approx(gib(2 * (dense + routed)))


# ---------------------------------------------------------------- data parallelism


def test_the_optimizer_shards_over_the_stage_s_replicas():
    """512 GPUs in 4 stages of 128: the dense parameters have dp = 128 replicas, the
    routed experts expert_dp = 128 / 64 = 2 (not 512 and 512 / 64 = 8). Stage 0: 8 MoE
    layers and the embedding."""
    scenario = v3_pipeline(4)
    layout = training_layout(scenario)
    assert (layout.dp, layout.expert_dp, layout.micro_batches) == (128, 2, 8)
    dense, routed = 8 * MOE_LAYER_DENSE + V * H, 8 * 4 * EXPERT
    estimate = memory_per_gpu(scenario)
    assert estimate.stage == 0
    assert estimate.breakdown_gib["optimizer"] == pytest.approx(
        gib(12 * (dense / 128 + routed / 2)))
    unsharded = memory_per_gpu(v3_pipeline(4, "training.distributed_optimizer=false"))
    assert unsharded.breakdown_gib["optimizer"] == pytest.approx(gib(12 * (dense + routed)))


# ---------------------------------------------------------------- activations in flight


@pytest.mark.parametrize(("global_batch", "micro_batches", "held"),
                         [(256, 2, 2), (512, 4, 4), (1024, 8, 4), (2048, 16, 4)])
def test_1f1b_s_first_stage_keeps_min_pp_m_micro_batches(global_batch, micro_batches, held):
    """1F1B at pp 4: stage 0 forwards pp - 1 = 3 micro-batches before its first
    backward and one more in the steady state: min(4, m) micro-batches of its 8 layers
    and 4096 tokens."""
    scenario = v3_pipeline(4, global_batch=global_batch)
    assert training_layout(scenario).micro_batches == micro_batches
    per_micro_batch = TOKENS * 8 * (ATTN + MOE)
    estimate = memory_per_gpu(scenario)
    assert estimate.stage == 0
    assert estimate.breakdown_gib["activations"] == pytest.approx(gib(held * per_micro_batch))
    # The last stage holds one of its 7 layers, plus the logits of one micro-batch.
    assert rank_activations(scenario, 3) == pytest.approx(
        TOKENS * 7 * (ATTN + MOE) + TOKENS * HEAD)


def test_interleaving_holds_pp_plus_pp_minus_1_over_vp_micro_batches():
    """Interleaved 1F1B at pp 4, vp 2, m 8: stage 0 warms up with 2 (pp - 1) + (vp - 1)
    pp = 10 chunk forwards, then one more: 11 chunks of 4 layers, 5.5 micro-batches of
    its 8 layers = (1 + (pp - 1) / (pp vp)) pp (Narayanan et al. 2021)."""
    scenario = v3_pipeline(4, "parallel.vp=2", schedule="interleaved")
    assert [c.layers for c in memory.stage_chunks(scenario, training_layout(scenario))[0]] == [4, 4]
    per_micro_batch = TOKENS * 8 * (ATTN + MOE)
    assert rank_activations(scenario, 0) == pytest.approx(5.5 * per_micro_batch)
    assert 5.5 == 4 * (1 + 3 / 8)


def test_zero_bubble_holds_pp_micro_batches_on_every_stage():
    """ZB-H1 defers up to s weight passes on stage s, so every stage keeps pp."""
    scenario = v3_pipeline(4, schedule="zero-bubble")
    per_micro_batch = TOKENS * 8 * (ATTN + MOE)
    assert rank_activations(scenario, 1) == pytest.approx(4 * per_micro_batch)
    assert rank_activations(scenario, 3) == pytest.approx(
        4 * TOKENS * 7 * (ATTN + MOE) + TOKENS * HEAD)


def test_dualpipe_holds_pp_plus_one_micro_batches_of_its_two_stages():
    """DualPipe at pp 4: GPU 1 holds pp - 1 = 3 micro-batches of stage 1 (the direction
    that starts at stage 0) and 2 of stage 2 (the reverse one): pp + 1 = 5 in all, each
    of one 8-layer stage (deepseek-ai/DualPipe: "Activation PP+1")."""
    scenario = v3_pipeline(4, schedule="dualpipe")
    layout = training_layout(scenario)
    assert memory.in_flight(layout, 1, 2) == [3.0, 2.0]
    assert memory.in_flight(layout, 0, 2) == [4.0, 1.0]
    per_micro_batch = TOKENS * 8 * (ATTN + MOE)
    assert rank_activations(scenario, 1) == pytest.approx(5 * per_micro_batch)


@pytest.mark.parametrize(("schedule", "pp", "vp", "m"), [
    ("1f1b", 4, 1, 8), ("1f1b", 8, 1, 3), ("zero-bubble", 4, 1, 8), ("zero-bubble", 4, 1, 2),
    ("interleaved", 4, 2, 8), ("interleaved", 4, 3, 8), ("interleaved", 4, 2, 4),
    ("dualpipe", 4, 1, 8), ("dualpipe", 8, 1, 20)])
def test_the_schedules_hold_the_micro_batches_the_memory_model_counts(schedule, pp, vp, m):
    """Walk moesim.pipeline's work lists: a forward adds (micro-batch, chunk), its last
    backward part (BW, W, or the backward half of FB) removes it. The most alive at once
    is :func:`in_flight`'s count (per chunk for DualPipe, where both maxima coincide)."""
    from moesim.pipeline.schedules import PipelineSpec, build_schedule

    spec = PipelineSpec(schedule=schedule, pp=pp, vp=vp, micro_batches=m)
    chunks = 2 if schedule == "dualpipe" else vp
    layout = TrainingLayout(gpus=pp, tp=1, pp=pp, vp=vp, cp=1, ep=1, dp=1, expert_dp=1,
                            stage_gpus=1, micro_batches=m, tokens_per_microbatch=1,
                            seq_len=1, schedule=schedule, whole_step=True)
    for rank, work in enumerate(build_schedule(spec)):
        live: set[tuple[int, int]] = set()
        most, per_chunk = 0, [0] * chunks
        for item in work:
            if item.kind in ("F", "FB"):
                live.add((item.microbatch, item.chunk))
                most = max(most, len(live))
                per_chunk = [max(n, sum(1 for _, c in live if c == k))
                             for k, n in enumerate(per_chunk)]
            if item.kind in ("BW", "W"):
                live.discard((item.microbatch, item.chunk))
            if item.kind == "FB":
                live.discard((item.bwd_microbatch, item.bwd_chunk))
        counted = memory.in_flight(layout, rank, chunks)
        assert sum(counted) == pytest.approx(most)
        if schedule == "dualpipe":
            assert counted == per_chunk


# ---------------------------------------------------------------- recomputation


def test_full_recompute_keeps_layer_inputs_and_one_whole_layer():
    """Full uniform recomputation, one layer per unit: each of stage 0's 8 layers keeps
    its 14,336 B input per token for the 4 micro-batches in flight, and the layer being
    recomputed its whole saved tensors for one micro-batch."""
    scenario = v3_pipeline(4, "training.recompute=full")
    assert rank_activations(scenario, 0) == pytest.approx(
        4 * 8 * TOKENS * INPUT + TOKENS * (ATTN + MOE))
    # The last stage keeps its logits whole (the LM head is not recomputed): its one
    # micro-batch of 7 layers' inputs and its logits outweigh stage 0's 4 micro-batches
    # of 8 layers' inputs. Stage 0's eighth layer's weights and training state outweigh
    # that: it stays the worst GPU.
    last = 7 * TOKENS * INPUT + TOKENS * (ATTN + MOE) + TOKENS * HEAD
    assert rank_activations(scenario, 3) == pytest.approx(last)
    assert last > rank_activations(scenario, 0)
    assert memory_per_gpu(scenario).stage == 0


def test_selective_recompute_drops_norms_up_projections_and_moe_activations():
    m = v3_pipeline(4).model
    assert memory.attention_bytes_per_token(m, recompute="selective") == ATTN_S
    assert memory.moe_bytes(m, tokens=1, assignments=8, expert_width=2048,
                            recompute="selective") == MOE_S
    assert memory.dense_ffn_bytes_per_token(m, recompute="selective") == DENSE_S
    assert memory.lm_head_bytes(m, rows=1, recompute="selective") == HEAD_S
    selective = rank_activations(v3_pipeline(4, "training.recompute=selective"), 0)
    assert selective == pytest.approx(4 * 8 * TOKENS * (ATTN_S + MOE_S))
    none = rank_activations(v3_pipeline(4), 0)
    full = rank_activations(v3_pipeline(4, "training.recompute=full"), 0)
    assert full < selective < none


# ---------------------------------------------------------------- pp 1, global batch


def test_a_global_batch_at_pp_1_runs_its_micro_batches_one_after_another():
    """V3 on 64 GPUs with a global batch of 256 sequences: 4 micro-batches of 4096
    tokens per GPU, accumulated one after another, so one micro-batch's tensors of all
    61 layers are live, as the older form's 4096 tokens; parameters and optimizer state
    as the older form's (dp = 64, expert_dp = 1)."""
    older = memory_per_gpu(load_scenario(None))
    scenario = load_scenario(None, overrides=[
        "parallel.tokens_per_gpu=null", "training.global_batch=256", "model.mtp_layers=0"])
    layout = training_layout(scenario)
    assert (layout.whole_step, layout.micro_batches, layout.tokens_per_microbatch) == (
        True, 4, 4096)
    estimate = memory_per_gpu(scenario)
    assert estimate.stage == 0
    per_token = 61 * ATTN + 58 * MOE + 3 * DENSE + HEAD
    assert estimate.breakdown_gib["activations"] == pytest.approx(gib(TOKENS * per_token))
    for key in ("dense_weights", "routed_experts", "shared_experts", "gradients", "optimizer",
                "activations", "comm_buffers", "runtime"):
        assert estimate.breakdown_gib[key] == pytest.approx(older.breakdown_gib[key])
    two = memory_per_gpu(load_scenario(None, overrides=[
        "parallel.tokens_per_gpu=null", "training.global_batch=256", "training.micro_batch=2",
        "model.mtp_layers=0"]))
    assert two.breakdown_gib["activations"] == pytest.approx(
        2 * estimate.breakdown_gib["activations"])


# ---------------------------------------------------------------- DeepSeek-V3's own layout


V3_2048 = ["parallel.gpus=2048", "parallel.ep=64", "parallel.pp=16",
           "parallel.tokens_per_gpu=null", "training.schedule=dualpipe",
           "training.global_batch=15360", "training.micro_batch=1", "training.seq_len=4096",
           "model.mtp_layers=1", "training.optimizer_state_dtype=bf16"]


def test_deepseek_v3_on_2048_h800s_is_dominated_by_activations_in_flight():
    """The report's layout (sec. 3.2, 4.2): PP16 with DualPipe, EP64, ZeRO-1 over the
    2048 / 16 = 128 GPUs of a stage, 15,360 sequences of 4096 tokens per step, so 120
    micro-batches of one sequence per pipeline; BF16 Adam moments, RMSNorm and MLA
    up-projection recomputed. The 63 slots (61 layers, the head, the MTP module) split
    into 15 stages of 4 layers and a last stage of 1 layer with the head and the MTP
    module. GPUs 1 to 7 each hold two 4-layer stages (GPU s: stages s and 15 - s), 8 MoE
    layers: 2.8e9 BF16 routed weights, and 17 micro-batches of 4 layers x 4096 tokens
    in flight, 96.1 GiB of saved tensors: over the H800's 80 GiB on activations alone.
    GPU 1 is the first of these equals."""
    scenario = load_scenario(None, overrides=[*V3_2048, "training.recompute=selective"])
    layout = training_layout(scenario)
    assert (layout.dp, layout.expert_dp, layout.micro_batches,
            layout.tokens_per_microbatch) == (128, 2, 120, 4096)
    estimate = memory_per_gpu(scenario)
    parts = estimate.breakdown_gib
    assert estimate.stage == 1
    dense, routed = 8 * MOE_LAYER_DENSE, 8 * 4 * EXPERT
    assert parts["routed_experts"] == pytest.approx(gib(2 * routed))
    assert parts["gradients"] == pytest.approx(gib(4 * (dense + routed)))
    assert parts["optimizer"] == pytest.approx(gib(8 * (dense / 128 + routed / 2)))
    assert parts["activations"] == pytest.approx(gib(17 * 4 * TOKENS * (ATTN_S + MOE_S)))
    assert parts["activations"] == pytest.approx(96.08, abs=0.01)
    assert not estimate.fits and parts["activations"] > estimate.capacity_gib
    assert "at pipeline stage 1" in explain(estimate)
    for rank in range(2, 8):
        assert rank_activations(scenario, rank) == pytest.approx(parts["activations"] * GIB)
    # GPU 0 (stages 0 and 15: embedding, 3 dense layers and 1 MoE layer, the last layer,
    # the head, the MTP module) holds fewer activations: 16 micro-batches of its cheaper
    # first stage, 1 of the last (2 attention and MoE blocks, the MTP's projection).
    rank0 = (16 * TOKENS * (4 * ATTN_S + 3 * DENSE_S + MOE_S)
             + TOKENS * (2 * ATTN_S + 2 * MOE_S + 2 * H * 2) + 2 * TOKENS * HEAD_S)
    assert rank_activations(scenario, 0) == pytest.approx(rank0)
    # Full recomputation fits.
    assert memory_per_gpu(load_scenario(None, overrides=[*V3_2048,
                                                         "training.recompute=full"])).fits
