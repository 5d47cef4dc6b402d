"""MoE gates: scores, deterministic (group-limited) top-K selection and gate weights.

Selection works on *scores* (affinities after softmax or sigmoid), so a simulator can
re-route the scores stored in a trace under another gate, group limit or bias
(docs/routing.md sections 1-3 and 5).

Every top-k here orders by (value desc, index asc), for experts and for groups alike
(docs/routing.md section 0); the K slots of a token come out in that order. Torch's own
``topk`` leaves ties unspecified, so the selection uses a stable descending sort.

Shapes: ``T`` tokens, ``E`` routed experts, ``K`` experts per token, ``G`` groups,
``H`` hidden size. Ids are int64 with ``-1`` for a dropped (or unrouted) slot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from moesim.config.gates import GATES, SCENARIO_GATES
from moesim.errors import InputError

ROUTE_KINDS = SCENARIO_GATES  # the DeepSeek gates: route() re-routes their scores
SCORE_KINDS = ("softmax", "sigmoid")
SECOND_POLICIES = ("all", "sampling", "random")

# Guards the renormalisation of the K weights against an all-zero row (HF, DeepSeek).
_NORM_EPS = 1e-20
# Noise floor of the noisy top-k gate (tensor2tensor ``noise_epsilon``).
_NOISE_EPS = 1e-2


@dataclass(frozen=True)
class Routing:
    """One routing decision for T tokens.

    ``ids_tk`` int64 [T, K] (``-1`` = dropped slot), ``weights_tk`` float32 [T, K]
    (0 where dropped), ``scores_te`` float32 [T, E]: affinities after softmax or
    sigmoid, before any selection bias.
    """

    ids_tk: torch.Tensor
    weights_tk: torch.Tensor
    scores_te: torch.Tensor


def score(logits_te: torch.Tensor, kind: str) -> torch.Tensor:
    """Affinities ``scores_te`` [T, E] float32 from router logits [T, E].

    ``kind`` is ``"softmax"`` (over the E experts) or ``"sigmoid"`` (elementwise).
    Computed in fp32 whatever the input dtype: every reference gate does so, and a
    half-precision softmax creates ties that flip the selection.
    """
    logits_te = logits_te.float()
    if kind == "softmax":
        return torch.softmax(logits_te, dim=-1)
    if kind == "sigmoid":
        return torch.sigmoid(logits_te)
    raise InputError(f"unknown score function {kind!r}", field="kind", allowed="softmax, sigmoid")


def group_top_r(group_rule: str) -> int:
    """Members summed into a group's score: ``"max"`` -> 1, ``"top<r>sum"`` -> r."""
    if group_rule == "max":
        return 1
    match = re.fullmatch(r"top([1-9][0-9]*)sum", group_rule)
    if match is None:
        raise InputError(
            f"unknown group rule {group_rule!r}",
            field="group_rule",
            allowed="max (DeepSeek-V2), top2sum (DeepSeek-V3), top<r>sum",
        )
    return int(match.group(1))


def check_selection(
    *,
    num_experts: int,
    top_k: int,
    group_size: int | None = None,
    max_groups: int | None = None,
    group_rule: str = "max",
) -> None:
    """Raise InputError unless top-K (within ``max_groups`` groups) is well defined.

    The group limit applies when ``max_groups`` is given; it then needs ``group_size``
    dividing ``num_experts`` and at least ``top_k`` experts on the allowed groups.
    Libraries silently pick masked experts otherwise (docs/routing.md section 8.1).
    """
    if num_experts < 1:
        raise InputError(f"num_experts={num_experts}", field="num_experts", allowed=">= 1")
    if not 1 <= top_k <= num_experts:
        raise InputError(
            f"top_k={top_k} with {num_experts} experts",
            field="top_k",
            allowed=f"1..{num_experts}",
        )
    if group_size is not None and (group_size < 1 or num_experts % group_size):
        raise InputError(
            f"group_size={group_size} does not divide {num_experts} experts into equal groups",
            field="group_size",
            allowed=f"a divisor of {num_experts}",
        )
    if max_groups is None:
        return
    if group_size is None:
        raise InputError(
            "max_groups needs group_size (experts per group)",
            field="group_size",
            allowed=f"a divisor of {num_experts}",
        )
    n_groups = num_experts // group_size
    if not 1 <= max_groups <= n_groups:
        raise InputError(
            f"max_groups={max_groups} with {n_groups} groups",
            field="max_groups",
            allowed=f"1..{n_groups}",
        )
    if max_groups * group_size < top_k:
        least = -(-top_k // group_size)
        raise InputError(
            f"top_k={top_k} exceeds the {max_groups * group_size} experts on "
            f"max_groups={max_groups} groups of {group_size}",
            field="max_groups",
            allowed=f"{least}..{n_groups} (max_groups * group_size >= top_k)",
        )
    top_r = group_top_r(group_rule)
    if top_r > group_size:
        raise InputError(
            f"group rule {group_rule!r} sums {top_r} scores but groups hold {group_size}",
            field="group_size",
            allowed=f">= {top_r}",
        )


def _sorted_topk(values_tn: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`ordered_topk` by a full stable sort of every row (the reference)."""
    return torch.sort(values_tn, dim=-1, descending=True, stable=True).indices[:, :k]


def ordered_topk(values_tn: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [T, k] of the k largest entries per row, by (value desc, index asc).

    ``topk`` of ``k + 1`` finds the set wherever the k-th and the next value differ
    (then every entry equal to a chosen one is chosen too); those k are put in order
    by a small stable sort, index ascending first. The rows where the boundary ties, or
    that hold NaN, take the full stable sort, whose order is the tie rule.
    """
    n = values_tn.shape[-1]
    if k == 0 or k >= n or values_tn.shape[0] == 0:
        return _sorted_topk(values_tn, k)
    top_v, top_i = values_tn.topk(k + 1, dim=-1)
    by_index = top_i[:, :k].sort(dim=-1).indices
    chosen_i = top_i[:, :k].gather(1, by_index)
    chosen_v = top_v[:, :k].gather(1, by_index)
    ids_tk = chosen_i.gather(1, chosen_v.sort(dim=-1, descending=True, stable=True).indices)
    unsure_t = (top_v[:, k - 1] == top_v[:, k]) | torch.isnan(top_v).any(dim=-1)
    if unsure_t.any():
        ids_tk[unsure_t] = _sorted_topk(values_tn[unsure_t], k)
    return ids_tk


def group_scores(select_te: torch.Tensor, *, group_size: int, group_rule: str) -> torch.Tensor:
    """Group scores ``[T, G]``: sum of the top-r members of each contiguous block.

    ``group_rule`` ``"max"`` (r=1, DeepSeek-V2 device-limited) or ``"top2sum"``
    (DeepSeek-V3); sums of the largest values do not depend on tie order.
    """
    n_tokens, n_experts = select_te.shape
    blocks_tgs = select_te.reshape(n_tokens, n_experts // group_size, group_size)
    top_r = group_top_r(group_rule)
    return blocks_tgs.topk(top_r, dim=-1).values.sum(dim=-1)


def topk_select(
    select_te: torch.Tensor,
    *,
    top_k: int,
    group_size: int | None = None,
    max_groups: int | None = None,
    group_rule: str = "max",
    fill: float = float("-inf"),
) -> torch.Tensor:
    """Expert ids ``ids_tk`` int64 [T, K] chosen from selection scores [T, E].

    Plain top-K, or group-limited: groups are contiguous blocks of ``group_size``
    experts scored by ``group_rule``; the ``max_groups`` best groups stay, the other
    experts get ``fill`` (``-inf``; ``0.0`` replays HF ``deepseek_v2`` / HF<=4.57
    ``deepseek_v3``), then top-K over all E. Ties: value desc, index asc, for groups
    too. A row holding NaN is not routed (all ``-1``, docs/routing.md section 8.8).
    """
    n_tokens, n_experts = select_te.shape
    check_selection(
        num_experts=n_experts,
        top_k=top_k,
        group_size=group_size,
        max_groups=max_groups,
        group_rule=group_rule,
    )
    select_te = select_te.detach().to(torch.promote_types(select_te.dtype, torch.float32))
    if max_groups is not None:
        assert group_size is not None
        groups_tg = group_scores(select_te, group_size=group_size, group_rule=group_rule)
        kept_groups_tm = ordered_topk(groups_tg, max_groups)
        allowed_tg = torch.zeros_like(groups_tg, dtype=torch.bool)
        allowed_tg.scatter_(1, kept_groups_tm, True)
        allowed_te = allowed_tg.repeat_interleave(group_size, dim=1)
        select_te = select_te.masked_fill(~allowed_te, fill)
    ids_tk = ordered_topk(select_te, top_k)
    unrouted_t = torch.isnan(select_te).any(dim=-1)
    return ids_tk.masked_fill(unrouted_t[:, None], -1)


def gate_weights(
    scores_te: torch.Tensor, ids_tk: torch.Tensor, *, normalize: bool, scale: float
) -> torch.Tensor:
    """Gate weights ``weights_tk`` float32 [T, K] of the chosen experts.

    The score of each chosen expert, optionally renormalised over the token's kept
    slots (``+1e-20`` as HF/DeepSeek), times ``scale``; ``-1`` slots weigh 0.
    Differentiable in ``scores_te``.
    """
    kept_tk = ids_tk >= 0
    picked_tk = scores_te.float().gather(1, ids_tk.clamp(min=0))
    picked_tk = picked_tk.masked_fill(~kept_tk, 0.0)
    if normalize:
        picked_tk = picked_tk / (picked_tk.sum(dim=-1, keepdim=True) + _NORM_EPS)
    return picked_tk * scale


def route(
    scores_te: torch.Tensor,
    *,
    kind: str,
    top_k: int,
    group_size: int | None = None,
    max_groups: int | None = None,
    bias_e: torch.Tensor | None = None,
    normalize: bool | None = None,
    scale: float = 1.0,
) -> Routing:
    """Route T tokens on their scores [T, E] with a DeepSeek gate.

    - ``"softmax-topk"`` (V1): top-K of the scores; weights = scores. Given
      ``max_groups`` it applies the device limit below (M is optional here).
    - ``"device-limited"`` (V2): keep the ``max_groups`` (M) device blocks of
      ``group_size`` experts with the largest max score, top-K inside them.
    - ``"group-limited-sigmoid"`` (V3): select on ``scores + bias_e`` with top-2-sum
      groups (optional), weights from the unbiased scores.

    ``normalize=None`` takes the kind's default (V3 renormalises, V1/V2 do not); the
    weights are then multiplied by ``scale``. No dropping here (see capacity.py).
    """
    if kind not in ROUTE_KINDS:
        raise InputError(
            f"unknown gate kind {kind!r}", field="kind", allowed=", ".join(ROUTE_KINDS)
        )
    scores_te = scores_te.float()
    select_te = scores_te
    if bias_e is not None:
        if kind != "group-limited-sigmoid":
            raise InputError(
                f"a selection bias needs sigmoid scores, not gate {kind!r}",
                field="bias_e",
                allowed="None unless kind is group-limited-sigmoid",
            )
        select_te = scores_te + bias_e.float()
    if kind == "device-limited" and (group_size is None or max_groups is None):
        raise InputError(
            "device-limited routing needs experts per device and M",
            field="max_groups" if group_size is not None else "group_size",
            allowed="group_size and max_groups both set",
        )
    ids_tk = topk_select(
        select_te,
        top_k=top_k,
        group_size=group_size,
        max_groups=max_groups,
        group_rule=GATES[kind].group_rule,
    )
    if normalize is None:
        normalize = kind == "group-limited-sigmoid"
    weights_tk = gate_weights(scores_te, ids_tk, normalize=normalize, scale=scale)
    return Routing(ids_tk=ids_tk, weights_tk=weights_tk, scores_te=scores_te)


def expert_load(ids_tk: torch.Tensor, *, num_experts: int) -> torch.Tensor:
    """Assignments per expert ``load_e`` int64 [E]; ``-1`` slots count nowhere."""
    kept_a = ids_tk.reshape(-1)
    kept_a = kept_a[kept_a >= 0]
    load_e = torch.bincount(kept_a, minlength=num_experts)
    assert load_e.numel() == num_experts, "expert id out of range"
    return load_e


def apply_drops(selected: Routing, kept_ids_tk: torch.Tensor, *, renormalize: bool) -> Routing:
    """``selected`` with the slots that ``kept_ids_tk`` marks ``-1`` dropped.

    Dropped slots weigh 0. Survivors keep their weights (DeepSeek-V2, Megatron,
    Switch) unless ``renormalize`` rescales each token's kept weights to their
    former sum (GShard / DeepSpeed top-2 after dropping).
    """
    assert kept_ids_tk.shape == selected.ids_tk.shape
    assert bool(((kept_ids_tk == selected.ids_tk) | (kept_ids_tk < 0)).all())
    weights_tk = selected.weights_tk.masked_fill(kept_ids_tk < 0, 0.0)
    if renormalize:
        total_t1 = selected.weights_tk.sum(dim=-1, keepdim=True)
        weights_tk = weights_tk * total_t1 / (weights_tk.sum(dim=-1, keepdim=True) + _NORM_EPS)
    return Routing(ids_tk=kept_ids_tk, weights_tk=weights_tk, scores_te=selected.scores_te)


def gshard_select(
    logits_te: torch.Tensor,
    *,
    second_policy: str = "all",
    generator: torch.Generator | None = None,
) -> Routing:
    """GShard top-2 choice before capacity: ids [T, 2], weights normalised to sum 1.

    First expert = argmax of the softmax; second = argmax of the others, on the
    probabilities (``"all"``), on Gumbel-perturbed logits (``"sampling"``), or as
    ``"all"`` but kept only if ``2 * w2 > U(0, 1)`` with ``w2 = g2 / (g1 + g2)``
    (``"random"``; a skipped second slot is ``-1``).
    """
    if second_policy not in SECOND_POLICIES:
        raise InputError(
            f"unknown second-expert policy {second_policy!r}",
            field="second_policy",
            allowed=", ".join(SECOND_POLICIES),
        )
    logits_te = logits_te.float()
    scores_te = score(logits_te, "softmax")
    n_tokens, n_experts = scores_te.shape
    check_selection(num_experts=n_experts, top_k=2)
    first_t1 = ordered_topk(scores_te, 1)
    second_choice_te = scores_te
    if second_policy == "sampling":
        uniform_te = torch.rand(logits_te.shape, generator=generator, device=logits_te.device)
        uniform_te = uniform_te.clamp(min=torch.finfo(torch.float32).tiny)
        second_choice_te = logits_te - torch.log(-torch.log(uniform_te))
    second_choice_te = second_choice_te.detach().scatter(1, first_t1, float("-inf"))
    ids_tk = torch.cat([first_t1, ordered_topk(second_choice_te, 1)], dim=1)
    unrouted_t = torch.isnan(scores_te).any(dim=-1)
    ids_tk = ids_tk.masked_fill(unrouted_t[:, None], -1)
    weights_tk = gate_weights(scores_te, ids_tk, normalize=True, scale=1.0)
    if second_policy == "random":
        uniform_t = torch.rand(n_tokens, generator=generator, device=logits_te.device)
        skip_t = 2.0 * weights_tk[:, 1].detach() <= uniform_t
        ids_tk = ids_tk.clone()
        ids_tk[:, 1] = ids_tk[:, 1].masked_fill(skip_t, -1)
        weights_tk = gate_weights(scores_te, ids_tk, normalize=True, scale=1.0)
    return Routing(ids_tk=ids_tk, weights_tk=weights_tk, scores_te=scores_te)


def noisy_topk(
    x_th: torch.Tensor,
    w_gate_he: torch.Tensor,
    w_noise_he: torch.Tensor,
    *,
    top_k: int,
    train: bool,
    generator: torch.Generator | None = None,
) -> tuple[Routing, torch.Tensor, torch.Tensor]:
    """Noisily gated top-k (Shazeer et al. 2017): ``(routing, importance_e, load_e)``.

    ``H = x W_g + eps * (softplus(x W_noise) + 1e-2)``, eps ~ N(0, 1) in training
    only; keep the top-k of H, ``G`` = softmax over the kept entries. ``scores_te`` is
    the softmax of H over all E, so re-routing it with softmax top-K and renormalised
    weights reproduces ``G``. ``importance_e = sum_t G``. ``load_e`` is the smooth
    load ``sum_t Phi((clean - theta) / sigma)`` when trained with noise and
    ``top_k < E`` (theta: the k-th largest noisy value among the other experts),
    else the hard count of tokens per expert.
    """
    x_th = x_th.float()
    clean_te = x_th @ w_gate_he.float()
    n_tokens, n_experts = clean_te.shape
    check_selection(num_experts=n_experts, top_k=top_k)
    noisy_te = clean_te
    sigma_te = None
    if train:
        sigma_te = torch.nn.functional.softplus(x_th @ w_noise_he.float()) + _NOISE_EPS
        eps_te = torch.randn(clean_te.shape, generator=generator, device=clean_te.device)
        noisy_te = clean_te + eps_te * sigma_te
    scores_te = score(noisy_te, "softmax")
    ids_tk = topk_select(noisy_te, top_k=top_k)
    weights_tk = gate_weights(scores_te, ids_tk, normalize=True, scale=1.0)
    routing = Routing(ids_tk=ids_tk, weights_tk=weights_tk, scores_te=scores_te)
    token_tk = torch.arange(n_tokens, device=ids_tk.device)[:, None].expand_as(ids_tk)
    gates_te = torch.zeros_like(scores_te).index_put(
        (token_tk, ids_tk.clamp(min=0)), weights_tk, accumulate=True
    )
    importance_e = gates_te.sum(dim=0)
    if sigma_te is None or top_k >= n_experts:
        return routing, importance_e, expert_load(ids_tk, num_experts=n_experts).float()
    # Threshold for expert i: the k-th largest noisy value among the *other* experts,
    # i.e. the (k+1)-th overall if i is currently selected, else the k-th.
    kth_tk1 = noisy_te.gather(1, ordered_topk(noisy_te.detach(), top_k + 1))
    selected_te = torch.zeros_like(noisy_te, dtype=torch.bool).scatter(1, ids_tk.clamp(min=0), True)
    theta_te = torch.where(
        selected_te, kth_tk1[:, top_k : top_k + 1], kth_tk1[:, top_k - 1 : top_k]
    )
    load_e = torch.special.ndtr((clean_te - theta_te) / sigma_te).sum(dim=0)
    return routing, importance_e, load_e
