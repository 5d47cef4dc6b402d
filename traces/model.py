"""A small DeepSeekMoE language model over bytes, for routing traces from real text.

Pre-norm decoder: byte embedding + learned positions, causal self-attention
(``scaled_dot_product_attention``), the first ``first_dense_layers`` blocks with a dense
SwiGLU FFN (as DeepSeek's ``first_k_dense_replace``), every later block a
:class:`MoELayer` (shared + fine-grained routed experts), final RMSNorm, LM head.
Shapes: ``B`` batch, ``S`` sequence, ``T = B*S``, ``H`` hidden, ``V`` vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moesim.config.gates import GATES
from moesim.errors import InputError
from moesim.traces.corpus import VOCAB_SIZE
from moesim.traces.layers import GATE_KINDS, GateConfig, GateOutput, MoELayer, SwiGLU

SIMULATED_DEVICES = 4  # V2/V3 groups: the experts are spread over 4 pretend devices
MAX_DEVICES = 2  # M: devices (groups) one token may reach


def default_gate_config(
    kind: str,
    num_experts: int = 16,
    top_k: int = 4,
    *,
    num_devices: int = SIMULATED_DEVICES,
    max_devices: int = MAX_DEVICES,
    **overrides: Any,
) -> GateConfig:
    """A gate of ``kind`` with its paper's balance settings, scaled to a tiny model.

    * ``softmax-topk`` (DeepSeekMoE / V1): expert-level loss only.
    * ``device-limited`` (V2): top-K within the M = ``max_devices`` best of
      ``num_devices`` devices, expert/device/communication losses (V2's 0.003/0.05/0.02).
    * ``group-limited-sigmoid`` (V3): sigmoid scores, groups = devices, normalised
      weights, aux-loss-free selection bias (gamma 1e-3) plus the tiny sequence loss.
    * ``switch-top1`` / ``gshard-top2`` / ``noisy-topk``: their papers' gates (K fixed
      to 1 and 2 for the first two), with their expert-level balance loss.

    ``overrides`` replace any GateConfig field (e.g. ``capacity_factor=1.0``).
    """
    if kind not in GATE_KINDS:
        raise InputError(f"unknown gate kind {kind!r}", field="gate", allowed=", ".join(GATE_KINDS))
    grouped = kind in ("device-limited", "group-limited-sigmoid")
    if grouped and num_experts % num_devices:
        raise InputError(
            f"{num_experts} experts do not split over {num_devices} devices",
            field="num_experts",
            allowed=f"a multiple of {num_devices}",
        )
    settings: dict[str, Any] = {"kind": kind, "num_experts": num_experts, "top_k": top_k}
    if kind == "softmax-topk":
        settings.update(expert_loss=0.01)
    elif kind == "device-limited":
        settings.update(
            group_size=num_experts // num_devices,
            max_groups=max_devices,
            expert_loss=0.003,
            device_loss=0.05,
            comm_loss=0.02,
        )
    elif kind == "group-limited-sigmoid":
        settings.update(
            group_size=num_experts // num_devices,
            max_groups=max_devices,
            normalize=True,
            bias_rate=1e-3,
            seq_loss=1e-4,
        )
    else:
        settings.update(expert_loss=0.01)
        settings["top_k"] = GATES[kind].fixed_top_k or top_k
    settings.update(overrides)
    return GateConfig(**settings)


def gate_metadata(gate: GateConfig) -> dict[str, Any]:
    """``{kind, params}`` as trace metadata records it (the names HF capture uses too)."""
    params = {k: v for k, v in dataclasses.asdict(gate).items() if k != "kind"}
    if gate.group_size:
        params["num_groups"] = gate.num_experts // gate.group_size
    return {"kind": gate.kind, "params": params}


@dataclass(frozen=True, kw_only=True)
class TinyMoEConfig:
    """Shape of :class:`TinyMoELM`; experts and top-k are the gate's.

    Defaults: 4 layers (1 dense + 3 MoE), hidden 128, 16 fine-grained routed experts of
    width 64 with top-4 and 1 shared expert, so a token activates 5 x 64 = 320 FFN
    units per MoE layer, the width of the dense first layer's FFN.
    """

    vocab_size: int = VOCAB_SIZE
    hidden: int = 128
    num_layers: int = 4
    first_dense_layers: int = 1
    num_heads: int = 4
    seq_len: int = 128
    dense_intermediate: int = 320
    expert_intermediate: int = 64
    num_shared: int = 1
    gate: GateConfig = field(default_factory=lambda: default_gate_config("softmax-topk"))

    def __post_init__(self) -> None:
        positive = {
            "vocab_size": self.vocab_size,
            "hidden": self.hidden,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "seq_len": self.seq_len,
            "dense_intermediate": self.dense_intermediate,
            "expert_intermediate": self.expert_intermediate,
        }
        for name, value in positive.items():
            if value < 1:
                raise InputError(f"{name}={value}", field=name, allowed=">= 1")
        if not 0 <= self.first_dense_layers < self.num_layers:
            raise InputError(
                f"first_dense_layers={self.first_dense_layers} of "
                f"{self.num_layers} layers leaves no MoE layer",
                field="first_dense_layers",
                allowed=f"0..{self.num_layers - 1}",
            )
        if self.hidden % self.num_heads:
            raise InputError(
                f"hidden {self.hidden} does not split into {self.num_heads} heads",
                field="num_heads",
                allowed=f"a divisor of {self.hidden}",
            )
        if self.num_shared < 0:
            raise InputError(f"num_shared={self.num_shared}", field="num_shared", allowed=">= 0")

    @property
    def num_experts(self) -> int:
        return self.gate.num_experts

    @property
    def top_k(self) -> int:
        return self.gate.top_k

    @property
    def moe_layer_indices(self) -> list[int]:
        return list(range(self.first_dense_layers, self.num_layers))

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "gate"}
        return {**data, "gate": gate_metadata(self.gate)}


def tiny_config(
    gate_kind: str = "softmax-topk",
    *,
    num_experts: int = 16,
    top_k: int = 4,
    gate_overrides: dict[str, Any] | None = None,
    **fields: Any,
) -> TinyMoEConfig:
    """A TinyMoEConfig whose gate is chosen by name (see :func:`default_gate_config`)."""
    gate = default_gate_config(gate_kind, num_experts, top_k, **(gate_overrides or {}))
    return TinyMoEConfig(gate=gate, **fields)


class LMOutput(NamedTuple):
    logits_bsv: torch.Tensor
    aux_loss: torch.Tensor  # sum of the MoE layers' weighted balance terms
    gates: list[GateOutput]  # one per MoE layer, in model order


class Attention(nn.Module):
    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x_bsh: torch.Tensor) -> torch.Tensor:
        batch, seq_len, hidden = x_bsh.shape
        qkv = self.qkv(x_bsh).view(batch, seq_len, 3, self.num_heads, hidden // self.num_heads)
        q_bnsd, k_bnsd, v_bnsd = qkv.permute(2, 0, 3, 1, 4)
        y_bnsd = F.scaled_dot_product_attention(q_bnsd, k_bnsd, v_bnsd, is_causal=True)
        return self.out(y_bnsd.transpose(1, 2).reshape(batch, seq_len, hidden))


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``."""

    def __init__(self, config: TinyMoEConfig, *, moe: bool) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.hidden)
        self.attn = Attention(config.hidden, config.num_heads)
        self.ffn_norm = nn.RMSNorm(config.hidden)
        self.ffn: nn.Module = (
            MoELayer(config.hidden, config.expert_intermediate, config.num_shared, config.gate)
            if moe
            else SwiGLU(config.hidden, config.dense_intermediate)
        )

    def forward(
        self, x_bsh: torch.Tensor, seq_id_t: torch.Tensor
    ) -> tuple[torch.Tensor, GateOutput | None]:
        x_bsh = x_bsh + self.attn(self.attn_norm(x_bsh))
        if isinstance(self.ffn, MoELayer):
            y_bsh, gate_out = self.ffn(self.ffn_norm(x_bsh), seq_id_t)
            return x_bsh + y_bsh, gate_out
        return x_bsh + self.ffn(self.ffn_norm(x_bsh)), None


class TinyMoELM(nn.Module):
    """Byte-level DeepSeekMoE LM; ``forward(tokens_bs) -> LMOutput``."""

    def __init__(self, config: TinyMoEConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden)
        self.pos_embed = nn.Embedding(config.seq_len, config.hidden)
        self.blocks = nn.ModuleList(
            Block(config, moe=i >= config.first_dense_layers) for i in range(config.num_layers)
        )
        self.norm = nn.RMSNorm(config.hidden)
        self.lm_head = nn.Linear(config.hidden, config.vocab_size, bias=False)
        for module in (self.embed, self.pos_embed):
            nn.init.normal_(module.weight, std=0.02)
        # Filled in by train(); capture records it in the trace's source.
        self.train_info: dict[str, Any] | None = None

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [block.ffn for block in self.blocks if isinstance(block.ffn, MoELayer)]

    def forward(self, tokens_bs: torch.Tensor, seq_id_t: torch.Tensor | None = None) -> LMOutput:
        """Logits for ``tokens_bs`` int64 [B, S]; ``seq_id_t`` [B*S] (default: a row each)."""
        if tokens_bs.dim() != 2:
            raise InputError(
                f"tokens have shape {tuple(tokens_bs.shape)}",
                field="tokens_bs",
                allowed="[batch, seq]",
            )
        batch, seq_len = tokens_bs.shape
        if seq_len > self.config.seq_len:
            raise InputError(
                f"sequence of {seq_len} tokens",
                field="tokens_bs",
                allowed=f"<= seq_len {self.config.seq_len}",
            )
        if seq_id_t is None:
            seq_id_t = torch.arange(batch, device=tokens_bs.device).repeat_interleave(seq_len)
        positions = torch.arange(seq_len, device=tokens_bs.device)
        x_bsh = self.embed(tokens_bs) + self.pos_embed(positions)
        gates: list[GateOutput] = []
        aux_loss = x_bsh.new_zeros(())
        for block in self.blocks:
            x_bsh, gate_out = block(x_bsh, seq_id_t)
            if gate_out is not None:
                gates.append(gate_out)
                aux_loss = aux_loss + gate_out.aux_loss
        return LMOutput(self.lm_head(self.norm(x_bsh)), aux_loss, gates)
