"""ServingConfig: the request batch of one inference-serving step (prefill or decode)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from moesim.validation import STRICT, Checked


@dataclass(frozen=True, kw_only=True, config=STRICT)
class ServingConfig(Checked):
    """The workload of a serving step, as serving benchmarks describe it.

    Required by ``mode: prefill`` and ``mode: decode`` and refused by the other modes.
    ``batch`` is the number of requests on each attention data-parallel rank (a group
    of ``parallel.attention_tp`` GPUs; ``gpus / attention_tp`` ranks in all). Every
    request has ``isl`` input (prompt) tokens and produces ``osl`` output tokens.

    * ``prefill``: each rank runs the forward pass of ``batch`` whole prompts of ``isl``
      tokens (causal attention over the prompt); the step time is the time to first
      token (TTFT) of the batch.
    * ``decode``: each rank runs one forward step of ``batch`` new tokens, one per
      request, each attending to ``isl + osl / 2`` cached tokens (the mean context over
      the ``osl`` decode steps); the step time is the time per output token (TPOT).

    ``kv_dtype`` is the KV cache's element type (``fp8``: one byte per value, as the
    engines' FP8 KV cache option), which sets the bytes a decode step reads.
    """

    batch: int = Field(gt=0, le=1_048_576)  # requests per attention-DP rank
    isl: int = Field(gt=0, le=16_777_216)  # input sequence length (prompt tokens per request)
    osl: int = Field(gt=0, le=16_777_216)  # output sequence length (tokens generated per request)
    kv_dtype: Literal["bf16", "fp8"] = "bf16"

    @property
    def decode_context(self) -> float:
        """Mean cached tokens a decode step attends to: ``isl + osl / 2``."""
        return self.isl + self.osl / 2
