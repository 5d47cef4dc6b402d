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
    GPU's HBM (the preset's ``hbm_GB`` read as GiB); ``gpu`` names the GPU."""

    breakdown_gib: dict[str, float]
    total_gib: float
    capacity_gib: float
    gpu: str

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


def norm_params(m: ModelShape) -> int:
    """RMSNorm weights: two per layer (before attention and FFN), MLA's two latent
    norms, the final norm."""
    per_layer = 2 * m.hidden_size
    if m.attention == "mla":
        per_layer += (m.q_lora_rank or 0) + m.kv_lora_rank
    return m.num_layers * per_layer + m.hidden_size


def param_counts(scenario: Scenario) -> ParamCounts:
    """The parameters one GPU of ``scenario`` holds. Attention TP splits the per-head
    projections (MLA's down-projections stay whole), the dense FFN width and the
    vocabulary of the embedding and LM head; MoE TP splits every routed expert's width."""
    m, p = scenario.model, scenario.parallel
    h, tp = m.hidden_size, p.attention_tp
    attention = sum(k * n for k, n in serving.projection_shapes(m, tp))
    dense_ffn = swiglu_params(h, m.dense_intermediate_size // tp)
    vocab = math.ceil(m.vocab_size / tp)
    return ParamCounts(
        gemm=float(m.num_layers * attention + m.first_dense_layers * dense_ffn),
        other=float(2 * vocab * h + norm_params(m) + m.moe_layers * m.routed_experts * h),
        shared=float(m.moe_layers * m.shared_experts * swiglu_params(h, m.moe_intermediate_size)),
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


def optimizer_bytes(scenario: Scenario, params: ParamCounts) -> float:
    """Adam's state on one GPU: sharded over each parameter's data-parallel replicas by
    the distributed optimizer (all GPUs for the dense part, ``gpus / ep`` for the
    routed experts), whole on every GPU without it."""
    p = scenario.parallel
    per_param = optimizer_bytes_per_param(scenario)
    if not scenario.training.distributed_optimizer:
        return (params.dense + params.routed) * per_param
    return per_param * (params.dense / p.total_gpus + params.routed / p.ep_groups)


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


def attention_bytes_per_token(m: ModelShape, tp: int = 1) -> int:
    """Tensors one attention block keeps per token for its backward (BF16), with the
    GPU's ``num_heads / tp`` heads: the norm's input and output; MLA's latents (the
    query latent and its norm, the KV latent with the RoPE key and its norm); the
    queries, keys and values of every head; the attention output (the output
    projection's input); FlashAttention's FP32 log-sum-exp per head (no s x s matrix)."""
    h = m.hidden_size
    heads = m.num_heads // tp
    elements = 2 * h
    if m.attention == "mla":
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank:
            elements += 2 * m.q_lora_rank
        elements += (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
        elements += heads * (2 * qk + 2 * m.v_head_dim)  # q, k, v, output
    else:
        kv_heads = max(1, m.kv_heads // tp)
        elements += (2 * heads + 2 * kv_heads) * m.head_dim  # q, k, v, output
    return elements * BF16 + heads * FP32


def ffn_bytes_per_row(intermediate: int) -> int:
    """A SwiGLU FFN's saved tensors per row beyond its input: gate and up outputs and
    the SwiGLU output (BF16)."""
    return 3 * intermediate * BF16


def moe_bytes(m: ModelShape, *, tokens: float, assignments: float, expert_width: int) -> float:
    """One MoE block's saved tensors: per token the norm's input and output, the
    router's FP32 scores over all experts, the top-k ids (int64) and weights (FP32), the
    shared experts' intermediates; per (token, expert) assignment the dispatched input,
    the expert's intermediates and its output (kept for the gate weight's gradient)."""
    h = m.hidden_size
    per_token = (2 * h * BF16 + m.routed_experts * FP32 + m.top_k * (8 + FP32)
                 + ffn_bytes_per_row(m.shared_experts * m.moe_intermediate_size))
    per_assignment = 2 * h * BF16 + ffn_bytes_per_row(expert_width)
    return tokens * per_token + assignments * per_assignment


def dense_ffn_bytes_per_token(m: ModelShape, tp: int = 1) -> int:
    """A dense FFN block's saved tensors per token: the norm's input and output, the
    SwiGLU intermediates of the GPU's ``1 / tp`` of the width."""
    return 2 * m.hidden_size * BF16 + ffn_bytes_per_row(m.dense_intermediate_size // tp)


def lm_head_bytes(m: ModelShape, *, rows: int, tp: int = 1) -> float:
    """The final norm's input and output and the FP32 logits (softmax) the loss keeps,
    the GPU's ``1 / tp`` of the vocabulary."""
    return rows * (2 * m.hidden_size * BF16 + math.ceil(m.vocab_size / tp) * FP32)


def activation_bytes(scenario: Scenario) -> float:
    """Training: every layer's saved tensors for all the GPU's tokens (the step runs
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


# ---------------------------------------------------------------- the estimate


def memory_per_gpu(scenario: Scenario) -> MemoryEstimate:
    """What one GPU of ``scenario`` holds, part by part (docs/memory.md)."""
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
    breakdown = {key: float(nbytes[key]) / GIB for key in BREAKDOWN_KEYS}
    return MemoryEstimate(breakdown_gib=breakdown, total_gib=sum(breakdown.values()),
                          capacity_gib=float(scenario.hardware.hbm_GB),
                          gpu=scenario.hardware.name)


def explain(estimate: MemoryEstimate) -> str:
    """One line: the total, its parts largest first, and whether it fits the GPU."""
    parts = sorted(((gib, key) for key, gib in estimate.breakdown_gib.items() if gib >= 0.05),
                   reverse=True)
    named = ", ".join(f"{key.replace('_', ' ')} {gib:.1f}" for gib, key in parts)
    verdict = "fits in" if estimate.fits else "exceeds"
    return (f"memory: {estimate.total_gib:.1f} GiB per GPU ({named}) {verdict} the "
            f"{estimate.gpu.upper()}'s {estimate.capacity_gib:g} GiB")


def summary_keys(estimate: MemoryEstimate) -> dict:
    """The summary's memory keys (docs/metrics.md)."""
    return {"memory_gib_per_gpu": estimate.total_gib,
            "memory_breakdown_gib": dict(estimate.breakdown_gib),
            "memory_capacity_gib": estimate.capacity_gib,
            "fits_in_memory": estimate.fits}
