"""TrainingConfig: how a training step keeps its weights, gradients and optimizer state."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from moesim.validation import STRICT, Checked

Precision = Literal["bf16", "fp8", "fp8-block", "mxfp8", "nvfp4"]
Schedule = Literal["1f1b", "interleaved", "dualpipe", "zero-bubble"]


@dataclass(frozen=True, kw_only=True, config=STRICT)
class TrainingConfig(Checked):
    """The choices of a training step beyond its parallel layout (docs/training.md).

    The batch: ``global_batch`` sequences of ``seq_len`` tokens per step, fed to each
    pipeline in micro-batches of ``micro_batch`` sequences, so each data-parallel rank
    runs ``global_batch / (dp x micro_batch)`` micro-batches (``seq_len`` None:
    ``parallel.seq_len``). When ``global_batch`` is given these fields take precedence
    over ``parallel.tokens_per_gpu`` and ``parallel.micro_batches``, which are then
    ignored. The step is then the whole training step: the pipeline ``schedule``,
    ``recompute``, the data-parallel gradient reduction and the optimizer step (also
    with the older form when ``parallel.pp`` > 1). ``precision`` sets the GEMM type and
    its quantization kernels (None: the model's ``gemm_dtype``).

    Used by ``mode: train`` (the other modes ignore it). Every GPU keeps a BF16 working
    copy of the parameters it holds and their gradients in ``grad_dtype``; the Adam
    optimizer keeps an FP32 master copy and the two moments in
    ``optimizer_state_dtype`` (DeepSeek-V3 keeps them in BF16, report arXiv 2412.19437
    sec. 3.3). ``distributed_optimizer`` shards that optimizer state over the
    data-parallel replicas of each parameter (Megatron-LM's distributed optimizer, as
    ZeRO stage 1): all GPUs for the dense and shared-expert parameters, the ``gpus /
    ep`` EP groups for the routed experts.
    """

    global_batch: int | None = Field(default=None, gt=0, le=16_777_216)
    micro_batch: int = Field(default=1, gt=0, le=65_536)
    seq_len: int | None = Field(default=None, gt=0, le=16_777_216)
    precision: Precision | None = None
    recompute: Literal["none", "selective", "full"] = "none"
    schedule: Schedule = "1f1b"
    distributed_optimizer: bool = True
    # Megatron's --overlap-grad-reduce and --overlap-param-gather: the gradient
    # reduction runs under the last micro-batch's backward, the parameter all-gather
    # under the next step's first forward.
    overlap_dp_comm: bool = True
    optimizer_state_dtype: Literal["fp32", "bf16"] = "fp32"  # Adam's moments m and v
    grad_dtype: Literal["fp32", "bf16"] = "fp32"
