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

import numpy as np
import torch

from moesim.config.gates import GATES, SCENARIO_GATES
from moesim.cores import cores
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
    return picked_weights(picked_tk, kept_tk, normalize=normalize, scale=scale)


def picked_weights(
    picked_tk: torch.Tensor,
    kept_tk: torch.Tensor,
    *,
    normalize: bool,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`gate_weights` from the scores ``picked_tk`` [T, K] at the chosen ids;
    ``out`` (float32 [T, K]): computed there, by the same operations in place."""
    if out is None:
        picked_tk = picked_tk.masked_fill(~kept_tk, 0.0)
        if normalize:
            picked_tk = picked_tk / (picked_tk.sum(dim=-1, keepdim=True) + _NORM_EPS)
        return picked_tk * scale
    out.copy_(picked_tk).masked_fill_(~kept_tk, 0.0)
    if normalize:
        out.div_(out.sum(dim=-1, keepdim=True) + _NORM_EPS)
    return out.mul_(scale)


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
    _check_route(kind, has_bias=bias_e is not None, group_size=group_size,
                 max_groups=max_groups)
    scores_te = scores_te.float()
    select_te = scores_te
    if bias_e is not None:
        select_te = scores_te + bias_e.float()
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


def _check_route(kind: str, *, has_bias: bool, group_size: int | None,
                 max_groups: int | None) -> None:
    """InputError unless :func:`route` can route with this gate, bias and limit."""
    if kind not in ROUTE_KINDS:
        raise InputError(
            f"unknown gate kind {kind!r}", field="kind", allowed=", ".join(ROUTE_KINDS)
        )
    if has_bias and kind != "group-limited-sigmoid":
        raise InputError(
            f"a selection bias needs sigmoid scores, not gate {kind!r}",
            field="bias_e",
            allowed="None unless kind is group-limited-sigmoid",
        )
    if kind == "device-limited" and (group_size is None or max_groups is None):
        raise InputError(
            "device-limited routing needs experts per device and M",
            field="max_groups" if group_size is not None else "group_size",
            allowed="group_size and max_groups both set",
        )


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


# ------------------------------------------------------------ many tokens at once

ROWS_PER_CHUNK = 4096  # a chunk's sort keys (4 MiB at E = 256) stay in the caches
_SIGN16, _MAG16, _INF16 = 0x8000, 0x7FFF, 0x7C00


@dataclass(frozen=True)
class RoutedRows:
    """:func:`route_rows` of T tokens, as numpy arrays.

    ``ids_tk`` int64 and ``weights_tk`` float32 [T, K] are :func:`route`'s, bit for
    bit; ``picked_tk`` float32 [T, K] the (unbiased) scores of the chosen experts (0
    where dropped); ``top_tk`` float32 [T, K] each token's K largest scores, largest
    first, restricted by neither groups nor bias.
    """

    ids_tk: np.ndarray
    weights_tk: np.ndarray
    picked_tk: np.ndarray
    top_tk: np.ndarray


def route_rows(
    scores_te,
    *,
    kind: str,
    top_k: int,
    group_size: int | None = None,
    max_groups: int | None = None,
    bias_e=None,
    normalize: bool | None = None,
    scale: float = 1.0,
    rows=None,
    threads: int | None = None,
    out: RoutedRows | None = None,
) -> RoutedRows:
    """:func:`route` of a numpy array of scores ``scores_te`` [T, E] (or of its rows
    ``rows``), chunk by chunk: the same ids and weights in bounded memory and time.

    Half-precision scores (a trace's) selected without a bias, or with an all-zero
    one, take a sort instead of :func:`ordered_topk`: each score's bits and its expert
    index pack into one integer key whose order is (value desc, index asc), the tie
    rule of :func:`ordered_topk`, and one numpy sort of a token's keys (group by group
    under a group limit, with the group in the key's top bits) orders everything the
    gate needs. Other inputs, and chunks holding an infinite or NaN score, go through
    :func:`route` itself. ``threads`` (default: the cores) route chunks side by side;
    ``out`` (arrays of at least T rows) is written into instead of new arrays.
    """
    _check_route(kind, has_bias=bias_e is not None, group_size=group_size,
                 max_groups=max_groups)
    n_rows = scores_te.shape[0] if rows is None else len(rows)
    n_experts = scores_te.shape[1]
    group_rule = GATES[kind].group_rule
    check_selection(num_experts=n_experts, top_k=top_k, group_size=group_size,
                    max_groups=max_groups, group_rule=group_rule)
    if normalize is None:
        normalize = kind == "group-limited-sigmoid"
    bias = None if bias_e is None else np.array(bias_e, dtype=np.float32)  # a copy: writable
    if bias is not None and not bias.any():
        bias = None  # x + 0.0 selects as x does
    bits = 16 if scores_te.dtype == np.float16 and bias is None else 32
    plan = _SortPlan.of(n_experts, top_k, group_size, max_groups, group_rule, bits=bits)
    bias_t = None if bias is None else torch.from_numpy(bias)

    if out is None:
        out = RoutedRows(*(np.empty((n_rows, top_k), dtype=dtype)
                           for dtype in (np.int64, np.float32, np.float32, np.float32)))
    ids_tk, weights_tk, picked_tk, top_tk = (
        array[:n_rows] for array in (out.ids_tk, out.weights_tk, out.picked_tk, out.top_tk))

    def run(start: int) -> None:
        part = slice(start, min(start + ROWS_PER_CHUNK, n_rows))
        chunk = scores_te[part] if rows is None else scores_te[rows[part]]
        done = None if plan is None else plan.select(chunk, bias)
        if done is None:  # the reference, on this chunk
            scores = torch.from_numpy(np.asarray(chunk, dtype=np.float32))
            ids = topk_select(scores if bias_t is None else scores + bias_t, top_k=top_k,
                              group_size=group_size, max_groups=max_groups,
                              group_rule=group_rule).numpy()
            done = ids, None, scores.topk(top_k, dim=-1).values.numpy()
        ids, picked, top_tk[part] = done
        ids_tk[part] = ids
        if picked is None:  # the scores at the ids (0 for a dropped slot)
            picked = np.take_along_axis(chunk, np.maximum(ids, 0), axis=1)
            picked = np.where(ids >= 0, picked, 0)
        picked_tk[part] = picked

    starts = range(0, n_rows, ROWS_PER_CHUNK)
    workers = min(threads or cores(), len(starts)) if plan is not None else 1
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, starts))
    else:
        for start in starts:
            run(start)
    picked_weights(torch.from_numpy(picked_tk), torch.from_numpy(ids_tk >= 0),
                   normalize=normalize, scale=scale, out=torch.from_numpy(weights_tk))
    return RoutedRows(ids_tk=ids_tk, weights_tk=weights_tk, picked_tk=picked_tk,
                      top_tk=top_tk)


@dataclass(frozen=True)
class _SortPlan:
    """How :func:`route_rows` selects by sorting: ``groups`` blocks of ``group_size``
    experts (one block without a group limit), ``max_groups`` kept.

    A selection value becomes an order-preserving code ``o`` of ``bits`` bits (never 0):
    a half-precision score's 16 bits, or 32 for float32 values (scores plus a bias).
    The key of expert ``j`` of group ``g`` is ``b << (bits + gb + jb) | o << (gb + jb) |
    b << jb | (gs-1-j)`` with ``b = G-1-g``. One ascending sort of a token's keys puts
    group ``G-1-b`` in block ``b``, ordered by (value, index desc): a block's last keys
    are its group's best experts. Without the top ``b``, a key orders by (value desc,
    index asc) over all groups: the tie rule of :func:`ordered_topk`."""

    experts: int
    top_k: int
    groups: int
    group_size: int
    max_groups: int
    top_r: int  # members of a group's score (0: no group limit)
    bits: int  # of a value's code: 16 (uint32 keys) or 32 (uint64 keys)

    @classmethod
    def of(cls, experts, top_k, group_size, max_groups, group_rule, *, bits: int):
        """The plan, or None where the keys would not fit their integers."""
        limited = max_groups is not None and max_groups < experts // group_size
        groups = experts // group_size if limited else 1
        plan = cls(experts=experts, top_k=top_k, groups=groups,
                   group_size=experts // groups, max_groups=max_groups if limited else 1,
                   top_r=group_top_r(group_rule) if limited else 0, bits=bits)
        return plan if bits + 2 * plan.gb + plan.jb <= 2 * bits else None

    @property
    def jb(self) -> int:  # bits of an index within a group
        return (self.group_size - 1).bit_length()

    @property
    def gb(self) -> int:  # bits of a group
        return (self.groups - 1).bit_length()

    @property
    def key(self):
        return np.uint32 if self.bits == 16 else np.uint64

    def select(self, chunk, bias=None):
        """(ids_tk int64, picked_tk, top_tk float32) of a chunk [C, E] of scores
        selected on ``chunk + bias``, or None when a value is infinite or NaN."""
        n, gs, jb, gb, k = chunk.shape[0], self.group_size, self.jb, self.gb, self.top_k
        key = self.key
        low = gb + jb  # bits below a key's value
        g_e, j_e = np.divmod(np.arange(self.experts, dtype=key), key(gs))
        b_e = key(self.groups - 1) - g_e
        index_e = (b_e << key(self.bits + low)) | (b_e << key(jb)) | (key(gs - 1) - j_e)
        scores = None  # float32 scores, where the chosen ones are read from them
        if self.bits == 16:
            u = np.ascontiguousarray(chunk).view(np.uint16)
            if u.max(initial=0) < _INF16:  # x >= 0 and finite: the code is u | 0x8000,
                codes = u  # its top bit set in the keys below
                index_e = index_e | key(_SIGN16 << low)
            else:
                codes = _half_codes(u)
        else:
            scores = _single(chunk)
            codes = None if scores is None else _single_codes(
                scores if bias is None else scores + bias)
        if codes is None:
            return None
        keys = np.left_shift(codes, low, dtype=key)
        keys |= index_e
        keys.sort(axis=1)
        blocks = keys.reshape(n, self.groups, gs)
        kp = min(k, gs)  # a group's candidates: its best kp
        cand = blocks[:, :, gs - kp:] & key((1 << (self.bits + low)) - 1)
        cand = cand.reshape(n, -1)
        if self.top_r:
            kept_b = self._kept_blocks(blocks[:, :, gs - self.top_r:])
            if kept_b is None:  # a group's score overflowed
                return None
            cand_all = cand.copy() if bias is None else None
            cand *= np.repeat(kept_b, kp, axis=1)  # the other groups' keys become 0
            cand.sort(axis=1)
        else:
            cand.sort(axis=1)
            cand_all = cand
        chosen = cand[:, : -k - 1 : -1]
        block = (chosen >> key(jb)) & key((1 << gb) - 1)
        ids = (self.groups - 1 - block.astype(np.int64)) * gs + (
            gs - 1 - (chosen & key((1 << jb) - 1)).astype(np.int64))
        # The chosen experts' own scores (a code has no sign for zero); the unbiased
        # scores' top-K: the candidates' best, or their own under a bias.
        source = np.ascontiguousarray(chunk if scores is None else scores)
        picked = source.reshape(-1)[ids + np.arange(0, source.size, self.experts)[:, None]]
        if bias is not None:
            return ids, picked, _top_values(chunk if scores is None else scores, k)
        if cand_all is not cand:
            cand_all.sort(axis=1)
        return ids, picked, self._decode(cand_all[:, : -k - 1 : -1] >> key(low))

    def _decode(self, codes):
        """float32 values of codes (bits above a code's are ignored)."""
        if self.bits == 16:
            return _half_values(codes.astype(np.uint16))
        return _single_values(codes.astype(np.uint32))

    def _kept_blocks(self, tail):
        """[C, G] the blocks of the ``max_groups`` groups with the best scores (sum of
        their top-r members, in float32 as :func:`group_scores`), ties to the lower
        group; None if a sum is infinite."""
        values = self._decode(tail >> self.key(self.gb + self.jb))  # ascending
        if self.top_r == 1:
            score_g = values[..., 0]
        elif self.top_r == 2:
            score_g = values[..., 1] + values[..., 0]
        else:  # torch's sum of the top-r values, largest first
            score_g = torch.from_numpy(np.ascontiguousarray(values[..., ::-1])).sum(-1).numpy()
        codes = _single_codes(score_g)
        if codes is None:
            return None
        # Block b holds group G-1-b: a larger b breaks a tie towards the lower group.
        key = (codes.astype(np.uint64) << np.uint64(self.gb)) | np.arange(
            self.groups, dtype=np.uint64)
        bar = np.sort(key, axis=1)[:, self.groups - self.max_groups]
        return key >= bar[:, None]


# Order-preserving codes of floats: the bits with the sign bit set for x >= 0, all bits
# flipped for x < 0; -0.0 counts as +0.0, as float comparisons have it.


def _half_codes(u):
    """uint16 codes of float16 bits ``u``, or None if one is infinite or NaN."""
    if u.max(initial=0) < _INF16:  # x >= 0 and finite: the common case
        return u | np.uint16(_SIGN16)
    mag = u & _MAG16
    if mag.max(initial=0) >= _INF16:
        return None
    return np.where(u >= _SIGN16, _SIGN16 - mag, _SIGN16 + mag).astype(np.uint16)


def _half_values(codes):
    """float32 values of :func:`_half_codes` codes."""
    bits = np.where(codes < _SIGN16, (_SIGN16 - codes) | _SIGN16, codes - _SIGN16)
    return bits.astype(np.uint16).view(np.float16).astype(np.float32)


def _single_codes(x):
    """uint32 codes of float32 values ``x``, or None if one is infinite or NaN."""
    bits = x.view(np.uint32)
    low, high = x.min(initial=0), x.max(initial=0)
    if low >= 0 and high < np.inf:  # -0.0 and +0.0 both become 1 << 31
        return bits | np.uint32(1 << 31)
    if not np.isfinite(x).all():
        return None
    bits = (x + np.float32(0)).view(np.uint32)  # -0.0 -> +0.0
    flip = (bits.view(np.int32) >> 31).view(np.uint32)  # all ones where x < 0
    return bits ^ (flip | np.uint32(1 << 31))


def _single_values(codes):
    """float32 values of :func:`_single_codes` codes."""
    flip = ((codes ^ np.uint32(1 << 31)).view(np.int32) >> 31).view(np.uint32)
    return (codes ^ (flip | np.uint32(1 << 31))).view(np.float32)


def _single(chunk):
    """``chunk`` as float32; float16 converted exactly on its bits (numpy's own
    conversion is several times slower); None if a float16 is infinite or NaN."""
    if chunk.dtype != np.float16:
        return np.asarray(chunk, dtype=np.float32)
    u = np.ascontiguousarray(chunk).view(np.uint16)
    nonneg = u.max(initial=0) < _INF16  # x >= 0 and finite: the common case
    mag = u if nonneg else u & _MAG16
    if not nonneg and mag.max(initial=0) >= _INF16:
        return None
    bits = np.left_shift(mag, 13, dtype=np.uint32)
    bits += np.uint32((127 - 15) << 23)  # exponent from float16's bias to float32's
    if not nonneg:
        bits |= np.left_shift(u & _SIGN16, 16, dtype=np.uint32)
    out = bits.view(np.float32)
    small = mag < 0x0400  # zeros and subnormals: mantissa * 2**-24
    if small.any():
        out[small] = np.copysign(mag[small].astype(np.float32) * np.float32(2.0**-24),
                                 np.where(u[small] >= _SIGN16, -1.0, 1.0).astype(np.float32))
    return out


def _top_values(scores, top_k: int):
    """[C, K] each row's K largest scores, largest first (on 16-bit codes for float16)."""
    if scores.dtype == np.float16:
        codes, values = _half_codes(np.ascontiguousarray(scores).view(np.uint16)), _half_values
    else:
        codes, values = _single_codes(scores), _single_values
    top = np.partition(codes, codes.shape[1] - top_k, axis=1)[:, -top_k:]
    return values(np.sort(top, axis=1)[:, ::-1])
