"""Compute model: roofline time of the layer's kernels on one GPU.

A kernel takes ``max(FLOPs / (peak x efficiency), bytes / (HBM x efficiency))``.

GEMM efficiencies are curves, not constants (small per-expert batches run far below
peak). For a GEMM whose groups (experts) have ``m`` rows each (after padding to the
kernel's alignment) and which moves ``B`` bytes::

    compute efficiency = gemm_efficiency   * m / (m + gemm_m_half)
    memory efficiency  = memory_efficiency * B / (B + memory_bytes_half)

so the compute time is ``sum_g 2 (m_g + gemm_m_half) n k / (peak x gemm_efficiency)``
over the groups that received rows (each non-empty group costs ``gemm_m_half`` extra
rows: imbalance costs more at small batches), and the memory time is
``(B + memory_bytes_half) / (HBM x memory_efficiency)``. With both halves 0 (the
default) this is the constant-efficiency roofline. ``moesim calibrate`` fits them.
Expert GEMMs are grouped: each local expert's rows are padded to the kernel's row
alignment, experts that received no token cost nothing, and the time follows the
tokens each GPU's experts actually received, so routing imbalance becomes time.

Backward passes cost twice the forward GEMM work (input and weight gradients) and
2.5x the forward attention core (FlashAttention's backward runs five matmuls to the
forward's two). A backward GEMM reaches ``backward_gemm_efficiency`` of the forward
one's compute efficiency (1.0 until fitted). The two gradients of a GEMM do the same
FLOPs (``2 m n k`` each): the backward pass is timed as one roofline of twice the forward
work and ``grad="input"`` (dgrad) or ``grad="weight"`` (wgrad) asks for one half of it,
so the halves always add up to ``backward=True``; the attention core's backward is all
dgrad (it has no weights).

GEMM dtypes are ``bf16``, ``fp8`` and ``fp4`` (NVFP4; GPUs with ``fp4_tflops`` only);
:func:`gemm_dtype_for` maps a training precision to its GEMM dtype. docs/compute.md has
the whole model, with the non-GEMM kernels of :mod:`moesim.cost.elementwise`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from moesim.config.hardware import HardwareSpec
from moesim.config.model import ModelShape

BACKWARD_GEMM = 2.0
BACKWARD_ATTENTION_CORE = 2.5
ACT_BYTES = 2  # activations and gradients travel in BF16
# NVFP4: 4-bit E2M1 values plus one E4M3 (1-byte) scale per 16 of them; the FP32
# per-tensor scale is negligible.
FP4_BYTES = 0.5 + 1 / 16

Grad = Literal["input", "weight"]
# Training precision -> GEMM dtype (docs/compute.md says what each recipe quantizes).
PRECISION_GEMM_DTYPE = {"bf16": "bf16", "fp8": "fp8", "fp8-block": "fp8", "mxfp8": "fp8",
                        "nvfp4": "fp4"}


def dtype_bytes(dtype: str) -> float:
    """Bytes of one GEMM input element: ``fp8`` 1, ``fp4`` 0.5 + its block scale, else
    (``bf16``) 2."""
    if dtype == "fp4":
        return FP4_BYTES
    return 1 if dtype == "fp8" else 2


def gemm_dtype_for(precision: str) -> str:
    """GEMM dtype of a training ``precision``: ``bf16`` -> bf16; ``fp8`` (per-tensor
    scaling), ``fp8-block`` (DeepSeek-V3 tiles) and ``mxfp8`` -> fp8; ``nvfp4`` -> fp4."""
    if precision not in PRECISION_GEMM_DTYPE:
        raise ValueError(f"unknown training precision {precision!r}; expected one of "
                         f"{', '.join(PRECISION_GEMM_DTYPE)}")
    return PRECISION_GEMM_DTYPE[precision]


def _grad_share(grad: Grad | None) -> float:
    """Share of the backward GEMM time that ``grad`` asks for: all of it (None), or one
    of its two equal halves (``input``: dgrad, ``weight``: wgrad)."""
    if grad is None:
        return 1.0
    if grad not in ("input", "weight"):
        raise ValueError(f"grad must be 'input', 'weight' or None, not {grad!r}")
    return 0.5


def _gemm_eff(hw: HardwareSpec, eff: float, backward: bool) -> float:
    """Compute efficiency of a forward GEMM at ``eff``, or of its backward GEMMs."""
    return eff * hw.backward_gemm_efficiency if backward else eff


def _roofline(flops, nbytes, peak: float, eff: float, hw: HardwareSpec):
    return np.maximum(flops / (peak * eff), nbytes / (hw.hbm_GBps * 1e9 * hw.memory_efficiency))


def compute_efficiency(hw: HardwareSpec, rows):
    """Fraction of peak a GEMM with ``rows`` rows per group reaches (see module doc)."""
    rows = np.asarray(rows, dtype=float)
    if hw.gemm_m_half == 0:
        return np.full(rows.shape, hw.gemm_efficiency) if rows.shape else hw.gemm_efficiency
    return hw.gemm_efficiency * rows / (rows + hw.gemm_m_half)


def memory_efficiency(hw: HardwareSpec, nbytes):
    """Fraction of HBM bandwidth a kernel moving ``nbytes`` reaches (see module doc)."""
    nbytes = np.asarray(nbytes, dtype=float)
    if hw.memory_bytes_half == 0:
        return np.full(nbytes.shape, hw.memory_efficiency) if nbytes.shape \
            else hw.memory_efficiency
    return hw.memory_efficiency * nbytes / (nbytes + hw.memory_bytes_half)


def _gemm_roofline(flops, nbytes, extra_rows_flops, dtype: str, hw: HardwareSpec, *,
                   grouped: bool = False, backward: bool = False):
    """GEMM roofline with the efficiency curves: ``extra_rows_flops`` is the FLOPs of
    ``gemm_m_half`` extra rows per non-empty group; empty kernels cost nothing, others
    at least ``kernel_overhead_us`` more. ``grouped`` (MoE expert) GEMMs use the MoE
    curve where the spec has one; ``backward`` GEMMs reach ``backward_gemm_efficiency``
    of it."""
    eff = hw.gemm_efficiency_for(dtype)
    m_half = hw.gemm_m_half
    if dtype in ("fp8", "fp4") and hw.fp8_gemm_m_half is not None:
        m_half = hw.fp8_gemm_m_half
    mem_eff = hw.memory_efficiency
    if grouped:
        eff = hw.moe_gemm_efficiency if hw.moe_gemm_efficiency is not None else eff
        m_half = hw.moe_m_half if hw.moe_m_half is not None else m_half
        if hw.moe_memory_efficiency is not None:
            mem_eff = hw.moe_memory_efficiency
    eff = _gemm_eff(hw, eff, backward)
    compute_s = (flops + m_half * extra_rows_flops) / (hw.peak_flops(dtype) * eff)
    moved = np.where(np.asarray(nbytes) > 0, nbytes + hw.memory_bytes_half, 0.0)
    memory_s = moved / (hw.hbm_GBps * 1e9 * mem_eff)
    launched = np.asarray(flops) > 0
    return np.maximum(compute_s, memory_s) + launched * hw.kernel_overhead_us * 1e-6


def gemm_time(hw: HardwareSpec, *, groups, m, n, k, dtype: str, align: int = 1):
    """Array form of :func:`gemm_seconds` (``groups``, ``m``, ``n``, ``k`` broadcast)."""
    groups, m, n, k = (np.asarray(x, dtype=float) for x in (groups, m, n, k))
    rows = np.ceil(m / align) * align
    wb = dtype_bytes(dtype)
    flops = 2.0 * groups * rows * n * k
    nbytes = groups * (rows * k * wb + k * n * wb + rows * n * ACT_BYTES)
    return _gemm_roofline(flops, nbytes, 2.0 * groups * n * k, dtype, hw)


def quantize_time(hw: HardwareSpec, *, m, k):
    """Dynamic FP8 quantization of a [m, k] BF16 activation (one more kernel: read BF16,
    write FP8 and one scale per 128 values), as FP8 GEMM benchmarks that start from BF16
    inputs time it."""
    nbytes = np.asarray(m, dtype=float) * np.asarray(k, dtype=float) * (ACT_BYTES + 1 + 4 / 128)
    return nbytes / (hw.hbm_GBps * 1e9 * hw.memory_efficiency) + hw.kernel_overhead_us * 1e-6


def gemm_seconds(
    hw: HardwareSpec, *, groups: int, m: int, n: int, k: int, dtype: str, align: int = 1
) -> float:
    """One (grouped) GEMM of ``groups`` x [m, k] @ [k, n]: ``dtype`` inputs, BF16 output,
    each group's rows padded to ``align`` (the kernel's block size)."""
    return float(gemm_time(hw, groups=groups, m=m, n=n, k=k, dtype=dtype, align=align))


# ------------------------------------------------------------ attention kernels
#
# The core of attention (scores and values, not the projections) for one batch of
# sequences. Prefill is compute-bound: ``keys`` keys per query on average (causal, within
# the sliding window), at ``attention_efficiency x keys / (keys + attention_keys_half)``
# of the peak (short sequences leave the tensor cores idle). Decode reads every cached
# key and value once per step, so its time is the KV cache over HBM bandwidth, plus a
# fixed ``decode_query_head_ns`` per (request, head) and ``decode_overhead_us``.


def causal_keys(seq, window=0):
    """Mean keys a query attends to in a causal sequence of ``seq`` tokens (window 0:
    no window)."""
    seq = np.asarray(seq, dtype=float)
    full = (seq + 1) / 2
    if np.all(np.asarray(window) == 0):
        return full
    w = np.asarray(window, dtype=float)
    # Queries past the window see w keys; the first w see 1..w.
    inside = np.minimum(seq, w)
    windowed = (inside * (inside + 1) / 2 + (seq - inside) * w) / seq
    return np.where(w > 0, windowed, full)


def attention_prefill_time(
    hw: HardwareSpec, *, batch, seq, heads, score_dim: int, value_dim: int, window=0,
    dtype: str = "bf16", act_bytes: int = ACT_BYTES,
):
    """Causal self-attention over ``batch`` sequences of ``seq`` new tokens [s]."""
    keys = causal_keys(seq, window)
    tokens = np.asarray(batch, dtype=float) * np.asarray(seq, dtype=float)
    flops = 2.0 * tokens * keys * heads * (score_dim + value_dim)
    nbytes = tokens * heads * (2 * score_dim + 2 * value_dim) * act_bytes
    eff = hw.attention_efficiency
    if hw.attention_keys_half:
        eff = eff * keys / (keys + hw.attention_keys_half)
    compute_s = flops / (hw.peak_flops(dtype) * eff)
    memory_s = nbytes / (hw.hbm_GBps * 1e9 * hw.memory_efficiency)
    return np.maximum(compute_s, memory_s) + (hw.kernel_overhead_us
                                              + hw.attention_overhead_us) * 1e-6


def attention_decode_time(
    hw: HardwareSpec, *, batch, context, heads, score_dim: int, value_dim: int,
    kv_bytes_per_token, act_bytes: int = ACT_BYTES,
):
    """One decode step: ``batch`` queries, each over ``context`` cached tokens [s].

    ``kv_bytes_per_token`` is what one cached token costs to read (keys and values of
    every KV head; MLA's shared latent once)."""
    batch = np.asarray(batch, dtype=float)
    context = np.asarray(context, dtype=float)
    flops = 2.0 * batch * context * heads * (score_dim + value_dim)
    kv = batch * context * kv_bytes_per_token
    nbytes = kv + batch * heads * (score_dim + value_dim) * act_bytes
    eff_mem = memory_efficiency(hw, nbytes)
    compute_s = flops / (hw.peak_flops("bf16") * hw.attention_efficiency)
    memory_s = nbytes / (hw.hbm_GBps * 1e9 * eff_mem)
    # Each (request, head) pair also costs a fixed setup (load Q, softmax bookkeeping,
    # write O): with many heads over short caches this, not HBM, sets the time.
    per_query_s = batch * heads * hw.decode_query_head_ns * 1e-9
    return (np.maximum(compute_s, memory_s) + per_query_s
            + (hw.kernel_overhead_us + hw.decode_overhead_us) * 1e-6)


def attention_dims(m: ModelShape) -> tuple[int, int, int]:
    """(score dim, value dim, KV elements cached per token) of one attention layer.

    MLA decodes with the up-projections absorbed: scores over the compressed latent plus
    the RoPE key (``kv_lora_rank + qk_rope_head_dim``), values in the latent
    (``kv_lora_rank``), and only that latent is cached, shared by all heads."""
    if m.attention == "mla":
        latent = m.kv_lora_rank + m.qk_rope_head_dim
        return latent, m.kv_lora_rank, latent
    return m.head_dim, m.head_dim, 2 * m.kv_heads * m.head_dim


def kv_cache_bytes_per_token(m: ModelShape, kv_dtype: str = "bf16") -> int:
    """Bytes one token's KV cache takes in one layer."""
    return attention_dims(m)[2] * dtype_bytes(kv_dtype)


def attention_projection_params(m: ModelShape) -> int:
    """Weights of the attention projections (Q, K, V, O or MLA's low-rank factors)."""
    h = m.hidden_size
    if m.attention == "mla":
        qk_dim = m.qk_nope_head_dim + m.qk_rope_head_dim
        q = h * m.q_lora_rank + m.q_lora_rank * m.num_heads * qk_dim if m.q_lora_rank \
            else h * m.num_heads * qk_dim
        kv = h * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * m.num_heads * (
            m.qk_nope_head_dim + m.v_head_dim)
        return q + kv + m.num_heads * m.v_head_dim * h
    return h * m.head_dim * (2 * m.num_heads + 2 * m.kv_heads)


def _qk_v_dims(m: ModelShape) -> tuple[int, int]:
    if m.attention == "mla":
        return m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
    return m.head_dim, m.head_dim


def sliding_window_layers(m: ModelShape) -> tuple[int, int]:
    """(layers with sliding-window attention, their window in tokens): (0, 0) where the
    model has none."""
    if not m.sliding_window or not m.sliding_window_layers:
        return 0, 0
    if m.sliding_window_layers > m.num_layers:
        raise ValueError(f"model {m.name!r}: sliding_window_layers "
                         f"{m.sliding_window_layers} exceeds num_layers {m.num_layers}")
    return m.sliding_window_layers, m.sliding_window


def attention_core_flops(m: ModelShape, tokens: int, seq_len: int, *, window: int = 0) -> float:
    """Causal attention scores and values of one layer: each token sees (seq_len + 1) / 2
    keys, or :func:`causal_keys` within a sliding ``window`` of tokens (0: none)."""
    if window < 0:
        raise ValueError(f"attention window must be >= 0 tokens (0: none), not {window}")
    qk, v = _qk_v_dims(m)
    context = (seq_len + 1) / 2 if not window else float(causal_keys(seq_len, window))
    return 2.0 * tokens * context * m.num_heads * (qk + v)


def attention_seconds(
    m: ModelShape, hw: HardwareSpec, *, tokens: int, seq_len: int, backward: bool = False,
    grad: Grad | None = None, window: int = 0, dtype: str | None = None,
) -> float:
    """One attention layer on ``tokens`` tokens of ``seq_len``-token sequences [s]:
    projection GEMMs in ``dtype`` (default the model's ``gemm_dtype``) and the core in
    BF16, within a sliding ``window`` (0: full causal).

    ``backward`` times the backward pass; ``grad`` one part of it (implies backward):
    ``input`` is half the projections' backward GEMMs plus the whole core backward,
    ``weight`` the other half of the projections."""
    share = _grad_share(grad)
    backward = backward or grad is not None
    dtype = dtype or m.gemm_dtype
    params = attention_projection_params(m)
    proj_flops = 2.0 * tokens * params
    proj_bytes = params * dtype_bytes(dtype) + tokens * m.hidden_size * 2 * ACT_BYTES
    core_flops = attention_core_flops(m, tokens, seq_len, window=window)
    qk, v = _qk_v_dims(m)
    core_bytes = tokens * m.num_heads * (2 * qk + 2 * v) * ACT_BYTES
    gemm_x = BACKWARD_GEMM if backward else 1.0
    core_x = BACKWARD_ATTENTION_CORE if backward else 1.0
    proj = _roofline(gemm_x * proj_flops, gemm_x * proj_bytes, hw.peak_flops(dtype),
                     _gemm_eff(hw, hw.gemm_efficiency_for(dtype), backward), hw)
    if grad == "weight":
        return float(share * proj)
    core = _roofline(core_x * core_flops, core_x * core_bytes, hw.peak_flops("bf16"),
                     hw.attention_efficiency, hw)
    if grad == "input":
        return float(share * proj + core)
    return float(proj + core)


def ffn_flops(m: ModelShape, tokens, intermediate: int):
    """SwiGLU FFN: gate, up and down projections."""
    return swiglu_flops(hidden=m.hidden_size, rows=tokens, intermediate=intermediate)


def swiglu_flops(*, hidden, rows, intermediate):
    """FLOPs of ``rows`` tokens through a SwiGLU FFN (gate, up and down GEMMs)."""
    return 2.0 * 3 * rows * hidden * intermediate


def _ffn_bytes(m: ModelShape, rows, intermediate: int, active_experts, dtype: str):
    return ffn_bytes(hidden=m.hidden_size, intermediate=intermediate, rows=rows,
                     active_experts=active_experts, dtype=dtype)


def ffn_bytes(*, hidden: int, intermediate: int, rows, active_experts, dtype: str):
    """HBM bytes of SwiGLU FFNs: each active expert's weights, and every row's input,
    gate/up activations and output."""
    wb = dtype_bytes(dtype)
    weights = 3 * hidden * intermediate * wb * active_experts
    acts = rows * (hidden * (wb + ACT_BYTES) + intermediate * (2 * ACT_BYTES + wb))
    return weights + acts


def ffn_seconds(
    m: ModelShape, hw: HardwareSpec, *, tokens: int, intermediate: int, backward: bool = False,
    grad: Grad | None = None, dtype: str | None = None,
) -> float:
    """A dense SwiGLU FFN (dense layers, shared experts) on ``tokens`` tokens [s], GEMMs
    in ``dtype`` (default the model's); ``grad``: one half of the backward (dgrad or
    wgrad, implies backward)."""
    if tokens == 0 or intermediate == 0:
        return 0.0
    share = _grad_share(grad)
    backward = backward or grad is not None
    dtype = dtype or m.gemm_dtype
    x = BACKWARD_GEMM if backward else 1.0
    return share * float(_gemm_roofline(x * ffn_flops(m, tokens, intermediate),
                                        x * _ffn_bytes(m, tokens, intermediate, 1, dtype),
                                        x * ffn_flops(m, 1, intermediate), dtype, hw,
                                        backward=backward))


def grouped_ffn_time(
    hw: HardwareSpec, *, hidden: int, intermediate: int, tokens_ge: np.ndarray, dtype: str,
    backward: bool = False, grad: Grad | None = None,
) -> np.ndarray:
    """Time per GPU [G] of a fused MoE's SwiGLU expert GEMMs for ``tokens_ge`` [G, local
    experts] rows, plus ``moe_overhead_us`` on GPUs with any rows.

    Each expert's rows are padded to ``grouped_gemm_align`` and get their own compute
    efficiency (module doc): every expert that received tokens costs ``gemm_m_half``
    extra rows of work."""
    align = hw.grouped_gemm_align
    rows_g = (-(-tokens_ge // align) * align).sum(axis=1)
    active_g = (tokens_ge > 0).sum(axis=1)
    return expert_ffn_time(hw, hidden=hidden, intermediate=intermediate, rows=rows_g,
                           active_experts=active_g, dtype=dtype, backward=backward, grad=grad)


def expert_ffn_time(hw: HardwareSpec, *, hidden: int, intermediate: int, rows, active_experts,
                    dtype: str, backward: bool = False, grad: Grad | None = None):
    """:func:`grouped_ffn_time` from each GPU's padded ``rows`` and ``active_experts``
    (``grad``: one half of the backward, as :func:`ffn_seconds`)."""
    share = _grad_share(grad)
    backward = backward or grad is not None
    rows = np.asarray(rows, dtype=float)
    active = np.asarray(active_experts, dtype=float)
    x = BACKWARD_GEMM if backward else 1.0
    flops = x * swiglu_flops(hidden=hidden, rows=rows, intermediate=intermediate)
    nbytes = x * ffn_bytes(hidden=hidden, intermediate=intermediate, rows=rows,
                           active_experts=active, dtype=dtype)
    extra = x * swiglu_flops(hidden=hidden, rows=active, intermediate=intermediate)
    seconds = (_gemm_roofline(flops, nbytes, extra, dtype, hw, grouped=True, backward=backward)
               + (rows > 0) * hw.moe_overhead_us * 1e-6)
    return seconds if grad is None else share * seconds


def grouped_expert_seconds(
    m: ModelShape, hw: HardwareSpec, tokens_ge: np.ndarray, *, backward: bool = False,
    grad: Grad | None = None, dtype: str | None = None,
) -> np.ndarray:
    """Grouped-GEMM time per GPU [G] of the model's routed experts (:func:`grouped_ffn_time`),
    in ``dtype`` (default the model's ``gemm_dtype``)."""
    return grouped_ffn_time(hw, hidden=m.hidden_size, intermediate=m.moe_intermediate_size,
                            tokens_ge=tokens_ge, dtype=dtype or m.gemm_dtype,
                            backward=backward, grad=grad)


def lm_head_seconds(m: ModelShape, hw: HardwareSpec, *, tokens: int, backward: bool = False,
                    grad: Grad | None = None):
    """The output head (BF16 at every precision) on ``tokens`` tokens [s]; ``grad``: one
    half of the backward."""
    share = _grad_share(grad)
    backward = backward or grad is not None
    x = BACKWARD_GEMM if backward else 1.0
    flops = x * 2.0 * tokens * m.hidden_size * m.vocab_size
    nbytes = x * (m.hidden_size * m.vocab_size * 2 + tokens * (m.hidden_size + m.vocab_size) * 2)
    seconds = float(_roofline(flops, nbytes, hw.peak_flops("bf16"),
                              _gemm_eff(hw, hw.gemm_efficiency, backward), hw))
    return seconds if grad is None else share * seconds


def model_flops_per_token(m: ModelShape, seq_len: int, *, mtp: bool = False) -> float:
    """Useful forward FLOPs of one token through the whole model (no padding); the
    model's sliding-window layers attend within their window. ``mtp``: the
    ``mtp_layers`` MTP modules too, each a full-attention MoE layer, its ``2h x h``
    projection and one more LM head pass (DeepSeek-V3 report sec. 2.2)."""
    params = attention_projection_params(m)
    attn = 2.0 * params + attention_core_flops(m, 1, seq_len)
    layers = m.num_layers * attn
    windowed, window = sliding_window_layers(m)
    if windowed:
        near = 2.0 * params + attention_core_flops(m, 1, seq_len, window=window)
        layers = (m.num_layers - windowed) * attn + windowed * near
    dense = ffn_flops(m, 1, m.dense_intermediate_size)
    moe = ffn_flops(m, 1, m.moe_intermediate_size) * (m.top_k + m.shared_experts)
    head = 2.0 * m.hidden_size * m.vocab_size
    modules = (m.mtp_layers * (attn + moe + 2.0 * 2 * m.hidden_size * m.hidden_size + head)
               if mtp else 0.0)
    return layers + m.first_dense_layers * dense + m.moe_layers * moe + head + modules
