"""ModelShape: the sizes of an MoE transformer that the simulator needs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from moesim.validation import STRICT

Positive = Field(gt=0)


@dataclass(frozen=True, kw_only=True, config=STRICT)
class ModelShape:
    """Sizes of a DeepSeekMoE-style model (names follow the Hugging Face configs).

    Layers ``[0, first_dense_layers)`` use a dense FFN of ``dense_intermediate_size``;
    every later layer is an MoE layer with ``routed_experts`` experts (``E``) of width
    ``moe_intermediate_size``, of which each token uses ``top_k`` (``K``), plus
    ``shared_experts`` experts that see every token.
    """

    name: str
    source: str = ""
    hidden_size: int = Positive
    num_layers: int = Positive
    first_dense_layers: int = Field(default=0, ge=0)
    dense_intermediate_size: int = Field(default=0, ge=0)
    moe_intermediate_size: int = Positive
    routed_experts: int = Positive
    shared_experts: int = Field(default=0, ge=0)
    top_k: int = Positive
    expert_groups: int | None = Field(default=None, gt=0)
    topk_groups: int | None = Field(default=None, gt=0)
    vocab_size: int = Positive
    attention: Literal["mha", "gqa", "mla"] = "mha"
    num_heads: int = Positive
    num_kv_heads: int | None = Field(default=None, gt=0)
    head_dim: int | None = Field(default=None, gt=0)
    q_lora_rank: int | None = Field(default=None, gt=0)
    kv_lora_rank: int | None = Field(default=None, gt=0)
    qk_nope_head_dim: int | None = Field(default=None, gt=0)
    qk_rope_head_dim: int | None = Field(default=None, gt=0)
    v_head_dim: int | None = Field(default=None, gt=0)
    gemm_dtype: Literal["bf16", "fp8"] = "bf16"

    @property
    def kv_heads(self) -> int:
        """Key/value heads of a GQA/MHA layer (GQA's own count, else one per query head)."""
        return self.num_kv_heads if self.attention == "gqa" else self.num_heads

    @property
    def moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers
