"""HardwareSpec: one GPU's compute and memory. Interconnects live in the topology."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from moesim.config.kernels import DISPATCH_KERNELS
from moesim.validation import STRICT, Checked

Fraction = Field(gt=0.0, le=1.0)


@dataclass(frozen=True, kw_only=True, config=STRICT)
class HardwareSpec(Checked):
    """Peak rates of one GPU and the fractions of them that real kernels reach.

    Peaks are dense (no sparsity) tensor-core rates. The efficiencies turn the
    roofline into time; until `moesim calibrate` fits them they are the published
    figures named in the preset's ``source``.
    """

    name: str
    source: str = ""
    bf16_tflops: float = Field(ge=1e-3, le=1e5)  # bounds: README, Limits
    fp8_tflops: float = Field(ge=1e-3, le=1e5)
    # Dense NVFP4 tensor-core peak; None on GPUs without FP4 tensor cores (Hopper).
    fp4_tflops: float | None = Field(default=None, ge=1e-3, le=1e5)
    hbm_GBps: float = Field(ge=1e-3, le=1e5)
    hbm_GB: float = Field(ge=1e-3, le=1e5)
    sms: int = Field(gt=0, le=10_000)
    gemm_efficiency: float = Fraction
    attention_efficiency: float = Fraction
    memory_efficiency: float = Fraction
    # Efficiency curves (moesim.cost.compute): 0 keeps the efficiency constant.
    gemm_m_half: float = Field(default=0.0, ge=0)  # rows per group at half gemm_efficiency
    memory_bytes_half: float = Field(default=0.0, ge=0)  # bytes at half memory_efficiency
    grouped_gemm_align: int = Field(default=128, gt=0, le=65_536)
    comm_overhead_us: float = Field(default=10.0, ge=0)
    # Fitted by `moesim perfdb fit` (defaults keep the plain roofline):
    fp8_gemm_efficiency: float | None = Field(default=None, gt=0.0, le=1.0)  # None: as BF16
    kernel_overhead_us: float = Field(default=0.0, ge=0)  # launch-to-end floor per kernel
    moe_overhead_us: float = Field(default=0.0, ge=0)  # a fused MoE's routing/permute kernels
    moe_gemm_efficiency: float | None = Field(default=None, gt=0.0, le=1.0)  # None: dense's
    moe_m_half: float | None = Field(default=None, ge=0)  # None: gemm_m_half
    moe_memory_efficiency: float | None = Field(default=None, gt=0.0, le=1.0)  # None: dense's
    attention_overhead_us: float = Field(default=0.0, ge=0)  # prefill, beyond kernel_overhead
    decode_overhead_us: float = Field(default=0.0, ge=0)  # decode attention, beyond kernel_...
    decode_query_head_ns: float = Field(default=0.0, ge=0)  # decode: per (request, head)
    fp8_gemm_m_half: float | None = Field(default=None, ge=0)  # None: gemm_m_half
    attention_keys_half: float = Field(default=0.0, ge=0)  # keys/query at half attn. eff.
    nccl_latency_us: float | None = Field(default=None, ge=0)  # per collective; None: comm_...
    nccl_gpus_half: float = Field(default=0.0, ge=0)  # GPUs at half NCCL's link bandwidth
    deepep_overhead_us: float | None = Field(default=None, ge=0)  # DeepEP normal, per phase
    deepep_ll_overhead_us: float | None = Field(default=None, ge=0)  # DeepEP LL, per phase
    deepep_sms_full: float = Field(default=0.0, ge=0)  # SMs at which DeepEP reaches full link bw
    # Fraction of the forward GEMM efficiency that backward (dgrad, wgrad) GEMMs reach;
    # 1.0 times backward GEMMs as forward ones (fitted on training throughput later).
    backward_gemm_efficiency: float = Field(default=1.0, gt=0.0, le=1.0)

    def peak_flops(self, dtype: Literal["bf16", "fp8", "fp4"]) -> float:
        """Dense peak in FLOP/s for GEMMs in ``dtype`` (``fp4``: NVFP4, where the GPU has
        FP4 tensor cores; ValueError where it has none)."""
        if dtype == "fp4":
            if self.fp4_tflops is None:
                raise ValueError(f"GPU {self.name!r} has no FP4 GEMM rate (hardware."
                                 "fp4_tflops is unset): nvfp4 needs a GPU with FP4 tensor "
                                 "cores (Blackwell)")
            return self.fp4_tflops * 1e12
        return (self.fp8_tflops if dtype == "fp8" else self.bf16_tflops) * 1e12

    def comm_overhead_s(self, kernel: str) -> float:
        """Fixed cost of one exchange of dispatch ``kernel`` (the catalogue's
        ``overhead_field``): its fitted overhead, else ``comm_overhead_us``."""
        fitted = getattr(self, DISPATCH_KERNELS[kernel].overhead_field)
        return (self.comm_overhead_us if fitted is None else fitted) * 1e-6

    def nccl_overhead_s(self) -> float:
        """Fixed cost of one NCCL collective: ``nccl_latency_us``, else ``comm_overhead_us``."""
        fitted = self.nccl_latency_us
        return (self.comm_overhead_us if fitted is None else fitted) * 1e-6

    def gemm_efficiency_for(self, dtype: Literal["bf16", "fp8", "fp4"]) -> float:
        """Large-GEMM fraction of ``dtype``'s peak (FP8 kernels reach less of theirs; FP4
        ones take the FP8 fit until FP4 kernels are fitted on their own)."""
        if dtype in ("fp8", "fp4") and self.fp8_gemm_efficiency is not None:
            return self.fp8_gemm_efficiency
        return self.gemm_efficiency


def _check_kernel_fields() -> None:
    """Every catalogued kernel names a HardwareSpec field for its fixed cost, so a kernel
    added without one fails when moesim loads, never in the middle of a run."""
    fields = set(HardwareSpec.__pydantic_fields__)
    for kernel in DISPATCH_KERNELS.values():
        if kernel.overhead_field not in fields:
            raise RuntimeError(f"dispatch kernel {kernel.name!r}: overhead_field "
                               f"{kernel.overhead_field!r} is not a HardwareSpec field")


_check_kernel_fields()
