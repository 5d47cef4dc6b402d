"""Torch modules of a DeepSeekMoE layer: the gate (router) and the MoE FFN.

The modules hold parameters and wire the pure routing functions together; every
routing rule lives in ``gates.py`` and ``capacity.py``, every loss in ``losses.py``
(docs/routing.md). Shapes: ``B`` batch, ``S`` sequence, ``T = B*S`` tokens,
``H`` hidden, ``I`` expert intermediate size, ``E`` routed experts, ``K`` per token.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moesim.config.gates import GATE_NAMES, GATES
from moesim.errors import InputError
from moesim.traces import bias as bias_rule
from moesim.traces import losses
from moesim.traces.capacity import (
    DROP_POLICIES,
    drop_by_device_capacity,
    drop_by_expert_capacity,
    drop_priority,
    expert_capacity,
    positions_in_sequence,
    protected_sequences,
)
from moesim.traces.gates import (
    Routing,
    apply_drops,
    check_selection,
    gshard_select,
    noisy_topk,
    route,
    score,
)

GATE_KINDS = GATE_NAMES


@dataclass(frozen=True, kw_only=True)
class GateConfig:
    """One MoE gate: selection, weights, capacity dropping, balance terms.

    ``group_size`` is the experts per device (V2) or per group (V3) and also the
    device map of the device/communication losses; ``max_groups`` is M (V2) or
    ``topk_group`` (V3). ``normalize`` is used as given (set True for DeepSeek-V3).
    ``capacity_factor`` drops per device for ``device-limited`` (V2), per expert
    (``ceil(T K / E * cf)``) for every other kind; None drops nothing.
    ``expert_loss`` weighs the kind's expert-level balance term: ``sum f P`` for the
    DeepSeek gates, ``E sum f P`` for Switch/GShard, ``CV(Imp)^2 + CV(Load)^2`` for
    noisy top-k. ``z_loss`` weighs the router z-loss. ``seed`` seeds the choice of
    never-dropped sequences.
    """

    kind: str
    num_experts: int
    top_k: int
    group_size: int | None = None
    max_groups: int | None = None
    scale: float = 1.0
    normalize: bool = False
    capacity_factor: float | None = None
    drop_policy: str = "probs"
    never_drop_fraction: float = 0.0
    expert_loss: float = 0.0
    device_loss: float = 0.0
    comm_loss: float = 0.0
    seq_loss: float = 0.0
    bias_rate: float = 0.0
    z_loss: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in GATE_KINDS:
            raise InputError(
                f"unknown gate kind {self.kind!r}", field="kind", allowed=", ".join(GATE_KINDS)
            )
        self._check_selection()
        self._check_weights()
        self._check_capacity()
        self._check_losses()

    def _check_selection(self) -> None:
        gate = GATES[self.kind]
        if not gate.scenario and self.max_groups is not None:
            raise InputError(
                f"gate {self.kind!r} has no group limit",
                field="max_groups",
                allowed="None (group limits need a DeepSeek gate kind)",
            )
        if self.kind == "device-limited" and (self.group_size is None or self.max_groups is None):
            raise InputError(
                "device-limited routing needs experts per device and M",
                field="group_size" if self.group_size is None else "max_groups",
                allowed="group_size and max_groups both set",
            )
        fixed_k = gate.fixed_top_k
        if fixed_k is not None and self.top_k != fixed_k:
            raise InputError(
                f"gate {self.kind!r} with top_k={self.top_k}", field="top_k", allowed=str(fixed_k)
            )
        check_selection(
            num_experts=self.num_experts,
            top_k=self.top_k,
            group_size=self.group_size,
            max_groups=self.max_groups,
            group_rule=gate.group_rule,
        )

    def _check_weights(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise InputError(f"scale={self.scale}", field="scale", allowed="a finite number > 0")
        if GATES[self.kind].fixed_weights and (self.scale != 1.0 or self.normalize):
            raise InputError(
                f"gate {self.kind!r} fixes its weights",
                field="scale" if self.scale != 1.0 else "normalize",
                allowed="scale=1.0, normalize=False",
            )

    def _check_capacity(self) -> None:
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise InputError(
                f"capacity_factor={self.capacity_factor}",
                field="capacity_factor",
                allowed="> 0 or None",
            )
        if self.drop_policy not in DROP_POLICIES:
            raise InputError(
                f"unknown drop policy {self.drop_policy!r}",
                field="drop_policy",
                allowed="probs, position",
            )
        if not 0.0 <= self.never_drop_fraction <= 1.0:
            raise InputError(
                f"never_drop_fraction={self.never_drop_fraction}",
                field="never_drop_fraction",
                allowed="0..1",
            )
        if self.never_drop_fraction > 0 and self.capacity_factor is None:
            raise InputError(
                "never_drop_fraction without a capacity_factor drops nothing anyway",
                field="never_drop_fraction",
                allowed="0 when capacity_factor is None",
            )

    def _check_losses(self) -> None:
        coefficients = {
            "expert_loss": self.expert_loss,
            "device_loss": self.device_loss,
            "comm_loss": self.comm_loss,
            "seq_loss": self.seq_loss,
            "bias_rate": self.bias_rate,
            "z_loss": self.z_loss,
        }
        for name, value in coefficients.items():
            if not (math.isfinite(value) and value >= 0):
                raise InputError(f"{name}={value}", field=name, allowed="a finite number >= 0")
        if (self.device_loss or self.comm_loss) and self.group_size is None:
            raise InputError(
                "device and communication losses need the experts per device",
                field="group_size",
                allowed=f"a divisor of {self.num_experts}",
            )
        if self.comm_loss and self.max_groups is None:
            raise InputError(
                "the communication loss needs M, the devices a token may reach",
                field="max_groups",
                allowed="set, with kind device-limited or group-limited-sigmoid",
            )
        if self.bias_rate and self.kind != "group-limited-sigmoid":
            raise InputError(
                f"a selection bias needs sigmoid scores, not gate {self.kind!r}",
                field="bias_rate",
                allowed="0 unless kind is group-limited-sigmoid",
            )


@dataclass(frozen=True)
class GateOutput:
    """What a gate returns for T tokens.

    ``routing`` after dropping, ``logits_te`` float32 [T, E], ``aux_loss`` scalar (the
    configured losses, weighted; 0 when none), ``dropped_tk`` bool [T, K] (slots the
    gate chose but capacity dropped).
    """

    routing: Routing
    logits_te: torch.Tensor
    aux_loss: torch.Tensor
    dropped_tk: torch.Tensor


class MoEGate(nn.Module):
    """Router of one MoE layer: ``weight`` [E, H]; buffer ``bias`` [E] (fp32) for V3."""

    def __init__(self, hidden: int, config: GateConfig) -> None:
        super().__init__()
        if hidden < 1:
            raise InputError(f"hidden={hidden}", field="hidden", allowed=">= 1")
        self.config = config
        self.hidden = hidden
        bound = 1.0 / math.sqrt(hidden)
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden).uniform_(-bound, bound))
        if config.kind == "noisy-topk":
            # Zero noise weights start every expert with the minimum noise (as t2t).
            self.noise_weight = nn.Parameter(torch.zeros(config.num_experts, hidden))
        if config.kind == "group-limited-sigmoid":
            # fp32 even in half-precision models: 1 ulp of bias flips experts (docs/routing.md 8.9).
            self.register_buffer("bias", torch.zeros(config.num_experts, dtype=torch.float32))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> MoEGate:
        # ``.to(bfloat16)`` / ``.half()`` move the bias but must not round it.
        bias_e = self._buffers.get("bias")
        module = super()._apply(fn, recurse)
        if bias_e is not None:
            self._buffers["bias"] = bias_e.to(device=self._buffers["bias"].device)
        return module

    def forward(self, x_th: torch.Tensor, seq_id_t: torch.Tensor | None = None) -> GateOutput:
        """Route ``x_th`` [T, H]; ``seq_id_t`` [T] names each token's sequence (None: one)."""
        if x_th.dim() != 2 or x_th.shape[1] != self.hidden:
            raise InputError(
                f"gate input has shape {tuple(x_th.shape)}",
                field="x_th",
                allowed=f"[tokens, {self.hidden}]",
            )
        n_tokens = x_th.shape[0]
        if seq_id_t is None:
            seq_id_t = torch.zeros(n_tokens, dtype=torch.long, device=x_th.device)
        if seq_id_t.shape != (n_tokens,):
            raise InputError(
                f"seq_id_t has shape {tuple(seq_id_t.shape)} for {n_tokens} tokens",
                field="seq_id_t",
                allowed="one sequence id per token",
            )
        logits_te = F.linear(x_th.float(), self.weight.float())
        selected, noisy_loss = self._select(x_th, logits_te)
        kept_tk = self._drop(selected, seq_id_t)
        routing = apply_drops(selected, kept_tk, renormalize=self.config.kind == "gshard-top2")
        dropped_tk = (selected.ids_tk >= 0) & (kept_tk < 0)
        aux_loss = self._aux_loss(selected, logits_te, seq_id_t, noisy_loss)
        return GateOutput(
            routing=routing, logits_te=logits_te, aux_loss=aux_loss, dropped_tk=dropped_tk
        )

    def _select(
        self, x_th: torch.Tensor, logits_te: torch.Tensor
    ) -> tuple[Routing, torch.Tensor | None]:
        """The gate's choice before dropping, and the noisy gate's CV^2 losses."""
        cfg = self.config
        gate = GATES[cfg.kind]
        if gate.scenario:
            sigmoid = gate.scores == "sigmoid"
            return route(
                score(logits_te, gate.scores),
                kind=cfg.kind,
                top_k=cfg.top_k,
                group_size=cfg.group_size,
                max_groups=cfg.max_groups,
                bias_e=self.bias if sigmoid else None,
                normalize=cfg.normalize,
                scale=cfg.scale,
            ), None
        if cfg.kind == "switch-top1":
            return route(score(logits_te, "softmax"), kind="softmax-topk", top_k=1), None
        if cfg.kind == "gshard-top2":
            return gshard_select(logits_te), None
        assert cfg.kind == "noisy-topk"
        selected, importance_e, load_e = noisy_topk(
            x_th, self.weight.T, self.noise_weight.T, top_k=cfg.top_k, train=self.training
        )
        return selected, losses.importance_loss(importance_e) + losses.load_loss(load_e)

    def _drop(self, selected: Routing, seq_id_t: torch.Tensor) -> torch.Tensor:
        """Kept ids [T, K] under the configured capacity (the selection when none)."""
        cfg = self.config
        ids_tk = selected.ids_tk
        if cfg.capacity_factor is None:
            return ids_tk
        protected_t = None
        if cfg.never_drop_fraction > 0:
            generator = torch.Generator(device=ids_tk.device).manual_seed(cfg.seed)
            protected_t = protected_sequences(
                seq_id_t, fraction=cfg.never_drop_fraction, generator=generator
            )
        priority_tk = drop_priority(
            selected.weights_tk,
            policy=cfg.drop_policy,
            pos_t=positions_in_sequence(seq_id_t),
        )
        if cfg.kind == "device-limited":
            assert cfg.group_size is not None
            return drop_by_device_capacity(
                ids_tk,
                priority_tk,
                experts_per_device=cfg.group_size,
                n_devices=cfg.num_experts // cfg.group_size,
                capacity_factor=cfg.capacity_factor,
                protected_t=protected_t,
            )
        capacity = expert_capacity(
            ids_tk.shape[0],
            top_k=cfg.top_k,
            num_experts=cfg.num_experts,
            capacity_factor=cfg.capacity_factor,
        )
        # The priority already encodes the policy (probs or minus the position).
        return drop_by_expert_capacity(
            ids_tk,
            priority_tk,
            capacity=capacity,
            policy="probs",
            protected_t=protected_t,
            slot_major=cfg.kind == "gshard-top2",
        )

    def _aux_loss(
        self,
        selected: Routing,
        logits_te: torch.Tensor,
        seq_id_t: torch.Tensor,
        noisy_loss: torch.Tensor | None,
    ) -> torch.Tensor:
        """Weighted sum of the configured balance terms, counted on the choice before dropping."""
        cfg = self.config
        scores_te = selected.scores_te
        # Sigmoid rows do not sum to 1; normalised, the minimum of sum f P is 1 again.
        if cfg.kind == "group-limited-sigmoid":
            scores_te = scores_te / scores_te.sum(dim=-1, keepdim=True)
        total = logits_te.sum() * 0.0
        if cfg.expert_loss:
            if noisy_loss is not None:
                expert_term = noisy_loss
            elif cfg.kind in ("switch-top1", "gshard-top2"):
                expert_term = losses.switch_aux_loss(scores_te, selected.ids_tk[:, 0])
            else:
                expert_term = losses.expert_balance_loss(scores_te, selected.ids_tk)
            total = total + cfg.expert_loss * expert_term
        if cfg.device_loss:
            assert cfg.group_size is not None
            total = total + cfg.device_loss * losses.device_balance_loss(
                scores_te, selected.ids_tk, experts_per_device=cfg.group_size
            )
        if cfg.comm_loss:
            assert cfg.group_size is not None and cfg.max_groups is not None
            total = total + cfg.comm_loss * losses.comm_balance_loss(
                scores_te,
                selected.ids_tk,
                experts_per_device=cfg.group_size,
                max_devices=cfg.max_groups,
            )
        if cfg.seq_loss:
            total = total + cfg.seq_loss * losses.sequence_balance_loss(
                selected.scores_te, seq_id_t, top_k=cfg.top_k
            )
        if cfg.z_loss:
            total = total + cfg.z_loss * losses.z_loss(logits_te)
        return total

    @torch.no_grad()
    def update_bias(self, load_e: torch.Tensor) -> None:
        """Move ``bias`` by the V3 sign rule (``config.bias_rate``); ``load_e`` [E] per expert."""
        if self.config.kind != "group-limited-sigmoid":
            raise InputError(
                f"gate {self.config.kind!r} has no selection bias",
                field="kind",
                allowed="group-limited-sigmoid",
            )
        self.bias.copy_(
            bias_rule.update_bias(
                self.bias, load_e.to(self.bias.device), rate=self.config.bias_rate
            )
        )


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, the DeepSeek expert FFN (no biases)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x_th: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_th)) * self.up_proj(x_th))


def routed_experts(
    x_th: torch.Tensor,
    routing: Routing,
    gate_up_eih: torch.Tensor,
    down_ehi: torch.Tensor,
) -> torch.Tensor:
    """``y_th`` [T, H] = sum over kept slots of ``g * SwiGLU_e(x)``.

    ``gate_up_eih`` [E, 2I, H] stacks the gate and up projections; ``down_ehi`` [E, H, I].
    Only experts that received tokens run; ``-1`` slots contribute nothing.
    """
    n_tokens, top_k = routing.ids_tk.shape
    y_th = torch.zeros_like(x_th)
    ids_a = routing.ids_tk.reshape(-1)
    kept_a = ids_a >= 0
    token_a = torch.arange(n_tokens, device=x_th.device).repeat_interleave(top_k)[kept_a]
    weight_a = routing.weights_tk.reshape(-1)[kept_a]
    ids_a = ids_a[kept_a]
    for expert in torch.unique(ids_a).tolist():
        mine_a = ids_a == expert
        tokens_n = token_a[mine_a]
        gate_ni, up_ni = F.linear(x_th[tokens_n], gate_up_eih[expert]).chunk(2, dim=-1)
        out_nh = F.linear(F.silu(gate_ni) * up_ni, down_ehi[expert])
        weighted_nh = out_nh * weight_a[mine_a, None].to(out_nh.dtype)
        # index_put(accumulate) rather than index_add: the latter stalls on busy CPUs.
        y_th = y_th.index_put((tokens_n,), weighted_nh, accumulate=True)
    return y_th


class MoELayer(nn.Module):
    """DeepSeekMoE FFN: ``sum shared SwiGLU(h) + sum g * routed SwiGLU(h)``.

    The residual ``h +`` is the caller's. The ``n_shared`` shared experts run as one
    SwiGLU of width ``n_shared * I`` (equal to their sum, as HF builds it).
    """

    def __init__(
        self, hidden: int, expert_intermediate: int, n_shared: int, gate: GateConfig
    ) -> None:
        super().__init__()
        if expert_intermediate < 1 or n_shared < 0:
            raise InputError(
                f"expert_intermediate={expert_intermediate}, n_shared={n_shared}",
                field="expert_intermediate" if expert_intermediate < 1 else "n_shared",
                allowed=">= 1" if expert_intermediate < 1 else ">= 0",
            )
        self.hidden = hidden
        self.gate = MoEGate(hidden, gate)
        n_experts = gate.num_experts
        in_bound = 1.0 / math.sqrt(hidden)
        out_bound = 1.0 / math.sqrt(expert_intermediate)
        self.gate_up_proj = nn.Parameter(
            torch.empty(n_experts, 2 * expert_intermediate, hidden).uniform_(-in_bound, in_bound)
        )
        self.down_proj = nn.Parameter(
            torch.empty(n_experts, hidden, expert_intermediate).uniform_(-out_bound, out_bound)
        )
        self.shared_experts = SwiGLU(hidden, n_shared * expert_intermediate) if n_shared else None

    def forward(
        self, x_bsh: torch.Tensor, seq_id_t: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, GateOutput]:
        """``(y, gate output)``; ``y`` has the shape of ``x_bsh`` [..., H].

        Without ``seq_id_t`` each row of a [B, S, H] input is one sequence.
        """
        if x_bsh.shape[-1] != self.hidden:
            raise InputError(
                f"layer input has shape {tuple(x_bsh.shape)}",
                field="x_bsh",
                allowed=f"[..., {self.hidden}]",
            )
        x_th = x_bsh.reshape(-1, self.hidden)
        if seq_id_t is None and x_bsh.dim() == 3:
            batch, seq_len, _ = x_bsh.shape
            seq_id_t = torch.arange(batch, device=x_bsh.device).repeat_interleave(seq_len)
        out = self.gate(x_th, seq_id_t)
        y_th = routed_experts(x_th, out.routing, self.gate_up_proj, self.down_proj)
        if self.shared_experts is not None:
            y_th = y_th + self.shared_experts(x_th)
        return y_th.reshape(x_bsh.shape), out
