"""ModelShape: the sizes of an MoE transformer that the simulator needs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from moesim.validation import STRICT, Checked

Positive = Field(gt=0)
# Upper bounds keep every size a 24 GiB machine can simulate (README: Limits); the largest
# published MoE models sit far inside them.
MAX_EXPERTS = 16_384  # expert ids are int16 throughout routing
MAX_LAYERS = 1024  # far beyond published models; README: Limits
MAX_TOP_K = 1024


@dataclass(frozen=True, kw_only=True, config=STRICT)
class ModelShape(Checked):
    """Sizes of a DeepSeekMoE-style model (names follow the Hugging Face configs).

    Layers ``[0, first_dense_layers)`` use a dense FFN of ``dense_intermediate_size``;
    every later layer is an MoE layer with ``routed_experts`` experts (``E``) of width
    ``moe_intermediate_size``, of which each token uses ``top_k`` (``K``), plus
    ``shared_experts`` experts that see every token.
    """

    name: str
    source: str = ""
    hidden_size: int = Field(gt=0, le=65_536)
    num_layers: int = Field(gt=0, le=MAX_LAYERS)
    first_dense_layers: int = Field(default=0, ge=0, le=MAX_LAYERS)
    dense_intermediate_size: int = Field(default=0, ge=0, le=1_048_576)
    moe_intermediate_size: int = Field(gt=0, le=1_048_576)
    routed_experts: int = Field(gt=0, le=MAX_EXPERTS)
    shared_experts: int = Field(default=0, ge=0, le=256)
    top_k: int = Field(gt=0, le=MAX_TOP_K)
    expert_groups: int | None = Field(default=None, gt=0, le=MAX_EXPERTS)
    topk_groups: int | None = Field(default=None, gt=0, le=MAX_EXPERTS)
    vocab_size: int = Field(gt=0, le=16_777_216)
    attention: Literal["mha", "gqa", "mla"] = "mha"
    num_heads: int = Field(gt=0, le=4096)
    num_kv_heads: int | None = Field(default=None, gt=0, le=4096)
    head_dim: int | None = Field(default=None, gt=0, le=65_536)
    q_lora_rank: int | None = Field(default=None, gt=0, le=65_536)
    kv_lora_rank: int | None = Field(default=None, gt=0, le=65_536)
    qk_nope_head_dim: int | None = Field(default=None, gt=0, le=65_536)
    qk_rope_head_dim: int | None = Field(default=None, gt=0, le=65_536)
    v_head_dim: int | None = Field(default=None, gt=0, le=65_536)
    gemm_dtype: Literal["bf16", "fp8", "fp4"] = "bf16"
    # Multi-token prediction modules after the last layer (DeepSeek-V3: 1); each is one
    # more transformer layer of the model's last kind, on the last pipeline stage.
    mtp_layers: int = Field(default=0, ge=0, le=16)
    # Sliding-window attention: ``sliding_window_layers`` of the layers attend to the
    # last ``sliding_window`` tokens only (GPT-OSS: every other layer, 128 tokens).
    sliding_window: int | None = Field(default=None, gt=0, le=16_777_216)
    sliding_window_layers: int = Field(default=0, ge=0, le=1024)

    @property
    def kv_heads(self) -> int:
        """Key/value heads of a GQA/MHA layer (GQA's own count, else one per query head)."""
        return self.num_kv_heads if self.attention == "gqa" else self.num_heads

    @property
    def moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers
