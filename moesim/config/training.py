"""TrainingConfig: how a training step keeps its weights, gradients and optimizer state."""

from __future__ import annotations

from typing import Literal

from pydantic.dataclasses import dataclass

from moesim.validation import STRICT, Checked


@dataclass(frozen=True, kw_only=True, config=STRICT)
class TrainingConfig(Checked):
    """The training-state choices that set a GPU's memory (docs/memory.md).

    Used by ``mode: train`` (the other modes ignore it). Every GPU keeps a BF16 working
    copy of the parameters it holds and their gradients in ``grad_dtype``; the Adam
    optimizer keeps an FP32 master copy and the two moments in
    ``optimizer_state_dtype`` (DeepSeek-V3 keeps them in BF16, report arXiv 2412.19437
    sec. 3.3). ``distributed_optimizer`` shards that optimizer state over the
    data-parallel replicas of each parameter (Megatron-LM's distributed optimizer, as
    ZeRO stage 1): all GPUs for the dense and shared-expert parameters, the ``gpus /
    ep`` EP groups for the routed experts.
    """

    distributed_optimizer: bool = True
    optimizer_state_dtype: Literal["fp32", "bf16"] = "fp32"  # Adam's moments m and v
    grad_dtype: Literal["fp32", "bf16"] = "fp32"
