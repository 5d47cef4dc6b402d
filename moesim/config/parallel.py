"""ParallelConfig: how the step is spread over GPUs and how tokens travel."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from moesim.config.kernels import KERNEL_NAMES
from moesim.validation import STRICT, Checked

KernelName = Literal[KERNEL_NAMES]
MAX_GPUS = 65_536  # beyond every topology preset; README: Limits
MAX_TOKENS_PER_GPU = 1_048_576


@dataclass(frozen=True, kw_only=True, config=STRICT)
class ParallelConfig(Checked):
    """Expert parallelism and the per-GPU batch of one step.

    ``ep`` GPUs (``D``) form one expert-parallel group holding all routed experts;
    ``gpus`` (default ``ep``) must be a multiple of ``ep``, each group routing its
    own tokens while all groups share the fabric. Attention is data-parallel: every
    GPU runs attention on its own ``tokens_per_gpu`` tokens, split into
    ``micro_batches`` that overlap one micro-batch's compute with another's
    communication when there are two or more.

    ``tokens_per_gpu`` is required by ``mode: train`` and ``inference``; in ``prefill``
    and ``decode`` the tokens follow from the scenario's ``serving`` batch and must not
    be given. Those two modes also take tensor parallelism (1 elsewhere):

    * ``attention_tp``: attention heads split over ``attention_tp`` consecutive GPUs
      (one attention data-parallel rank; ``gpus / attention_tp`` ranks), as SGLang's
      ``--tp N --dp N/attention_tp --enable-dp-attention`` (TensorRT-LLM's
      ``enable_attention_dp`` is ``attention_tp: 1``, plain ``--tp`` serving is
      ``attention_tp = gpus``).
    * ``moe_tp``: every routed expert's intermediate split over ``moe_tp`` GPUs. One
      MoE instance is ``ep x moe_tp`` GPUs (TensorRT-LLM's ``moe_ep_size x
      moe_tp_size = tp_size``); ``gpus`` (default: one instance) must be a multiple of
      it. As in TensorRT-LLM's mapping, EP ranks vary fastest: the instance's ``moe_tp``
      slices are EP groups of ``ep`` consecutive GPUs, and the GPUs holding the shards
      of one expert are ``ep`` apart.

    ``mode: train`` takes a pipeline: ``pp`` stages of ``gpus / pp`` GPUs each (Megatron's
    rank order, pipeline slowest), each stage holding ``vp`` chunks of layers; ``tp`` and
    ``cp`` are accepted at 1 (not modelled yet). The schedule is ``training.schedule``.
    """

    ep: int = Field(gt=0, le=MAX_GPUS)
    gpus: int | None = Field(default=None, gt=0, le=MAX_GPUS)
    tokens_per_gpu: int | None = Field(default=None, gt=0, le=MAX_TOKENS_PER_GPU)
    seq_len: int = Field(default=4096, gt=0, le=16_777_216)
    micro_batches: int = Field(default=1, gt=0, le=64)
    comm_sms: int = Field(default=20, ge=0, le=10_000)
    dispatch_kernel: KernelName = "deepep-normal"
    dispatch_dtype: Literal["bf16", "fp8"] = "bf16"
    combine_dtype: Literal["bf16"] = "bf16"
    combine_grad_dtype: Literal["bf16", "fp8"] = "bf16"  # the backward's gradient to experts
    attention_tp: int = Field(default=1, gt=0, le=MAX_GPUS)
    moe_tp: int = Field(default=1, gt=0, le=MAX_GPUS)
    # Megatron-style training layout (docs/training.md): tensor, pipeline, virtual
    # pipeline and context parallel sizes; data parallelism is what the GPUs leave.
    tp: int = Field(default=1, gt=0, le=MAX_GPUS)
    pp: int = Field(default=1, gt=0, le=1024)
    vp: int = Field(default=1, gt=0, le=1024)
    cp: int = Field(default=1, gt=0, le=MAX_GPUS)

    @property
    def total_gpus(self) -> int:
        """``gpus``, by default one MoE instance: ``ep x moe_tp``."""
        return self.gpus if self.gpus is not None else self.ep * self.moe_tp

    @property
    def ep_groups(self) -> int:
        return self.total_gpus // self.ep
