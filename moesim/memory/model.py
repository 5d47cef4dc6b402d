"""The memory one GPU of a scenario needs, part by part, from the scenario alone.

:func:`memory_per_gpu` routes nothing and simulates nothing: it counts the parameters
each GPU holds, the bytes per parameter of the mode (serving weights in the model's GEMM
type; training's BF16 working copy, gradients and Adam state), the activations the step
keeps, the dispatch kernel's communication buffers and the serving KV cache. Every
formula and its source is in docs/memory.md; the estimate assumes balanced expert loads.

Units: bytes inside, GiB (2**30 bytes) in :class:`MemoryEstimate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moesim.comm.traffic import bytes_per_copy
from moesim.config.model import ModelShape
from moesim.config.scenario import SERVING_MODES, Scenario
from moesim.config.training_layout import (
    TrainingLayout,
    chunk_layers,
    training_layout,
    whole_step,
)
from moesim.cost import compute, serving

GIB = 2**30
BF16 = 2  # bytes: training's working weights, activations, embeddings, norms, routers
FP32 = 4
# CUDA context, cuBLAS workspaces, NCCL communicators and the caching allocator's slack:
# a round reserve, not a measurement (docs/memory.md, "runtime").
RUNTIME_RESERVE_GIB = 2.0

BREAKDOWN_KEYS = ("dense_weights", "routed_experts", "shared_experts", "gradients",
                  "optimizer", "activations", "comm_buffers", "kv_cache", "runtime")


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """One GPU's memory: ``breakdown_gib`` has every key of :data:`BREAKDOWN_KEYS` (0.0
    where the mode has no such part), ``total_gib`` their sum, ``capacity_gib`` the
    GPU's HBM (the preset's ``hbm_GB`` read as GiB); ``gpu`` names the GPU.

    ``stage``: in the whole training step (``training.global_batch`` given or
    ``parallel.pp`` > 1), the pipeline rank of the GPU described, the one with the
    largest total (under DualPipe rank ``s`` holds model stages ``s`` and ``pp - 1 -
    s``); None in the other modes and in the older EP-only training step."""

    breakdown_gib: dict[str, float]
    total_gib: float
    capacity_gib: float
    gpu: str
    stage: int | None = None

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.capacity_gib


# ---------------------------------------------------------------- parameters


@dataclass(frozen=True, kw_only=True)
class ParamCounts:
    """Parameters one GPU holds, by how they are stored."""

    gemm: float  # attention projections and dense FFNs (the model's GEMM type in serving)
    other: float  # embeddings, LM head, norms, routers (BF16 in every mode)
    shared: float  # shared experts, replicated on every GPU
    routed: float  # the GPU's routed expert slots (all MoE layers)

    @property
    def dense(self) -> float:
        """What every GPU replicates (data-parallel): all but the routed experts."""
        return self.gemm + self.other + self.shared


def swiglu_params(hidden: int, intermediate: int) -> int:
    """Gate, up and down projections of one SwiGLU FFN."""
    return 3 * hidden * intermediate


def expert_slots_per_gpu(scenario: Scenario) -> int:
    """Routed expert slots one GPU holds per MoE layer: ``(E + R) / ep``, rounded up."""
    m, p = scenario.model, scenario.parallel
    return math.ceil((m.routed_experts + scenario.placement.redundant_experts) / p.ep)


def layer_norm_params(m: ModelShape) -> int:
    """RMSNorm weights of one layer: before attention and FFN, MLA's two latent norms."""
    per_layer = 2 * m.hidden_size
    if m.attention == "mla":
        per_layer += (m.q_lora_rank or 0) + m.kv_lora_rank
    return per_layer


def norm_params(m: ModelShape) -> int:
    """RMSNorm weights: every layer's, the final norm."""
    return m.num_layers * layer_norm_params(m) + m.hidden_size


def tensor_parallel(scenario: Scenario) -> int:
    """The tensor-parallel size that splits attention heads, the dense FFN width and the
    vocabulary: ``parallel.tp`` in training (Megatron's, 1 in the other modes),
    ``parallel.attention_tp`` in the serving modes (1 in training)."""
    p = scenario.parallel
    return p.tp if scenario.mode == "train" else p.attention_tp


def shared_expert_params(m: ModelShape, tp: int = 1) -> int:
    """One MoE layer's shared experts on one GPU: ``1 / tp`` of their width (Megatron's
    ``SharedExpertMLP`` is a tensor-parallel MLP; ``tp`` = 1 outside training)."""
    return m.shared_experts * swiglu_params(m.hidden_size, m.moe_intermediate_size // tp)


def param_counts(scenario: Scenario) -> ParamCounts:
    """The parameters one GPU of ``scenario`` holds. Tensor parallelism (serving's
    ``attention_tp``, training's ``tp``) splits the per-head projections (MLA's
    down-projections stay whole), the dense FFN width and the vocabulary of the
    embedding and LM head; training's ``tp`` splits the shared experts' width too. Norms
    and routers stay whole. MoE TP splits every routed expert's width."""
    m, p = scenario.model, scenario.parallel
    h, tp = m.hidden_size, tensor_parallel(scenario)
    attention = sum(k * n for k, n in serving.projection_shapes(m, tp))
    dense_ffn = swiglu_params(h, m.dense_intermediate_size // tp)
    vocab = math.ceil(m.vocab_size / tp)
    return ParamCounts(
        gemm=float(m.num_layers * attention + m.first_dense_layers * dense_ffn),
        other=float(2 * vocab * h + norm_params(m) + m.moe_layers * m.routed_experts * h),
        shared=float(m.moe_layers * shared_expert_params(m, p.tp)),
        routed=float(m.moe_layers * expert_slots_per_gpu(scenario)
                     * swiglu_params(h, m.moe_intermediate_size // p.moe_tp)),
    )


# ---------------------------------------------------------------- training state


def optimizer_bytes_per_param(scenario: Scenario) -> int:
    """Adam's state per parameter: the FP32 master copy and the two moments."""
    moments = FP32 if scenario.training.optimizer_state_dtype == "fp32" else BF16
    return FP32 + 2 * moments


def gradient_bytes(scenario: Scenario, params: ParamCounts) -> float:
    grad = FP32 if scenario.training.grad_dtype == "fp32" else BF16
    return (params.dense + params.routed) * grad


def optimizer_bytes(scenario: Scenario, params: ParamCounts, *, dp: int | None = None,
                    expert_dp: int | None = None) -> float:
    """Adam's state on one GPU: sharded over each parameter's data-parallel replicas by
    the distributed optimizer (``dp``, by default all GPUs, for the dense part;
    ``expert_dp``, by default ``gpus / ep``, for the routed experts), whole on every GPU
    without it. The whole training step passes its layout's ``dp x cp`` and
    ``expert_dp``, the replicas within one pipeline stage."""
    p = scenario.parallel
    per_param = optimizer_bytes_per_param(scenario)
    if not scenario.training.distributed_optimizer:
        return (params.dense + params.routed) * per_param
    dp = p.total_gpus if dp is None else dp
    expert_dp = p.ep_groups if expert_dp is None else expert_dp
    return per_param * (params.dense / dp + params.routed / expert_dp)


# ---------------------------------------------------------------- activations


@dataclass(frozen=True, kw_only=True)
class StepTokens:
    """The tokens one GPU works on in a step (all micro-batches)."""

    attention: int  # tokens whose attention (its heads) the GPU runs
    routed: int  # tokens the GPU dispatches to the routed experts
    routed_mb: int  # the same, per micro-batch (one exchange)
    head_rows: int  # rows of the LM head


def step_tokens(scenario: Scenario) -> StepTokens:
    p = scenario.parallel
    if scenario.mode in SERVING_MODES:
        lay = serving.layout(scenario)
        return StepTokens(attention=lay.tokens_mb * p.micro_batches,
                          routed=lay.routed_mb * p.micro_batches, routed_mb=lay.routed_mb,
                          head_rows=lay.requests_mb * p.micro_batches)
    t = p.tokens_per_gpu
    return StepTokens(attention=t, routed=t, routed_mb=math.ceil(t / p.micro_batches),
                      head_rows=t)


# training.recompute (the whole training step only): "full" keeps each layer's input
# and recomputes the layer; "selective" recomputes in the backward what cheap kernels
# give back (docs/memory.md, "Recomputation"): every RMSNorm's output (Megatron-Core's
# recompute module ``layernorm``; DeepSeek-V3 report sec. 3.2.3, "all RMSNorm
# operations"), MLA's up-projected queries, keys and values (``mla_up_proj``) and the
# MoE block's SwiGLU outputs (``moe_act``; DeepSeek-V3 caches the SwiGLU inputs and
# recomputes the output). Core attention (``core_attn``) is not recomputed: with
# FlashAttention it holds no s x s matrix, so recomputing it saves nearly nothing.
RECOMPUTE_MODES = ("none", "selective", "full")


def attention_bytes_per_token(m: ModelShape, tp: int = 1, recompute: str = "none") -> int:
    """Tensors one attention block keeps per token for its backward (BF16), with the
    GPU's ``num_heads / tp`` heads: the norm's input and output; MLA's latents (the
    query latent and its norm, the KV latent with the RoPE key and its norm); the
    queries, keys and values of every head; the attention output (the output
    projection's input); FlashAttention's FP32 log-sum-exp per head (no s x s matrix).
    The sum of :func:`attention_token_bytes` and :func:`attention_head_bytes`.

    ``recompute="selective"`` drops the norms' outputs and MLA's up-projected queries,
    keys and values (recomputed from the latents, which stay)."""
    return attention_token_bytes(m, recompute) + attention_head_bytes(m, tp, recompute)


def attention_token_bytes(m: ModelShape, recompute: str = "none") -> int:
    """The part of :func:`attention_bytes_per_token` that is per token whatever the
    heads: the norm's input and output, MLA's latents and their norms' outputs (the
    down-projections are whole on every tensor-parallel GPU)."""
    h = m.hidden_size
    keep = recompute != "selective"  # the outputs the backward recomputes
    elements = (2 if keep else 1) * h
    if m.attention == "mla":
        if m.q_lora_rank:
            elements += (2 if keep else 1) * m.q_lora_rank
        elements += (m.kv_lora_rank + m.qk_rope_head_dim) + (m.kv_lora_rank if keep else 0)
    return elements * BF16


def attention_head_bytes(m: ModelShape, tp: int = 1, recompute: str = "none") -> int:
    """The part of :func:`attention_bytes_per_token` kept per head, for the GPU's
    ``num_heads / tp`` heads: queries, keys and values (MLA: up-projected, dropped by
    ``recompute="selective"``), the attention output, the FP32 log-sum-exp."""
    heads = m.num_heads // tp
    if m.attention == "mla":
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        up = 2 * qk + m.v_head_dim if recompute != "selective" else 0  # q, k, v
        elements = heads * (up + m.v_head_dim)  # ... and the attention output
    else:
        kv_heads = max(1, m.kv_heads // tp)
        elements = (2 * heads + 2 * kv_heads) * m.head_dim  # q, k, v, output
    return elements * BF16 + heads * FP32


def ffn_bytes_per_row(intermediate: int, recompute: str = "none") -> int:
    """A SwiGLU FFN's saved tensors per row beyond its input: gate and up outputs and
    the SwiGLU output (BF16); ``recompute="selective"`` drops the SwiGLU output."""
    return (3 if recompute != "selective" else 2) * intermediate * BF16


def moe_bytes(m: ModelShape, *, tokens: float, assignments: float, expert_width: int,
              recompute: str = "none", tp: int = 1) -> float:
    """One MoE block's saved tensors: per token the norm's input and output, the
    router's FP32 scores over all experts, the top-k ids (int64) and weights (FP32), the
    shared experts' intermediates; per (token, expert) assignment the dispatched input,
    the expert's intermediates and its output (kept for the gate weight's gradient).
    ``recompute="selective"`` drops the norm's output and every SwiGLU output.

    ``tp`` (training's tensor parallelism, sequence parallel): the shared experts run
    on the ``tokens x tp`` tokens their tensor-parallel group gathers, at ``1 / tp``
    of their width; the rest stays per token."""
    h = m.hidden_size
    norm = (2 if recompute != "selective" else 1) * h * BF16
    per_token = norm + m.routed_experts * FP32 + m.top_k * (8 + FP32)
    shared = ffn_bytes_per_row(m.shared_experts * (m.moe_intermediate_size // tp), recompute)
    per_assignment = 2 * h * BF16 + ffn_bytes_per_row(expert_width, recompute)
    return tokens * per_token + tokens * tp * shared + assignments * per_assignment


def dense_ffn_bytes_per_token(m: ModelShape, tp: int = 1, recompute: str = "none") -> int:
    """A dense FFN block's saved tensors per token: the norm's input and output, the
    SwiGLU intermediates of the GPU's ``1 / tp`` of the width. ``recompute="selective"``
    drops the norm's output (the dense FFN's SwiGLU output stays: Megatron-Core's
    ``moe_act`` covers the MoE block only)."""
    norm = (2 if recompute != "selective" else 1) * m.hidden_size * BF16
    return norm + ffn_bytes_per_row(m.dense_intermediate_size // tp)


def lm_head_bytes(m: ModelShape, *, rows: int, tp: int = 1, recompute: str = "none") -> float:
    """The final norm's input and output and the FP32 logits (softmax) the loss keeps,
    the GPU's ``1 / tp`` of the vocabulary; ``recompute="selective"`` drops the norm's
    output."""
    norm = (2 if recompute != "selective" else 1) * m.hidden_size * BF16
    return rows * (norm + math.ceil(m.vocab_size / tp) * FP32)


def mtp_projection_bytes_per_token(m: ModelShape, recompute: str = "none") -> int:
    """An MTP module's tensors before its transformer layer: the inputs of its two
    RMSNorms (the previous depth's hidden state, the shifted token's embedding) and the
    projection's input, their normalised concatenation (2h); ``recompute="selective"``
    drops the concatenation (norm outputs)."""
    return (4 if recompute != "selective" else 2) * m.hidden_size * BF16


@dataclass(frozen=True, kw_only=True)
class BlockBytes:
    """One micro-batch's saved tensors on one GPU of the whole training step, by block."""

    attention: float  # one attention block
    dense: float  # one dense FFN block
    moe: float  # one MoE block
    projection: float  # an MTP module's norms and projection (before its layer)
    layer_input: float  # a layer's input (what full recomputation keeps)
    head: float  # the final norm and the LM head's logits


def training_block_bytes(m: ModelShape, *, tokens: int, tp: int = 1, moe_tp: int = 1,
                         recompute: str = "none") -> BlockBytes:
    """The saved tensors of ``tokens`` tokens per GPU (the layout's
    ``tokens_per_microbatch``, a micro-batch's tokens over ``tp x cp``) under tensor
    parallelism with sequence parallelism (Megatron-Core requires it for MoE with TP),
    docs/memory.md, "Tensor and context parallelism":

    * the sequence-parallel regions (norms, MLA's latents, layer inputs, the MTP's
      projection input, the router's scores and top-k, the dispatched assignments) keep
      ``tokens`` tokens' whole tensors (Korthikanti et al. 2022, arXiv 2205.05198, sec.
      4.2.2: a column-parallel GEMM keeps its input in sequence-parallel form);
    * the tensor-parallel regions (the heads' queries, keys, values, outputs and
      log-sum-exps; the dense FFN's and shared experts' SwiGLU intermediates; the
      logits) keep the ``tokens x tp`` tokens the all-gather gives the GPU, at ``1 /
      tp`` of the heads or width;
    * the routed experts are not split by ``tp``: the GPU dispatches its ``tokens``
      tokens' ``top_k`` assignments and receives as many (balanced loads).

    ``recompute`` is "none" or "selective" (what a layer keeps; full recomputation is
    :func:`stage_activation_bytes`'). At ``tp`` = 1 each block is ``tokens`` times its
    per-token function above."""
    h = m.hidden_size
    norm = (2 if recompute != "selective" else 1) * h * BF16
    rows = tokens * tp  # the tensor-parallel regions' tokens
    return BlockBytes(
        attention=(tokens * attention_token_bytes(m, recompute)
                   + rows * attention_head_bytes(m, tp, recompute)),
        dense=tokens * norm + rows * ffn_bytes_per_row(m.dense_intermediate_size // tp),
        moe=moe_bytes(m, tokens=tokens, assignments=tokens * m.top_k * moe_tp,
                      expert_width=m.moe_intermediate_size // moe_tp, recompute=recompute,
                      tp=tp),
        projection=tokens * mtp_projection_bytes_per_token(m, recompute),
        layer_input=tokens * h * BF16,
        head=tokens * norm + rows * math.ceil(m.vocab_size / tp) * FP32,
    )


def activation_bytes(scenario: Scenario) -> float:
    """Training in the older, EP-only form (the whole step: :func:`stage_activation_bytes`):
    every layer's saved tensors for all the GPU's tokens (the step runs
    every forward before any backward, no recomputation), plus the LM head. Forward-only
    modes: the residual stream plus the largest single working set (one layer, or the
    LM head), as a forward pass frees each layer's tensors before the next."""
    m, p = scenario.model, scenario.parallel
    tp, moe_tp = p.attention_tp, p.moe_tp
    t = step_tokens(scenario)
    # Balanced loads: a GPU receives as many assignments as it sends, pooled over its
    # moe_tp group, each computed at 1 / moe_tp of the expert width.
    moe = moe_bytes(m, tokens=t.routed, assignments=t.routed * m.top_k * moe_tp,
                    expert_width=m.moe_intermediate_size // moe_tp)
    attention = t.attention * attention_bytes_per_token(m, tp)
    dense = t.attention * dense_ffn_bytes_per_token(m, tp)
    head = lm_head_bytes(m, rows=t.head_rows, tp=tp)
    if scenario.mode == "train":
        return (m.num_layers * attention + m.first_dense_layers * dense
                + m.moe_layers * moe + head)
    layer = attention + (max(moe, dense) if m.first_dense_layers else moe)
    return t.attention * m.hidden_size * BF16 + max(layer, head)


# ---------------------------------------------------------------- communication buffers

# DeepEP (deepseek-ai/DeepEP v1.2.1): deep_ep/buffer.py's Buffer.get_dispatch_config and
# get_combine_config, (nvl send, nvl recv, rdma send, rdma recv) chunked tokens by the
# number of EP ranks, and csrc/config.hpp's buffer size hints.
DEEPEP_DISPATCH_CONFIG = {2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128),
                          16: (36, 288, 20, 128), 24: (8, 288, 32, 128),
                          32: (32, 288, 32, 128), 64: (20, 288, 28, 128),
                          128: (20, 560, 32, 128), 144: (32, 720, 12, 128),
                          160: (28, 720, 12, 128)}
DEEPEP_COMBINE_CONFIG = {2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128),
                         16: (4, 288, 12, 128), 24: (1, 288, 8, 128), 32: (1, 288, 8, 128),
                         64: (1, 288, 20, 128), 128: (1, 560, 12, 128),
                         144: (2, 720, 8, 128), 160: (2, 720, 8, 128)}
DEEPEP_WORKSPACE_BYTES = 32 * 2**20  # NUM_WORKSPACE_BYTES, allocated by every Buffer
NVL_PEERS = 8  # NUM_MAX_NVL_PEERS
MAX_TOPK, MAX_SCALES = 128, 128  # kNumMaxTopK, kNumMaxScales of the size hints
SOURCE_META_BYTES = 8  # internode SourceMeta: two ints


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


def _deepep_config(table: dict, ranks: int) -> tuple[int, int, int, int]:
    """The tuned config for ``ranks`` (DeepEP tunes a few sizes: the next one up, else
    the largest), with the RDMA receive chunk rounded up to a multiple of the send
    chunk as DeepEP's Config does."""
    key = min((k for k in table if k >= ranks), default=max(table))
    nvl_send, nvl_recv, rdma_send, rdma_recv = table[key]
    return nvl_send, nvl_recv, rdma_send, _align(rdma_recv, rdma_send)


def deepep_normal_bytes(*, hidden_bytes: int, ranks: int, sms: int) -> int:
    """DeepEP's normal-mode buffers: the NVLink and RDMA size hints of the dispatch and
    combine configs (the larger of each), as DeepEP's README sizes them, plus the
    workspace."""
    channels = sms // 2
    rdma_ranks = max(ranks // NVL_PEERS, 1)
    nvl_ranks = min(ranks, NVL_PEERS)
    per_token = hidden_bytes + SOURCE_META_BYTES + MAX_TOPK * (8 + FP32) + MAX_SCALES * FP32
    nvl = rdma = 0
    for table in (DEEPEP_DISPATCH_CONFIG, DEEPEP_COMBINE_CONFIG):
        _, nvl_recv, _, rdma_recv = _deepep_config(table, ranks)
        nvl = max(nvl, _align(channels * nvl_ranks * (2 * rdma_ranks + 3) * 4
                              + channels * nvl_ranks * nvl_recv * per_token, 128))
        if ranks > NVL_PEERS:
            rdma = max(rdma, _align(channels * rdma_ranks * (NVL_PEERS * 2 + 2) * 2 * 4
                                    + channels * rdma_ranks * rdma_recv * 2 * (per_token + 16),
                                    128))
    return nvl + rdma + DEEPEP_WORKSPACE_BYTES


def deepep_low_latency_bytes(*, tokens: int, hidden: int, experts: int) -> int:
    """DeepEP's low-latency buffer (``get_low_latency_rdma_size_hint``): two send, two
    receive and two signalling buffers; every receive buffer holds ``tokens`` (the most
    one rank dispatches per call) from every expert, plus the workspace."""
    scales = hidden // 128
    dispatch_msg = 16 + max(hidden * BF16, hidden + scales * FP32)
    combine_msg = scales * 4 + hidden * BF16
    send = max(tokens * dispatch_msg, experts * tokens * combine_msg)
    recv = experts * tokens * max(dispatch_msg, combine_msg)
    signal = _align(experts * 4, 128)
    total = 2 * (send + recv + signal)
    return (total + 128) // 128 * 128 + DEEPEP_WORKSPACE_BYTES


def nccl_alltoall_bytes(scenario: Scenario, tokens: int) -> float:
    """The send and receive staging of one exchange: every token copied once per
    destination GPU (at most ``min(top_k, ep)``), at the larger of the dispatch and
    combine bytes per copy."""
    m, p = scenario.model, scenario.parallel
    copies = tokens * min(m.top_k, p.ep)
    per_copy = max(bytes_per_copy(p.dispatch_kernel, hidden=m.hidden_size,
                                  dtype=p.dispatch_dtype, dispatch=True),
                   bytes_per_copy(p.dispatch_kernel, hidden=m.hidden_size,
                                  dtype=p.combine_dtype, dispatch=False))
    return 2.0 * copies * per_copy


def comm_buffer_bytes(scenario: Scenario) -> float:
    """Buffers of the scenario's dispatch kernel on one GPU (none without a peer)."""
    m, p = scenario.model, scenario.parallel
    if p.ep == 1:
        return 0.0
    if whole_step(scenario):  # one micro-batch of the pipeline's: the layout's tokens
        tokens = training_layout(scenario).tokens_per_microbatch
    else:
        tokens = step_tokens(scenario).routed_mb
    if p.dispatch_kernel == "deepep-normal":
        return float(deepep_normal_bytes(hidden_bytes=m.hidden_size * BF16, ranks=p.ep,
                                         sms=p.comm_sms))
    if p.dispatch_kernel == "deepep-low-latency":
        return float(deepep_low_latency_bytes(
            tokens=tokens, hidden=m.hidden_size,
            experts=m.routed_experts + scenario.placement.redundant_experts))
    return nccl_alltoall_bytes(scenario, tokens)


# ---------------------------------------------------------------- KV cache


def kv_cache_bytes(scenario: Scenario) -> float:
    """Serving: the KV cache of the GPU's rank's batch at full length (``isl`` in
    prefill, ``isl + osl`` in decode), all layers (the summary's
    ``kv_cache_bytes_per_gpu``)."""
    if scenario.mode not in SERVING_MODES:
        return 0.0
    m, p, sv = scenario.model, scenario.parallel, scenario.serving
    cached = sv.isl if scenario.mode == "prefill" else sv.isl + sv.osl
    per_token = serving.kv_bytes_per_token_per_gpu(m, sv.kv_dtype, p.attention_tp)
    return per_token * m.num_layers * sv.batch * cached


# ---------------------------------------------------------------- the whole training step


@dataclass(frozen=True, kw_only=True)
class Chunk:
    """One model chunk a GPU holds: consecutive layers, with what sits beside them."""

    dense: int  # dense-FFN layers (the model's first ``first_dense_layers``)
    moe: int  # MoE layers
    embedding: bool  # the first chunk: the token embedding
    head: bool  # the last chunk: final norm, LM head ...
    mtp: int  # ... and the MTP modules, each one MoE layer more

    @property
    def layers(self) -> int:
        return self.dense + self.moe


def stage_chunks(scenario: Scenario, layout: TrainingLayout) -> list[list[Chunk]]:
    """The chunks each pipeline rank's GPU holds, ``[pp][chunks]``: the layers split
    as :func:`moesim.config.training_layout.chunk_layers` splits them (contiguous, as
    even as can be, the first chunks a layer longer; DualPipe: stages ``s`` and ``pp - 1
    - s``), the embedding with layer 0, the final norm, LM head and ``mtp_layers`` MTP
    modules with the last layer."""
    m = scenario.model
    out = []
    for ranges in chunk_layers(layout, m):
        chunks = []
        for r in ranges:
            dense = max(0, min(r.stop, m.first_dense_layers) - r.start)
            head = r.stop == m.num_layers
            chunks.append(Chunk(dense=dense, moe=len(r) - dense, embedding=r.start == 0,
                                head=head, mtp=m.mtp_layers if head else 0))
        out.append(chunks)
    return out


def stage_param_counts(scenario: Scenario, chunks: list[Chunk]) -> ParamCounts:
    """The parameters of one pipeline rank's GPU, all its chunks (DualPipe: both
    copies). An MTP module is one more MoE layer (attention, norms, router, shared and
    routed experts) plus its projection ``h x 2h`` and three RMSNorms (the hidden
    state's, the embedding's and its own before the shared head; DeepSeek-V3 report sec.
    2.2). It shares the embedding and the LM head: a GPU holding an MTP module holds
    the embedding too, the first stage's under DualPipe (the same GPU, report sec.
    3.2.3), a copy of it otherwise (Megatron-Core's GPTModel builds the embedding
    ``if self.pre_process or self.mtp_process``). With one chunk of every layer and no
    MTP this is :func:`param_counts`.

    ``parallel.tp`` splits what :func:`param_counts` says (per-head projections, dense
    FFN and shared experts' width, vocabulary); ``parallel.cp`` splits no parameter."""
    m, p = scenario.model, scenario.parallel
    h, tp = m.hidden_size, tensor_parallel(scenario)
    attention = sum(k * n for k, n in serving.projection_shapes(m, tp))
    dense_ffn = swiglu_params(h, m.dense_intermediate_size // tp)
    vocab = math.ceil(m.vocab_size / tp)
    dense = sum(c.dense for c in chunks)
    mtp = sum(c.mtp for c in chunks)
    layers = sum(c.layers for c in chunks) + mtp
    moe = sum(c.moe for c in chunks) + mtp
    heads = sum(c.head for c in chunks)
    embeddings = sum(c.embedding for c in chunks) or (1 if mtp else 0)
    return ParamCounts(
        gemm=float(layers * attention + dense * dense_ffn + mtp * 2 * h * h),
        other=float((embeddings + heads) * vocab * h + heads * h
                    + layers * layer_norm_params(m) + mtp * 3 * h
                    + moe * m.routed_experts * h),
        shared=float(moe * shared_expert_params(m, p.tp)),
        routed=float(moe * expert_slots_per_gpu(scenario)
                     * swiglu_params(h, m.moe_intermediate_size // p.moe_tp)),
    )


def in_flight(layout: TrainingLayout, rank: int, chunks: int) -> list[float]:
    """Micro-batches whose saved tensors pipeline rank ``rank`` holds at its peak, per
    chunk it holds (docs/memory.md, "Micro-batches in flight"), with ``m`` the layout's
    micro-batches per step (no count exceeds it).

    * 1F1B: ``min(pp - rank, m)``: ``pp - rank - 1`` warm-up forwards, then one more
      before the first backward (Megatron-LM's ``forward_backward_pipelining_without_
      interleaving``).
    * zero-bubble (ZB-H1): ``min(pp, m)`` on every rank: rank ``s`` holds back ``s``
      weight passes, whose inputs stay (Qi et al. 2023, arXiv 2401.10241, sec. 2.1).
    * interleaved: ``min(2 (pp - rank - 1) + (vp - 1) pp + 1, m vp)`` chunk-passes
      (Megatron-LM's warm-up of ``forward_backward_pipelining_with_interleaving`` plus
      the first steady forward; all ``m vp`` when ``m == pp``), each ``1 / vp`` of the
      stage's layers: per chunk that count over ``vp``. Rank 0 holds ``pp + (pp -
      1) / vp`` stage micro-batches, ``(1 + (pp - 1) / (pp vp)) pp`` (the interleaved
      schedule of Narayanan et al. 2021, arXiv 2104.04473, sec. 2.2.2; the factor of
      Korthikanti et al. 2022, arXiv 2205.05198).
    * DualPipe: ``pp - rank`` micro-batches of the rank's own stage (the direction that
      starts at stage 0) and ``rank + 1`` of its mirror stage ``pp - 1 - rank``: ``pp +
      1`` in all (deepseek-ai/DualPipe README, "Activation PP+1"), each ``min``'d with
      that direction's ``m / 2``.
    """
    pp, vp, m = layout.pp, layout.vp, layout.micro_batches
    if layout.schedule == "dualpipe":
        return [float(min(pp - rank, m - m // 2)), float(min(rank + 1, m // 2))]
    if layout.schedule == "interleaved" and vp > 1:
        passes = m * vp if m == pp else min(2 * (pp - rank - 1) + (vp - 1) * pp + 1, m * vp)
        return [passes / vp] * chunks
    if layout.schedule == "zero-bubble":
        return [float(min(pp, m))] * chunks
    return [float(min(pp - rank, m))] * chunks


def stage_activation_bytes(scenario: Scenario, layout: TrainingLayout, rank: int,
                           chunks: list[Chunk]) -> float:
    """The saved tensors pipeline rank ``rank`` holds at its peak: every chunk's, per
    micro-batch of ``tokens_per_microbatch`` tokens, times its micro-batches in flight
    (:func:`in_flight`); the LM head's (and each MTP module's head's) logits of one
    micro-batch on the GPU holding the last layer. Tensor (with sequence) and context
    parallelism divide every tensor by ``tp x cp`` (:func:`training_block_bytes`).
    ``training.recompute``:

    * ``none``: every layer's saved tensors (the per-token functions above);
    * ``selective``: the same with the cheap outputs dropped (:data:`RECOMPUTE_MODES`);
    * ``full``: every layer keeps only its input (``h`` BF16 per token; an MTP module
      its two, the hidden state and the embedding), plus the full saved tensors of one
      layer of one micro-batch, the one being recomputed (Megatron-LM's
      ``--recompute-granularity full --recompute-method uniform --recompute-num-layers
      1``).
    """
    m = scenario.model
    recompute = scenario.training.recompute
    mode = "none" if recompute == "full" else recompute  # what a whole layer keeps
    # One micro-batch's saved tensors, by kind of block (balanced loads, as above).
    b = training_block_bytes(m, tokens=layout.tokens_per_microbatch, tp=layout.tp,
                             moe_tp=scenario.parallel.moe_tp, recompute=mode)
    attention, dense, moe, projection = b.attention, b.dense, b.moe, b.projection

    def chunk_bytes(c: Chunk) -> float:
        if recompute == "full":
            return c.layers * b.layer_input + c.mtp * 2 * b.layer_input
        return ((c.layers + c.mtp) * attention + c.dense * dense + (c.moe + c.mtp) * moe
                + c.mtp * projection)

    counts = in_flight(layout, rank, len(chunks))
    total = sum(n * chunk_bytes(c) for n, c in zip(counts, chunks, strict=True))
    if recompute == "full":  # the one layer being recomputed, whole
        largest = [attention + dense] if any(c.dense for c in chunks) else []
        if any(c.moe for c in chunks):
            largest.append(attention + moe)
        if any(c.mtp for c in chunks):
            largest.append(attention + moe + projection)
        total += max(largest)
    heads = sum(1 + c.mtp for c in chunks if c.head)
    return total + heads * b.head


def whole_step_estimate(scenario: Scenario) -> MemoryEstimate:
    """The whole training step: every pipeline rank's GPU, its stage's parameters and
    their training state, its activations in flight; the rank with the largest total
    (the first of equals). The distributed optimizer shards the dense parameters' state
    over the stage's ``dp x cp`` GPUs holding the same shard (Megatron-Core's
    ``get_megatron_optimizer`` builds it on the data-parallel group with context
    parallelism, ``intra_dp_cp_group``: CP ranks hold the same weights and reduce their
    gradients together) and the routed experts' over the ``expert_dp`` replicas
    (``intra_expt_dp_group``)."""
    layout = training_layout(scenario)
    comm = comm_buffer_bytes(scenario)
    worst: tuple[float, int, dict[str, float]] | None = None
    for rank, chunks in enumerate(stage_chunks(scenario, layout)):
        params = stage_param_counts(scenario, chunks)
        nbytes = {
            "dense_weights": (params.gemm + params.other) * BF16,
            "routed_experts": params.routed * BF16,
            "shared_experts": params.shared * BF16,
            "gradients": gradient_bytes(scenario, params),
            "optimizer": optimizer_bytes(scenario, params, dp=layout.dp * layout.cp,
                                         expert_dp=layout.expert_dp),
            "activations": stage_activation_bytes(scenario, layout, rank, chunks),
            "comm_buffers": comm,
            "kv_cache": 0.0,
            "runtime": RUNTIME_RESERVE_GIB * GIB,
        }
        total = sum(nbytes.values())
        if worst is None or total > worst[0]:
            worst = (total, rank, nbytes)
    assert worst is not None
    return _estimate(scenario, worst[2], stage=worst[1])


# ---------------------------------------------------------------- the estimate


def _estimate(scenario: Scenario, nbytes: dict[str, float], *,
              stage: int | None = None) -> MemoryEstimate:
    breakdown = {key: float(nbytes[key]) / GIB for key in BREAKDOWN_KEYS}
    return MemoryEstimate(breakdown_gib=breakdown, total_gib=sum(breakdown.values()),
                          capacity_gib=float(scenario.hardware.hbm_GB),
                          gpu=scenario.hardware.name, stage=stage)


def memory_per_gpu(scenario: Scenario) -> MemoryEstimate:
    """What one GPU of ``scenario`` holds, part by part (docs/memory.md). The whole
    training step (``training.global_batch`` given or ``parallel.pp`` > 1) describes
    the GPU of its worst pipeline stage (:func:`whole_step_estimate`)."""
    if whole_step(scenario):
        return whole_step_estimate(scenario)
    m = scenario.model
    params = param_counts(scenario)
    train = scenario.mode == "train"
    gemm = BF16 if train else compute.dtype_bytes(m.gemm_dtype)
    nbytes = {
        "dense_weights": params.gemm * gemm + params.other * BF16,
        "routed_experts": params.routed * gemm,
        "shared_experts": params.shared * gemm,
        "gradients": gradient_bytes(scenario, params) if train else 0.0,
        "optimizer": optimizer_bytes(scenario, params) if train else 0.0,
        "activations": activation_bytes(scenario),
        "comm_buffers": comm_buffer_bytes(scenario),
        "kv_cache": kv_cache_bytes(scenario),
        "runtime": RUNTIME_RESERVE_GIB * GIB,
    }
    return _estimate(scenario, nbytes)


def explain(estimate: MemoryEstimate) -> str:
    """One line: the total, its parts largest first, and whether it fits the GPU."""
    parts = sorted(((gib, key) for key, gib in estimate.breakdown_gib.items() if gib >= 0.05),
                   reverse=True)
    named = ", ".join(f"{key.replace('_', ' ')} {gib:.1f}" for gib, key in parts)
    verdict = "fits in" if estimate.fits else "exceeds"
    where = "" if estimate.stage is None else f" at pipeline stage {estimate.stage}"
    return (f"memory: {estimate.total_gib:.1f} GiB per GPU{where} ({named}) {verdict} the "
            f"{estimate.gpu.upper()}'s {estimate.capacity_gib:g} GiB")


def summary_keys(estimate: MemoryEstimate) -> dict:
    """The summary's memory keys (docs/metrics.md)."""
    return {"memory_gib_per_gpu": estimate.total_gib,
            "memory_breakdown_gib": dict(estimate.breakdown_gib),
            "memory_capacity_gib": estimate.capacity_gib,
            "fits_in_memory": estimate.fits}
