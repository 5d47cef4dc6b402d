"""Non-GEMM kernels of one transformer / MoE layer in training: RMSNorms, RoPE, the
router, permute and unpermute, SwiGLU, residual adds and the quantize kernels of the
low-precision recipes.

Each kernel is memory-bound: it takes the HBM bytes it reads and writes over
``hbm_GBps x memory_efficiency(bytes)`` (:func:`moesim.cost.compute.memory_efficiency`)
plus ``kernel_overhead_us`` per launch; the router's gate GEMM is a small GEMM
(:func:`moesim.cost.compute.gemm_time`). Activations and gradients are BF16. Kernels are
counted unfused (frameworks fuse some, e.g. a norm into the next cast). docs/compute.md
lists every byte formula with its source; in short, per layer of ``T`` tokens (hidden
``h``) whose experts receive ``R`` rows::

    rmsnorm       2 x (2 T h + h) x 2 B              (attention and FFN input norms)
    permute       R (2 h x 2 B + 4 B)                (gather rows, int32 row map)
    unpermute     R (h x 2 B + 8 B) + T h x 2 B      (weighted sum of each token's K rows)
    quantize      per GEMM input (forward) or output gradient (backward) of n values:
                  amax pass 2n B where the recipe scales per tensor, and a cast reading 2n
                  B and writing a rowwise and a columnwise (wgrad) copy with their scales

Backward: norms and activations move twice their forward bytes (they read the saved
input and the incoming gradient, write the input gradient and reduce the weight
gradient); RoPE and residual adds the same bytes as forward; permute and unpermute run
each other's data movement (unpermute's also reads the expert outputs for the routing
weights' gradient); the router's backward is its gate GEMM's dgrad and wgrad plus small
score kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

from moesim.config.hardware import HardwareSpec
from moesim.config.model import ModelShape
from moesim.cost import compute

A = compute.ACT_BYTES  # BF16 activations and gradients
FP32 = 4
INDEX = 4  # int32 row map / expert index
BACKWARD_ELEMENTWISE = 2.0  # norms and SwiGLU: backward bytes per forward byte


@dataclass(frozen=True)
class Recipe:
    """How a training precision quantizes a BF16 tensor before its GEMMs.

    Every cast writes two quantized copies (rowwise for the forward/dgrad GEMM,
    columnwise for the wgrad GEMM), each with one ``scale_bytes`` scale per ``block``
    values (0: one scale per tensor, negligible)."""

    element_bytes: float
    act_block: int  # values per scale of activations and gradients
    weight_block: int  # values per scale of weights
    scale_bytes: int
    amax_pass: bool  # a per-tensor scale needs the tensor's amax: one more read first

    def cast_bytes(self, values: float, *, weight: bool = False) -> float:
        """HBM bytes of one cast of ``values`` BF16 values: read them, write both copies."""
        block = self.weight_block if weight else self.act_block
        per_copy = self.element_bytes + (self.scale_bytes / block if block else 0.0)
        return values * (A + 2 * per_copy)


RECIPES = {
    # Transformer Engine Float8CurrentScaling: one FP32 scale per tensor from its amax
    # (a reduction pass before the cast); Hopper's FP8 GEMMs take only the TN layout, so
    # the cast also writes a transposed copy for wgrad (TE "Handling transposes").
    # DelayedScaling takes the scale from the amax history and skips the amax pass.
    "fp8": Recipe(element_bytes=1, act_block=0, weight_block=0, scale_bytes=4,
                  amax_pass=True),
    # DeepSeek-V3 (arXiv 2412.19437, sec. 3.3): 1x128 activation tiles, 128x128 weight
    # blocks, FP32 scales; the wgrad copy of an activation is requantized in 128x1 tiles
    # (TE Float8BlockScaling is the same scheme).
    "fp8-block": Recipe(element_bytes=1, act_block=128, weight_block=128 * 128,
                        scale_bytes=4, amax_pass=False),
    # TE MXFP8BlockScaling (OCP MX): 1-D blocks of 32 values, E8M0 (1-byte) scales, the
    # rowwise and columnwise copies scaled along their own dimension.
    "mxfp8": Recipe(element_bytes=1, act_block=32, weight_block=32, scale_bytes=1,
                    amax_pass=False),
    # NVFP4 (TE NVFP4BlockScaling; NVIDIA, arXiv 2509.25149): E2M1 values (half a byte)
    # in 1x16 blocks with E4M3 scales, plus an FP32 per-tensor scale from the tensor's
    # amax; weights in 16x16 blocks. The random Hadamard transform of the wgrad inputs is
    # taken as fused into their cast.
    "nvfp4": Recipe(element_bytes=0.5, act_block=16, weight_block=16 * 16, scale_bytes=1,
                    amax_pass=True),
}


def kernel_seconds(hw: HardwareSpec, nbytes: float) -> float:
    """One memory-bound kernel moving ``nbytes`` bytes [s] (nothing: no launch)."""
    if nbytes <= 0:
        return 0.0
    eff = float(compute.memory_efficiency(hw, nbytes))
    return nbytes / (hw.hbm_GBps * 1e9 * eff) + hw.kernel_overhead_us * 1e-6


def _recipe(hw: HardwareSpec, precision: str) -> Recipe | None:
    """The precision's quantize recipe (None for bf16); ValueError for an unknown
    precision or one whose GEMMs the GPU cannot run."""
    hw.peak_flops(compute.gemm_dtype_for(precision))  # raises for nvfp4 without FP4
    return RECIPES.get(precision)


def gemm_tensors(m: ModelShape, *, tokens: int, routed_rows: int, moe: bool
                 ) -> tuple[list[float], list[float]]:
    """Values of each GEMM input (quantized in forward) and of each GEMM output gradient
    (quantized in backward) of one layer. An input that feeds two GEMMs counts once."""
    t, h, r = tokens, m.hidden_size, routed_rows
    if m.attention == "mla":
        heads = m.num_heads
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        inputs = [t * h, t * m.kv_lora_rank, t * heads * m.v_head_dim]
        grads = [t * heads * qk, t * (m.kv_lora_rank + m.qk_rope_head_dim),
                 t * heads * (m.qk_nope_head_dim + m.v_head_dim), t * h]
        if m.q_lora_rank:
            inputs.append(t * m.q_lora_rank)
            grads.append(t * m.q_lora_rank)
    else:
        d = m.head_dim
        inputs = [t * h, t * m.num_heads * d]
        grads = [t * (m.num_heads + 2 * m.kv_heads) * d, t * h]
    ffns = ([(r, m.moe_intermediate_size), (t, m.shared_experts * m.moe_intermediate_size)]
            if moe else [(t, m.dense_intermediate_size)])
    for rows, width in ffns:
        if rows and width:
            inputs += [rows * h, rows * width]  # gate/up input, down input
            grads += [rows * 2 * width, rows * h]  # gate/up output, down output
    return [float(x) for x in inputs], [float(x) for x in grads]


def _forward_bytes(m: ModelShape, *, tokens: int, routed_rows: int, moe: bool
                   ) -> dict[str, list[float]]:
    """Bytes of each launch of each memory-bound kernel of one layer's forward pass."""
    t, h, r = tokens, m.hidden_size, routed_rows
    norm = [2 * t * h * A + h * A] * 2
    out: dict[str, list[float]] = {"rmsnorm": norm}
    if m.attention == "mla":
        ranks = [m.q_lora_rank, m.kv_lora_rank] if m.q_lora_rank else [m.kv_lora_rank]
        out["mla_latent_norm"] = [2 * t * rank * A + rank * A for rank in ranks]
        rope = [t * m.num_heads * m.qk_rope_head_dim, t * m.qk_rope_head_dim]  # q, shared k
    else:
        rope = [t * m.num_heads * m.head_dim, t * m.kv_heads * m.head_dim]
    out["rope"] = [2 * values * A for values in rope]  # read and write the rotated part
    if moe:
        e, k = m.routed_experts, m.top_k
        # Score function, top-k and weight normalisation: read logits, keep the FP32
        # scores for backward and the aux loss, write the K weights and expert ids.
        out["router_topk"] = [t * e * (A + FP32) + t * k * (FP32 + INDEX)]
        # Balance statistics: tokens per expert (aux-free bias, aux loss) and mean score.
        out["router_stats"] = [t * k * INDEX + t * e * FP32 + e * FP32]
        out["permute"] = [r * (2 * h * A + INDEX)]
        out["unpermute"] = [r * (h * A + INDEX + FP32) + t * h * A]
        out["swiglu_routed"] = [3 * r * m.moe_intermediate_size * A]
        out["swiglu_shared"] = [3 * t * m.shared_experts * m.moe_intermediate_size * A]
    else:
        out["swiglu_dense"] = [3 * t * m.dense_intermediate_size * A]
    out["residual_add"] = [3 * t * h * A] * 2
    return out


def _backward_bytes(m: ModelShape, *, tokens: int, routed_rows: int, moe: bool
                    ) -> dict[str, list[float]]:
    """Bytes of each launch of one layer's backward memory-bound kernels (module doc)."""
    t, h, r = tokens, m.hidden_size, routed_rows
    fwd = _forward_bytes(m, tokens=tokens, routed_rows=routed_rows, moe=moe)
    out = {}
    for name, launches in fwd.items():
        if name in ("rope", "residual_add"):
            out[name] = launches
        elif name.startswith(("rmsnorm", "mla_latent_norm", "swiglu")):
            out[name] = [BACKWARD_ELEMENTWISE * b for b in launches]
    if moe:
        e, k = m.routed_experts, m.top_k
        out["router_topk"] = [t * e * (FP32 + A) + t * k * (FP32 + INDEX)]
        out["router_stats"] = [t * e * FP32]  # the aux loss's gradient on the scores
        out["permute"] = [r * (h * A + INDEX) + t * h * A]  # rows summed into tokens
        # Token gradients gathered to rows and scaled, and the routing weights'
        # gradient from the expert outputs.
        out["unpermute"] = [r * (3 * h * A + 2 * INDEX + FP32)]
    return out


def layer_kernels(m: ModelShape, hw: HardwareSpec, *, tokens: int, routed_rows: int,
                  precision: str, backward: bool, moe: bool) -> dict[str, float]:
    """Seconds of each non-GEMM kernel of one layer on one GPU, for one micro-batch.

    ``tokens``: tokens whose attention runs on this GPU; ``routed_rows``: the expert rows
    this GPU's experts receive (0 for a dense layer); ``precision``: ``bf16``, ``fp8``,
    ``fp8-block``, ``mxfp8`` or ``nvfp4``; ``backward``: the backward pass instead of
    the forward; ``moe``: an MoE layer (router, permutes, routed and shared experts)
    rather than a dense FFN layer. Kernels the layer lacks are left out; the
    ``quantize_*`` kernels appear with a low precision only.
    """
    if tokens < 0 or routed_rows < 0:
        raise ValueError(f"tokens ({tokens}) and routed_rows ({routed_rows}) must be >= 0")
    if routed_rows and not moe:
        raise ValueError("a dense layer (moe=False) has no routed rows")
    recipe = _recipe(hw, precision)
    where = dict(tokens=tokens, routed_rows=routed_rows, moe=moe)
    launches = (_backward_bytes if backward else _forward_bytes)(m, **where)
    out = {name: sum(kernel_seconds(hw, b) for b in sizes) for name, sizes in launches.items()}
    if moe and tokens:
        e, h, t = m.routed_experts, m.hidden_size, tokens
        gemm = [dict(m=t, n=h, k=e), dict(m=h, n=e, k=t)] if backward else [dict(m=t, n=e, k=h)]
        out["router_gemm"] = sum(float(compute.gemm_time(hw, groups=1, dtype="bf16", **g))
                                 for g in gemm)
    if recipe is not None:
        inputs, grads = gemm_tensors(m, **where)
        tensors = [n for n in (grads if backward else inputs) if n]
        if recipe.amax_pass:
            out["quantize_amax"] = sum(kernel_seconds(hw, n * A) for n in tensors)
        out["quantize_cast"] = sum(kernel_seconds(hw, recipe.cast_bytes(n)) for n in tensors)
    return {name: seconds for name, seconds in out.items() if seconds > 0}


def weight_quantize_seconds(hw: HardwareSpec, *, weights: float, precision: str,
                            tensors: int = 1) -> float:
    """Casting ``weights`` BF16 weight values held in ``tensors`` tensors to the
    precision's GEMM format, rowwise and columnwise (dgrad) copies [s]: once per
    optimizer step (the copies serve every micro-batch), not part of :func:`layer_kernels`."""
    recipe = _recipe(hw, precision)
    if recipe is None or weights <= 0:
        return 0.0
    each = weights / tensors
    amax = kernel_seconds(hw, each * A) if recipe.amax_pass else 0.0
    return tensors * (amax + kernel_seconds(hw, recipe.cast_bytes(each, weight=True)))
