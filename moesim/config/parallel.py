"""ParallelConfig: how the step is spread over GPUs and how tokens travel."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from moesim.config._base import STRICT

DispatchKernel = Literal["deepep-normal", "deepep-low-latency", "nccl-alltoall"]


@dataclass(frozen=True, kw_only=True, config=STRICT)
class ParallelConfig:
    """Expert parallelism and the per-GPU batch of one step.

    ``ep`` GPUs (``D``) form one expert-parallel group holding all routed experts;
    ``gpus`` (default ``ep``) must be a multiple of ``ep``, each group routing its
    own tokens while all groups share the fabric. Attention is data-parallel: every
    GPU runs attention on its own ``tokens_per_gpu`` tokens, split into
    ``micro_batches`` that overlap one micro-batch's compute with another's
    communication when there are two or more.
    """

    ep: int = Field(gt=0)
    gpus: int | None = Field(default=None, gt=0)
    tokens_per_gpu: int = Field(gt=0)
    seq_len: int = Field(default=4096, gt=0)
    micro_batches: int = Field(default=1, gt=0)
    comm_sms: int = Field(default=20, ge=0)
    dispatch_kernel: DispatchKernel = "deepep-normal"
    dispatch_dtype: Literal["bf16", "fp8"] = "bf16"
    combine_dtype: Literal["bf16"] = "bf16"

    @property
    def total_gpus(self) -> int:
        return self.gpus if self.gpus is not None else self.ep

    @property
    def ep_groups(self) -> int:
        return self.total_gpus // self.ep
