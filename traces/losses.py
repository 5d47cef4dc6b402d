"""Balance losses of MoE gates, each a pure function returning a scalar tensor.

Coefficients (alpha) are the caller's: every function returns the bare sum, which is
1 for perfectly uniform routing (docs/routing.md sections 2.4, 3.4, 5) except
the CV^2 losses, whose minimum is 0. Counts ``f`` carry no gradient; the mean
affinities ``P`` do. ``-1`` slots (dropped) are not counted. An empty batch gives 0,
still attached to the graph of its inputs.

Shapes: ``T`` tokens, ``E`` experts, ``K`` slots per token, ``D`` devices, ``S``
sequences.
"""

from __future__ import annotations

import torch

from moesim.errors import InputError
from moesim.traces.gates import expert_load, topk_select


def _empty(*tensors: torch.Tensor) -> torch.Tensor:
    """A zero that keeps ``tensors`` in the autograd graph."""
    return sum((t.float().sum() * 0.0 for t in tensors), torch.zeros(()))


def _check_devices(n_experts: int, experts_per_device: int) -> int:
    """Number of devices D; experts must split evenly over them."""
    if experts_per_device < 1 or n_experts % experts_per_device:
        raise InputError(
            f"experts_per_device={experts_per_device} does not divide {n_experts} experts",
            field="group_size",
            allowed=f"a divisor of {n_experts}",
        )
    return n_experts // experts_per_device


def expert_frequency(ids_tk: torch.Tensor, *, num_experts: int) -> torch.Tensor:
    """``f_e`` [E] = ``E / (K T) * #(tokens selecting e)``; 1 everywhere when uniform."""
    n_tokens, top_k = ids_tk.shape
    load_e = expert_load(ids_tk, num_experts=num_experts).float()
    return load_e * (num_experts / (top_k * n_tokens))


def expert_balance_loss(scores_te: torch.Tensor, ids_tk: torch.Tensor) -> torch.Tensor:
    """Expert-level ``sum_e f_e P_e`` (DeepSeekMoE / V2 ``L_ExpBal`` without alpha1).

    ``P_e`` = mean over tokens of ``scores_te`` [T, E]; pass scores whose rows sum
    to 1 (softmax, or sigmoid divided by its row sum) for the minimum to be 1.
    """
    n_tokens, n_experts = scores_te.shape
    if n_tokens == 0:
        return _empty(scores_te)
    f_e = expert_frequency(ids_tk, num_experts=n_experts)
    p_e = scores_te.float().mean(dim=0)
    return (f_e * p_e).sum()


def device_balance_loss(
    scores_te: torch.Tensor, ids_tk: torch.Tensor, *, experts_per_device: int
) -> torch.Tensor:
    """Device-level ``sum_d f'_d P'_d`` (V2 ``L_DevBal`` without alpha2).

    ``f'_d`` = mean of ``f_e`` over the device's experts, ``P'_d`` = sum of ``P_e``.
    """
    n_tokens, n_experts = scores_te.shape
    n_devices = _check_devices(n_experts, experts_per_device)
    if n_tokens == 0:
        return _empty(scores_te)
    f_d = expert_frequency(ids_tk, num_experts=n_experts).reshape(n_devices, -1).mean(dim=1)
    p_d = scores_te.float().mean(dim=0).reshape(n_devices, -1).sum(dim=1)
    return (f_d * p_d).sum()


def comm_balance_loss(
    scores_te: torch.Tensor,
    ids_tk: torch.Tensor,
    *,
    experts_per_device: int,
    max_devices: int,
) -> torch.Tensor:
    """Communication ``sum_d f''_d P''_d`` (V2 ``L_CommBal`` without alpha3).

    ``f''_d = D / (M T) * #(tokens sent to d)``: a token counts once per device however
    many of its experts live there. ``P''_d`` = sum of ``P_e`` over the device.
    """
    n_tokens, n_experts = scores_te.shape
    n_devices = _check_devices(n_experts, experts_per_device)
    if max_devices < 1:
        raise InputError(f"max_devices={max_devices}", field="max_groups", allowed=">= 1")
    if n_tokens == 0:
        return _empty(scores_te)
    device_tk = torch.where(ids_tk >= 0, ids_tk // experts_per_device, n_devices)
    # One-hot over D+1 columns (the last one collects dropped slots), then any() per
    # token, so several experts on one device count once.
    sent_td = torch.zeros(n_tokens, n_devices + 1, dtype=torch.bool, device=ids_tk.device)
    sent_td.scatter_(1, device_tk, True)
    f_d = sent_td[:, :n_devices].sum(dim=0).float() * (n_devices / (max_devices * n_tokens))
    p_d = scores_te.float().mean(dim=0).reshape(n_devices, -1).sum(dim=1)
    return (f_d * p_d).sum()


def sequence_balance_loss(
    scores_te: torch.Tensor, seq_id_t: torch.Tensor | None, *, top_k: int
) -> torch.Tensor:
    """DeepSeek-V3 complementary sequence-wise loss (section 3.4, without alpha).

    Per sequence of ``T_s`` tokens: ``f_e = E / (K T_s) * #(e in plain top-K of s_t)``
    (unbiased scores, no group limit), ``P_e`` = mean of ``s / sum_j s``; the loss is
    the mean over sequences of ``sum_e f_e P_e``. ``seq_id_t`` None = one sequence.
    """
    n_tokens, n_experts = scores_te.shape
    if n_tokens == 0:
        return _empty(scores_te)
    if seq_id_t is None:
        seq_id_t = torch.zeros(n_tokens, dtype=torch.long, device=scores_te.device)
    _, seq_t = torch.unique(seq_id_t, sorted=True, return_inverse=True)
    n_seqs = int(seq_t.max()) + 1
    scores_te = scores_te.float()
    ids_tk = topk_select(scores_te, top_k=top_k)
    tokens_s = torch.bincount(seq_t, minlength=n_seqs).float()
    hits_se = torch.zeros(n_seqs, n_experts, device=scores_te.device)
    routed_tk = ids_tk >= 0
    hits_se.index_put_(
        (seq_t[:, None].expand_as(ids_tk)[routed_tk], ids_tk[routed_tk]),
        torch.ones((), device=scores_te.device),
        accumulate=True,
    )
    f_se = hits_se * (n_experts / top_k) / tokens_s[:, None]
    share_te = scores_te / scores_te.sum(dim=-1, keepdim=True)
    p_se = torch.zeros(n_seqs, n_experts, device=scores_te.device)
    p_se = p_se.index_put((seq_t,), share_te, accumulate=True)
    p_se = p_se / tokens_s[:, None]
    return (f_se * p_se).sum(dim=1).mean()


def switch_aux_loss(scores_te: torch.Tensor, ids_t: torch.Tensor) -> torch.Tensor:
    """Switch / GShard aux loss ``E * sum_e f_e P_e`` (without its coefficient).

    ``f_e`` = fraction of tokens whose (first) choice ``ids_t`` [T] is ``e``, ``P_e``
    = mean probability. Equals the expert-level loss with K=1; pass the first
    choices for GShard's ``E^2 * mean_e(m_e c_e)``.
    """
    return expert_balance_loss(scores_te, ids_t[:, None])


def z_loss(logits_te: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): ``mean_t (logsumexp_e u_{t,e})^2``."""
    if logits_te.shape[0] == 0:
        return _empty(logits_te)
    return torch.logsumexp(logits_te.float(), dim=-1).square().mean()


def cv_squared(values_e: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation ``var / (mean^2 + 1e-10)`` (population variance).

    tensor2tensor's form; 0 for equal values and for a single expert.
    """
    values_e = values_e.float()
    if values_e.numel() <= 1:
        return _empty(values_e)
    return values_e.var(correction=0) / (values_e.mean().square() + 1e-10)


def importance_loss(importance_e: torch.Tensor) -> torch.Tensor:
    """Noisy top-k importance loss ``CV(Imp)^2``, ``Imp_e = sum_t G_{t,e}``."""
    return cv_squared(importance_e)


def load_loss(load_e: torch.Tensor) -> torch.Tensor:
    """Noisy top-k load loss ``CV(Load)^2`` (smooth load from ``noisy_topk``)."""
    return cv_squared(load_e)
