"""Stories about the torch routing functions: gates, capacity, balance losses, bias.

Expected ids and weights below are worked out by hand from docs/routing.md and the
papers' formulas (DeepSeekMoE arXiv 2401.06066, DeepSeek-V2 2405.04434, V3 2412.19437);
the gates are also checked against transformers' own routers (DeepSeek-V2/V3,
Mixtral, Switch, NLLB-MoE) on random inputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    DeepseekV2Config,
    DeepseekV3Config,
    MixtralConfig,
    NllbMoeConfig,
    SwitchTransformersConfig,
)
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.mixtral.modeling_mixtral import (
    load_balancing_loss_func as mixtral_balance_loss,
)
from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeTop2Router
from transformers.models.switch_transformers.modeling_switch_transformers import (
    SwitchTransformersTop1Router,
    router_z_loss_func,
)
from transformers.models.switch_transformers.modeling_switch_transformers import (
    load_balancing_loss_func as switch_balance_loss,
)

from moesim.errors import InputError
from moesim.traces import losses
from moesim.traces.bias import update_bias
from moesim.traces.capacity import (
    drop_by_device_capacity,
    drop_by_expert_capacity,
    expert_capacity,
    positions_in_sequence,
    protected_sequences,
)
from moesim.traces.gates import (
    gate_weights,
    gshard_select,
    noisy_topk,
    route,
    score,
    topk_select,
)
from moesim.traces.layers import GateConfig, MoEGate

HEADS = dict(num_attention_heads=4, num_key_value_heads=4)


def t(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def ids(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


def as_sets(ids_tk: torch.Tensor) -> list[set[int]]:
    return [set(row) - {-1} for row in ids_tk.tolist()]


def by_expert(ids_tk: torch.Tensor, weights_tk: torch.Tensor) -> torch.Tensor:
    """Weights ordered by expert id per token, so slot order does not matter."""
    order_tk = ids_tk.argsort(dim=-1)
    return weights_tk.float().gather(1, order_tk)


# --- scores and plain top-K ---------------------------------------------------------


def test_score_functions_run_in_fp32():
    logits = t([[0.0, math.log(3.0)]])
    assert torch.allclose(score(logits, "softmax"), t([[0.25, 0.75]]))
    assert torch.allclose(score(logits, "sigmoid"), t([[0.5, 0.75]]))
    assert score(logits.half(), "softmax").dtype == torch.float32
    with pytest.raises(InputError) as err:
        score(logits, "relu")
    assert err.value.field == "kind"


def test_ties_go_to_the_lower_expert_index():
    select = t([[0.5, 0.5, 0.7, 0.5]])
    assert topk_select(select, top_k=2).tolist() == [[2, 0]]
    assert topk_select(select, top_k=3).tolist() == [[2, 0, 1]]
    assert topk_select(torch.zeros(2, 6), top_k=3).tolist() == [[0, 1, 2]] * 2


def test_v1_softmax_topk_weights_are_the_scores():
    # DeepSeekMoE eq. (2): g = s for the top-K experts, 0 otherwise.
    scores = t([[0.1, 0.4, 0.2, 0.3]])
    plain = route(scores, kind="softmax-topk", top_k=2)
    assert plain.ids_tk.tolist() == [[1, 3]]
    assert torch.allclose(plain.weights_tk, t([[0.4, 0.3]]))
    renormed = route(scores, kind="softmax-topk", top_k=2, normalize=True, scale=2.0)
    assert torch.allclose(renormed.weights_tk, t([[8 / 7, 6 / 7]]))


def test_v2_device_limited_picks_the_top_m_devices_first():
    # 3 devices of 2 experts. Row 0: device maxima .30/.25/.10; row 1: .05/.30/.25.
    scores = t([[0.30, 0.05, 0.25, 0.20, 0.10, 0.10], [0.05, 0.05, 0.20, 0.30, 0.25, 0.15]])
    one = route(scores, kind="device-limited", top_k=2, group_size=2, max_groups=1)
    assert one.ids_tk.tolist() == [[0, 1], [3, 2]]
    assert torch.allclose(one.weights_tk, t([[0.30, 0.05], [0.30, 0.20]]))
    v1_limited = route(scores, kind="softmax-topk", top_k=2, group_size=2, max_groups=1)
    assert torch.equal(v1_limited.ids_tk, one.ids_tk)
    two = route(scores, kind="device-limited", top_k=2, group_size=2, max_groups=2)
    assert two.ids_tk.tolist() == [[0, 2], [3, 4]]
    scaled = route(scores, kind="device-limited", top_k=2, group_size=2, max_groups=3, scale=16.0)
    assert scaled.ids_tk.tolist() == [[0, 2], [3, 4]]
    assert torch.allclose(scaled.weights_tk, 16 * t([[0.30, 0.25], [0.30, 0.25]]))


def test_v3_bias_steers_selection_but_not_weights():
    s = t([[0.75, 0.25, 0.5, 0.5, 0.875, 0.625, 0.125, 0.25]])
    b = t([0, 0, 0, 0, -0.5, 0, 0.5, 0.5])
    # s + b = .75 .25 | .5 .5 | .375 .625 | .625 .75 -> top-2 sums 1, 1, 1, 1.375:
    # keep group 3 and, of the three tied groups, group 0; then 0 and 7 tie at .75.
    biased = route(s, kind="group-limited-sigmoid", top_k=2, group_size=2, max_groups=2,
                   bias_e=b, scale=2.5)
    assert biased.ids_tk.tolist() == [[0, 7]]
    assert torch.allclose(biased.weights_tk, t([[0.75, 0.25]]) * 2.5)  # unbiased s, renormed
    assert torch.equal(biased.scores_te, s)
    # Without bias: groups 2 (1.5) and 0 (1.0, tie with group 1) -> experts 4 and 0.
    plain = route(s, kind="group-limited-sigmoid", top_k=2, group_size=2, max_groups=2,
                  scale=2.5)
    assert plain.ids_tk.tolist() == [[4, 0]]
    assert torch.allclose(plain.weights_tk, t([[0.875, 0.75]]) / 1.625 * 2.5)


def test_group_rule_max_versus_top2sum():
    select = t([[0.9, 0.0, 0.5, 0.5]])
    assert topk_select(select, top_k=1, group_size=2, max_groups=1, group_rule="max").tolist() \
        == [[0]]
    assert topk_select(select, top_k=1, group_size=2, max_groups=1,
                       group_rule="top2sum").tolist() == [[2]]


def test_fill_zero_replays_libraries_that_pick_masked_experts():
    # docs/routing.md 8.1: with a 0.0 fill a negative biased score loses to a masked expert.
    select = t([[-0.5, -0.25, 0.5, -0.75]])
    assert topk_select(select, top_k=2, group_size=2, max_groups=1).tolist() == [[2, 3]]
    assert topk_select(select, top_k=2, group_size=2, max_groups=1, fill=0.0).tolist() \
        == [[2, 0]]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(top_k=5, group_size=2, max_groups=2), "max_groups"),  # 2 groups * 2 < 5
        (dict(top_k=9), "top_k"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=2, group_size=3, max_groups=1), "group_size"),
        (dict(top_k=2, group_size=2, max_groups=5), "max_groups"),
        (dict(top_k=1, group_size=1, max_groups=2, group_rule="top2sum"), "group_size"),
        (dict(top_k=1, max_groups=2), "group_size"),
        (dict(top_k=1, group_size=2, max_groups=2, group_rule="mean"), "group_rule"),
    ],
)
def test_infeasible_selection_names_the_field(kwargs, field):
    with pytest.raises(InputError) as err:
        topk_select(torch.rand(3, 8), **kwargs)
    assert err.value.field == field


def test_route_rejects_mismatched_options():
    scores = torch.rand(2, 8)
    with pytest.raises(InputError) as err:
        route(scores, kind="device-limited", top_k=2, group_size=2)
    assert err.value.field == "max_groups"
    with pytest.raises(InputError) as err:
        route(scores, kind="softmax-topk", top_k=2, bias_e=torch.zeros(8))
    assert err.value.field == "bias_e"
    with pytest.raises(InputError) as err:
        route(scores, kind="top-p", top_k=2)
    assert err.value.field == "kind"


def test_empty_batch_routes_to_nothing():
    routing = route(torch.empty(0, 8), kind="group-limited-sigmoid", top_k=2, group_size=2,
                    max_groups=2, bias_e=torch.zeros(8))
    assert routing.ids_tk.shape == (0, 2) and routing.weights_tk.shape == (0, 2)
    empty = torch.empty(0, 4)
    assert gate_on_logits("switch-top1", empty, top_k=1,
                          capacity_factor=1.0).ids_tk.shape == (0, 1)
    assert gate_on_logits("gshard-top2", empty, top_k=2,
                          capacity_factor=1.0).ids_tk.shape == (0, 2)


def test_nan_rows_are_not_routed():
    scores = t([[0.1, float("nan"), 0.3], [0.1, 0.2, 0.3]])
    routing = route(scores, kind="softmax-topk", top_k=2)
    assert routing.ids_tk.tolist() == [[-1, -1], [2, 1]]
    assert routing.weights_tk[0].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_select_as_fp32(dtype):
    # Close logits: a softmax in half precision would round them into ties.
    logits = torch.linspace(0.0, 0.05, 64).repeat(3, 1).to(dtype)
    logits[1] = logits[1].flip(0)
    reference = score(logits.float(), "softmax")
    scores = score(logits, "softmax")
    assert torch.equal(scores, reference)
    assert torch.equal(topk_select(scores, top_k=4), topk_select(reference, top_k=4))
    assert topk_select(scores, top_k=2)[0].tolist() == [63, 62]


def test_gate_weights_skip_dropped_slots():
    scores = t([[0.5, 0.3, 0.2]])
    weights = gate_weights(scores, ids([[0, -1, 2]]), normalize=True, scale=1.0)
    assert torch.allclose(weights, t([[0.5 / 0.7, 0.0, 0.2 / 0.7]]))


# --- group limit: a brute-force reference with many ties ----------------------------


def reference_topk(values: list[float], top_k: int, group_size: int, max_groups: int,
                   rule: str) -> list[int]:
    """docs/routing.md 1.2 + section 0, one token, written the slow obvious way."""
    n_groups = len(values) // group_size
    r = 1 if rule == "max" else 2
    group_score = [sum(sorted(values[g * group_size:(g + 1) * group_size], reverse=True)[:r])
                   for g in range(n_groups)]
    groups = sorted(range(n_groups), key=lambda g: (-group_score[g], g))[:max_groups]
    allowed = [e for e in range(len(values)) if e // group_size in groups]
    return sorted(allowed, key=lambda e: (-values[e], e))[:top_k]


@st.composite
def grouped_cases(draw):
    group_size = draw(st.integers(1, 4))
    n_groups = draw(st.integers(1, 4))
    n_experts = group_size * n_groups
    rule = draw(st.sampled_from(["max", "top2sum"] if group_size >= 2 else ["max"]))
    max_groups = draw(st.integers(1, n_groups))
    top_k = draw(st.integers(1, max_groups * group_size))
    n_tokens = draw(st.integers(0, 5))
    # Quarter steps make ties between experts and between groups common.
    values = draw(st.lists(st.lists(st.integers(0, 4), min_size=n_experts, max_size=n_experts),
                           min_size=n_tokens, max_size=n_tokens))
    values = [[v / 4 for v in row] for row in values]
    return values, n_experts, top_k, group_size, max_groups, rule


@settings(max_examples=150, deadline=None)
@given(grouped_cases())
def test_group_limited_topk_matches_the_reference_and_respects_m(case):
    values, n_experts, top_k, group_size, max_groups, rule = case
    select = torch.tensor(values, dtype=torch.float32).reshape(len(values), n_experts)
    chosen = topk_select(select, top_k=top_k, group_size=group_size, max_groups=max_groups,
                         group_rule=rule)
    assert chosen.shape == (len(values), top_k)
    for row, token_values in zip(chosen.tolist(), values, strict=True):
        assert row == reference_topk(token_values, top_k, group_size, max_groups, rule)
        assert len(set(row)) == top_k
        assert len({e // group_size for e in row}) <= max_groups


# --- against transformers' routers ----------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_v3_matches_transformers_deepseek_v3_router(seed):
    torch.manual_seed(seed)
    config = DeepseekV3Config(hidden_size=32, n_routed_experts=32, num_experts_per_tok=6,
                              n_group=8, topk_group=3, routed_scaling_factor=2.5,
                              norm_topk_prob=True, **HEADS)
    hf = DeepseekV3TopkRouter(config)
    with torch.no_grad():
        hf.weight.normal_()
        hf.e_score_correction_bias.uniform_(-0.5, 0.5)
    x = torch.randn(200, 32)
    logits, hf_weights, hf_ids = hf(x)
    ours = route(score(F.linear(x, hf.weight), "sigmoid"), kind="group-limited-sigmoid",
                 top_k=6, group_size=4, max_groups=3, bias_e=hf.e_score_correction_bias,
                 normalize=True, scale=2.5)
    assert as_sets(ours.ids_tk) == as_sets(hf_ids)
    assert torch.allclose(by_expert(ours.ids_tk, ours.weights_tk),
                          by_expert(hf_ids, hf_weights), atol=1e-5)
    # The bias matters on these inputs: without it the choice differs for some tokens.
    unbiased = route(score(logits, "sigmoid"), kind="group-limited-sigmoid", top_k=6,
                     group_size=4, max_groups=3)
    assert as_sets(unbiased.ids_tk) != as_sets(hf_ids)


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_v2_matches_transformers_deepseek_v2_router(method):
    torch.manual_seed(3)
    config = DeepseekV2Config(hidden_size=32, n_routed_experts=24, num_experts_per_tok=4,
                              n_group=6, topk_group=2, topk_method=method,
                              routed_scaling_factor=16.0, **HEADS)
    hf = DeepseekV2TopkRouter(config)
    with torch.no_grad():
        hf.weight.normal_()
    x = torch.randn(200, 32)
    logits, hf_weights, hf_ids = hf(x)
    scores = score(logits, "softmax")
    if method == "greedy":
        ours = route(scores, kind="softmax-topk", top_k=4, scale=16.0)
    else:
        ours = route(scores, kind="device-limited", top_k=4, group_size=4, max_groups=2,
                     scale=16.0)
        plain = route(scores, kind="softmax-topk", top_k=4)
        assert as_sets(plain.ids_tk) != as_sets(hf_ids)  # the device limit bites
    assert as_sets(ours.ids_tk) == as_sets(hf_ids)
    assert torch.allclose(by_expert(ours.ids_tk, ours.weights_tk),
                          by_expert(hf_ids, hf_weights), atol=1e-5)


def test_v1_renormalised_matches_transformers_mixtral_router():
    torch.manual_seed(4)
    config = MixtralConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=2, **HEADS)
    hf = MixtralTopKRouter(config)
    with torch.no_grad():
        hf.weight.normal_()
    x = torch.randn(200, 32)
    logits, hf_weights, hf_ids = hf(x)
    ours = route(score(logits, "softmax"), kind="softmax-topk", top_k=2, normalize=True)
    assert ours.ids_tk.tolist() == hf_ids.tolist()
    assert torch.allclose(ours.weights_tk, hf_weights, atol=1e-6)
    # Mixtral's aux loss is K times the expert-level sum f P.
    hf_loss = mixtral_balance_loss((logits,), num_experts=8, top_k=2)
    ours_loss = losses.expert_balance_loss(ours.scores_te, ours.ids_tk)
    assert torch.allclose(hf_loss, 2 * ours_loss, atol=1e-6)


# --- Switch, GShard, noisy top-k ------------------------------------------------------


def gate_on_logits(kind: str, logits_te: torch.Tensor, *, top_k: int, **config):
    """The routing of the ``kind`` gate of the torch layers whose router logits are
    ``logits_te`` (an identity router weight over E inputs)."""
    n_experts = logits_te.shape[1]
    gate = MoEGate(n_experts, GateConfig(kind=kind, num_experts=n_experts, top_k=top_k,
                                         **config))
    with torch.no_grad():
        gate.weight.copy_(torch.eye(n_experts))
    return gate(logits_te).routing


def test_switch_top1_capacity_by_position_or_probability():
    """3 tokens on 2 experts with capacity factor 0.5: ceil(3 / 2 x 0.5) = 1 each."""
    logits = t([[2.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    p = torch.softmax(logits, dim=-1)
    first_come = gate_on_logits("switch-top1", logits, top_k=1, capacity_factor=0.5,
                                drop_policy="position")
    assert first_come.ids_tk.tolist() == [[0], [-1], [1]]
    assert torch.allclose(first_come.weights_tk, t([[p[0, 0]], [0.0], [p[2, 1]]]))
    confident = gate_on_logits("switch-top1", logits, top_k=1, capacity_factor=0.5,
                               drop_policy="probs")
    assert confident.ids_tk.tolist() == [[-1], [0], [1]]
    assert gate_on_logits("switch-top1", logits, top_k=1).ids_tk.tolist() == [[0], [0], [1]]


def test_switch_top1_matches_transformers_switch_router():
    torch.manual_seed(5)
    config = SwitchTransformersConfig(d_model=16, num_experts=4, expert_capacity=5,
                                      router_jitter_noise=0.0)
    hf = SwitchTransformersTop1Router(config).eval()
    x = torch.randn(1, 24, 16)
    hf_onehot, hf_probs, hf_logits = hf(x)
    # Capacity 5 of 24 tokens on 4 experts: ceil(24 / 4 x 0.8333) = 5, first come first.
    ours = gate_on_logits("switch-top1", hf_logits[0].detach(), top_k=1,
                          capacity_factor=0.8333, drop_policy="position")
    hf_ids = torch.where(hf_onehot[0].sum(-1) > 0, hf_onehot[0].argmax(-1), -1)
    assert ours.ids_tk[:, 0].tolist() == hf_ids.tolist()
    assert (hf_ids == -1).any()  # the capacity bites
    kept = hf_ids >= 0
    assert torch.allclose(ours.weights_tk[kept, 0], hf_probs[0, kept, 0])
    # Aux and z losses as transformers computes them.
    assert torch.allclose(losses.switch_aux_loss(ours.scores_te, hf_logits[0].argmax(-1)),
                          switch_balance_loss(torch.softmax(hf_logits, -1), hf_logits.argmax(-1)))
    assert torch.allclose(losses.z_loss(hf_logits[0]), router_z_loss_func(hf_logits))


def test_gshard_top2_fills_first_choices_before_second_choices():
    logits = t([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0], [2.0, 0.0, 1.0]])
    e = math.e
    # Capacity ceil(3 x 2 / 3 x 1.0) = 2 per expert, filled in token order.
    routing = gate_on_logits("gshard-top2", logits, top_k=2, capacity_factor=1.0,
                             drop_policy="position")
    # Expert 0 takes the first choices of tokens 0 and 1; token 2 keeps only expert 2.
    assert routing.ids_tk.tolist() == [[0, 1], [0, 1], [-1, 2]]
    # Weights are renormalised over the kept experts after dropping (DeepSpeed, NLLB).
    expected = t([[e / (e + 1), 1 / (e + 1)], [e / (e + 1), 1 / (e + 1)], [0.0, 1.0]])
    assert torch.allclose(routing.weights_tk, expected)


def test_gshard_top2_matches_transformers_nllb_router():
    torch.manual_seed(6)
    config = NllbMoeConfig(d_model=16, num_experts=4, expert_capacity=6,
                           normalize_router_prob_before_dropping=False)
    hf = NllbMoeTop2Router(config).train()
    logits = torch.randn(20, 4)
    _, hf_dense = hf.route_tokens(logits.clone())
    # Capacity ceil(20 x 2 / 4 x 0.6) = 6 per expert, filled in token order.
    ours = gate_on_logits("gshard-top2", logits, top_k=2, capacity_factor=0.6,
                          drop_policy="position")
    dense = torch.zeros(20, 4).scatter_add(1, ours.ids_tk.clamp(min=0), ours.weights_tk)
    assert (ours.ids_tk == -1).any()  # the capacity bites
    assert torch.allclose(dense, hf_dense, atol=1e-6)


def test_gshard_random_second_expert_policy():
    generator = torch.Generator().manual_seed(0)
    even = gshard_select(torch.zeros(50, 4), second_policy="random", generator=generator)
    assert (even.ids_tk[:, 1] >= 0).all()  # 2 * 0.5 > U always
    peaked = gshard_select(t([[30.0, 0.0, 0.0, 0.0]] * 50), second_policy="random",
                           generator=generator)
    assert (peaked.ids_tk[:, 1] == -1).all()
    assert torch.allclose(peaked.weights_tk[:, 0], torch.ones(50))
    sampled = gshard_select(torch.randn(50, 4), second_policy="sampling", generator=generator)
    assert (sampled.ids_tk[:, 0] != sampled.ids_tk[:, 1]).all()


def test_noisy_topk_without_noise_is_softmax_over_the_kept_logits():
    x = t([[1.0, 0.0]])
    w_gate = t([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    routing, importance, load = noisy_topk(x, w_gate, torch.zeros(2, 3), top_k=2, train=False)
    e = math.e
    assert routing.ids_tk.tolist() == [[2, 1]]
    assert torch.allclose(routing.weights_tk, t([[e / (e + 1), 1 / (e + 1)]]))
    assert torch.allclose(importance, t([0.0, 1 / (e + 1), e / (e + 1)]))
    assert load.tolist() == [0.0, 1.0, 1.0]


def test_noisy_topk_smooth_load_follows_the_formula():
    torch.manual_seed(7)
    x = torch.randn(6, 4)
    w_gate = torch.randn(4, 5, requires_grad=True)
    w_noise = torch.randn(4, 5, requires_grad=True)
    routing, importance, load = noisy_topk(x, w_gate, w_noise, top_k=2, train=True,
                                           generator=torch.Generator().manual_seed(1))
    clean = x @ w_gate
    sigma = F.softplus(x @ w_noise) + 1e-2
    noisy = clean + torch.randn(6, 5, generator=torch.Generator().manual_seed(1)) * sigma
    normal = torch.distributions.Normal(0.0, 1.0)
    expected = torch.zeros(5)
    for token in range(6):
        for expert in range(5):
            others = torch.cat([noisy[token, :expert], noisy[token, expert + 1:]])
            theta = others.sort(descending=True).values[1]  # k-th largest of the others
            expected[expert] += normal.cdf((clean[token, expert] - theta) / sigma[token, expert])
    assert torch.allclose(load, expected, atol=1e-5)
    assert as_sets(routing.ids_tk) == as_sets(noisy.topk(2).indices)
    assert torch.allclose(importance.sum(), torch.tensor(6.0))
    (losses.importance_loss(importance) + losses.load_loss(load)).backward()
    assert w_noise.grad.abs().sum() > 0 and w_gate.grad.abs().sum() > 0


# --- capacity and dropping -------------------------------------------------------------


def test_device_capacity_drops_the_lowest_affinity_on_the_overloaded_device():
    # 2 devices of 2 experts; 6 assignments -> budget ceil(6 / 2) = 3 per device.
    routed = ids([[0, 1], [0, 2], [1, 3]])
    priority = t([[0.9, 0.1], [0.8, 0.7], [0.6, 0.5]])
    kept = drop_by_device_capacity(routed, priority, experts_per_device=2, n_devices=2)
    assert kept.tolist() == [[0, -1], [0, 2], [1, 3]]
    # Token 0 protected: both its device-0 assignments stay, one slot is left for the rest.
    protected = torch.tensor([True, False, False])
    kept = drop_by_device_capacity(routed, priority, experts_per_device=2, n_devices=2,
                                   protected_t=protected)
    assert kept.tolist() == [[0, 1], [0, 2], [-1, 3]]
    roomy = drop_by_device_capacity(routed, priority, experts_per_device=2, n_devices=2,
                                    capacity_factor=2.0)
    assert torch.equal(roomy, routed)
    tied = drop_by_device_capacity(routed, torch.zeros(3, 2), experts_per_device=2, n_devices=2)
    assert tied.tolist() == [[0, 1], [0, 2], [-1, 3]]  # equal priority: later token drops


def test_protected_tokens_overflow_rather_than_drop():
    routed = ids([[0], [0], [0], [1]])
    everyone = torch.ones(4, dtype=torch.bool)
    kept = drop_by_device_capacity(routed, torch.rand(4, 1), experts_per_device=1,
                                   n_devices=2, protected_t=everyone)
    assert torch.equal(kept, routed)


def test_expert_capacity_by_probability_or_position():
    routed = ids([[0], [0], [0], [1]])
    priority = t([[0.2], [0.9], [0.5], [0.1]])
    assert drop_by_expert_capacity(routed, priority, capacity=2).tolist() \
        == [[-1], [0], [0], [1]]
    assert drop_by_expert_capacity(routed, priority, capacity=2, policy="position").tolist() \
        == [[0], [0], [-1], [1]]
    assert expert_capacity(10, top_k=2, num_experts=4, capacity_factor=1.0) == 5
    assert expert_capacity(10, top_k=2, num_experts=8, capacity_factor=1.0) == 3


def test_slot_major_capacity_serves_first_choices_first():
    routed = ids([[0, 1], [1, 0], [1, 2]])
    zero = torch.zeros(3, 2)
    gshard = drop_by_expert_capacity(routed, zero, capacity=1, policy="position",
                                     slot_major=True)
    assert gshard.tolist() == [[0, -1], [1, -1], [-1, 2]]
    token_order = drop_by_expert_capacity(routed, zero, capacity=1, policy="position")
    assert token_order.tolist() == [[0, 1], [-1, -1], [-1, 2]]


@st.composite
def capacity_cases(draw):
    n_devices = draw(st.integers(1, 4))
    per_device = draw(st.integers(1, 3))
    n_experts = n_devices * per_device
    top_k = draw(st.integers(1, n_experts))
    n_tokens = draw(st.integers(0, 12))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    routed = torch.stack([torch.randperm(n_experts, generator=generator)[:top_k]
                          for _ in range(n_tokens)]) if n_tokens else torch.empty(0, top_k).long()
    holes = torch.rand(routed.shape, generator=generator) < 0.1
    routed = routed.masked_fill(holes, -1)
    priority = torch.rand(routed.shape, generator=generator).round(decimals=1)
    protected = torch.rand(n_tokens, generator=generator) < draw(st.sampled_from([0.0, 0.3]))
    cf = draw(st.sampled_from([0.25, 0.5, 1.0, 1.5]))
    capacity = draw(st.integers(0, 4))
    return routed, priority, protected, per_device, n_devices, cf, capacity


def check_conserved(routed, kept, protected):
    valid, survived = routed >= 0, kept >= 0
    dropped = valid & ~survived
    assert int(valid.sum()) == int(survived.sum()) + int(dropped.sum())
    assert torch.equal(kept[survived], routed[survived])  # kept slots are unchanged
    assert not (protected[:, None] & dropped).any()


@settings(max_examples=120, deadline=None)
@given(capacity_cases())
def test_capacity_never_exceeded_and_tokens_conserved(case):
    routed, priority, protected, per_device, n_devices, cf, capacity = case
    kept = drop_by_expert_capacity(routed, priority, capacity=capacity, protected_t=protected)
    check_conserved(routed, kept, protected)
    for expert in range(per_device * n_devices):
        prot = int((protected[:, None] & (routed == expert)).sum())
        load = int((routed == expert).sum())
        assert int((kept == expert).sum()) == prot + min(load - prot, max(0, capacity - prot))
    kept = drop_by_device_capacity(routed, priority, experts_per_device=per_device,
                                   n_devices=n_devices, capacity_factor=cf, protected_t=protected)
    check_conserved(routed, kept, protected)
    budget = math.ceil(cf * int((routed >= 0).sum()) / n_devices)
    device_of = lambda a: torch.where(a >= 0, a // per_device, -1)  # noqa: E731
    for device in range(n_devices):
        on_d = device_of(routed) == device
        prot = int((protected[:, None] & on_d).sum())
        load = int(on_d.sum())
        expect = prot + min(load - prot, max(0, budget - prot))
        assert int((device_of(kept) == device).sum()) == expect


def test_protected_sequences_are_whole_and_seeded():
    seq = torch.arange(400).repeat_interleave(3)
    protected = protected_sequences(seq, fraction=0.1, generator=torch.Generator().manual_seed(0))
    per_seq = protected.reshape(400, 3)
    assert (per_seq.all(dim=1) | ~per_seq.any(dim=1)).all()  # whole sequences
    assert 20 <= int(per_seq[:, 0].sum()) <= 60
    again = protected_sequences(seq, fraction=0.1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(protected, again)
    assert not protected_sequences(seq, fraction=0.0, generator=None).any()
    assert protected_sequences(seq, fraction=1.0, generator=None).all()
    with pytest.raises(InputError):
        protected_sequences(seq, fraction=1.5, generator=None)


def test_positions_count_within_each_sequence():
    assert positions_in_sequence(ids([0, 0, 1, 0, 1])).tolist() == [0, 1, 0, 2, 1]
    assert positions_in_sequence(ids([])).tolist() == []


# --- balance losses ----------------------------------------------------------------------

# E=4 experts on D=2 devices, K=2, T=4: every expert gets K*T/E = 2 tokens and every
# token reaches both devices (M=2), with uniform scores: the known minimum, 1.
UNIFORM_IDS = ids([[0, 2], [1, 3], [0, 2], [1, 3]])
UNIFORM_SCORES = torch.full((4, 4), 0.25)


def test_balance_losses_are_one_for_uniform_routing():
    assert losses.expert_balance_loss(UNIFORM_SCORES, UNIFORM_IDS).item() == pytest.approx(1.0)
    assert losses.device_balance_loss(UNIFORM_SCORES, UNIFORM_IDS, experts_per_device=2).item() \
        == pytest.approx(1.0)
    assert losses.comm_balance_loss(UNIFORM_SCORES, UNIFORM_IDS, experts_per_device=2,
                                    max_devices=2).item() == pytest.approx(1.0)
    assert losses.sequence_balance_loss(torch.eye(4) + 1, None, top_k=1).item() \
        == pytest.approx(1.0)
    assert losses.switch_aux_loss(UNIFORM_SCORES, UNIFORM_IDS[:, 0]).item() == pytest.approx(1.0)
    assert losses.cv_squared(torch.full((4,), 3.0)).item() == 0.0


def test_balance_losses_grow_when_routing_collapses():
    # Every token on experts 0 and 1 (device 0) with all its affinity there.
    collapsed = ids([[0, 1], [0, 1]])
    scores = t([[0.5, 0.5, 0.0, 0.0]] * 2)
    # f = 4/(2*2) * [2, 2, 0, 0] = [2, 2, 0, 0], P = [.5, .5, 0, 0] -> 2.
    assert losses.expert_balance_loss(scores, collapsed).item() == pytest.approx(2.0)
    # f' = [2, 0], P' = [1, 0] -> 2.
    assert losses.device_balance_loss(scores, collapsed, experts_per_device=2).item() \
        == pytest.approx(2.0)
    # Each token counts once on device 0: f'' = 2/(1*2) * 2 = 2, P'' = [1, 0] -> 2 (not 4).
    assert losses.comm_balance_loss(scores, collapsed, experts_per_device=2,
                                    max_devices=1).item() == pytest.approx(2.0)
    assert losses.cv_squared(t([4.0, 0.0, 0.0, 0.0])).item() == pytest.approx(3.0)


def test_balance_losses_follow_the_seed_formulas():
    # The three balance terms of docs/routing.md section 2.4 (DeepSeek-V2 sec. 2.2.3)
    # written as plain loops, on a random routing.
    torch.manual_seed(8)
    n_tokens, n_experts, top_k, per_device, m = 7, 6, 2, 2, 2
    scores = torch.softmax(torch.randn(n_tokens, n_experts), dim=-1)
    routed = torch.stack([torch.randperm(n_experts)[:top_k] for _ in range(n_tokens)])
    n_devices = n_experts // per_device
    f = [n_experts / (top_k * n_tokens) * sum(int(i in row) for row in routed.tolist())
         for i in range(n_experts)]
    p = [float(scores[:, i].mean()) for i in range(n_experts)]
    devices = [range(d * per_device, (d + 1) * per_device) for d in range(n_devices)]
    expert = sum(fi * pi for fi, pi in zip(f, p, strict=True))
    device = sum(sum(f[j] for j in ds) / len(ds) * sum(p[j] for j in ds) for ds in devices)
    comm = sum(n_devices / (m * n_tokens)
               * sum(any(e in ds for e in row) for row in routed.tolist())
               * sum(p[j] for j in ds) for ds in devices)
    assert losses.expert_balance_loss(scores, routed).item() == pytest.approx(expert, rel=1e-5)
    assert losses.device_balance_loss(scores, routed, experts_per_device=2).item() \
        == pytest.approx(device, rel=1e-5)
    assert losses.comm_balance_loss(scores, routed, experts_per_device=2,
                                    max_devices=m).item() == pytest.approx(comm, rel=1e-5)


def test_sequence_loss_averages_sequences_with_plain_topk():
    # Sequence 0 collapses on expert 0 (sum f P = 2); sequence 1 is balanced (1).
    seq_a = t([[0.8, 0.2, 0.2, 0.2]] * 2)   # s' = [.571, .143, .143, .143]
    seq_b = torch.eye(4) * 0.25 + 0.25        # s' row: .4 on its own expert, .2 elsewhere
    scores = torch.cat([seq_a, seq_b])
    seq = ids([0, 0, 1, 1, 1, 1])
    share = 0.8 / 1.4
    expected = ((4 / 2 * 2) * share + 1.0) / 2
    assert losses.sequence_balance_loss(scores, seq, top_k=1).item() \
        == pytest.approx(expected, rel=1e-6)


def test_losses_of_an_empty_batch_are_zero_and_differentiable():
    scores = torch.empty(0, 4, requires_grad=True)
    routed = torch.empty(0, 2, dtype=torch.long)
    total = (losses.expert_balance_loss(scores, routed)
             + losses.device_balance_loss(scores, routed, experts_per_device=2)
             + losses.comm_balance_loss(scores, routed, experts_per_device=2, max_devices=1)
             + losses.sequence_balance_loss(scores, None, top_k=2)
             + losses.z_loss(scores))
    assert total.item() == 0.0
    total.backward()
    assert scores.grad.shape == (0, 4)


def test_balance_gradient_pushes_away_from_the_busy_expert():
    logits = torch.zeros(4, 4, requires_grad=True)
    routed = ids([[0, 1]] * 4)
    losses.expert_balance_loss(torch.softmax(logits, -1), routed).backward()
    assert (logits.grad[:, :2] > 0).all() and (logits.grad[:, 2:] < 0).all()


# --- auxiliary-loss-free bias --------------------------------------------------------------


def test_bias_moves_against_the_load():
    bias = torch.zeros(4)
    new = update_bias(bias, ids([3, 1, 2, 2]), rate=0.001)  # mean 2
    assert new.tolist() == pytest.approx([-0.001, 0.001, 0.0, 0.0])
    assert new.dtype == torch.float32
    balanced = update_bias(t([0.5, -0.5, 0.0]), ids([5, 5, 5]), rate=0.1)
    assert balanced.tolist() == [0.5, -0.5, 0.0]
    # Mean 7/3 is not representable; the integer comparison still finds no tie.
    assert update_bias(torch.zeros(3), ids([2, 2, 3]), rate=1.0).tolist() == [1.0, 1.0, -1.0]
    with pytest.raises(InputError) as err:
        update_bias(bias, ids([1, 1, 1, 1]), rate=-1.0)
    assert err.value.field == "bias_rate"


# --- ordered_topk: topk with the tie rule of a full stable sort ----------------------


@given(rows=st.integers(1, 30), width=st.integers(1, 40), data=st.data(),
       kind=st.sampled_from(["continuous", "few values", "half precision", "nan and inf"]))
@settings(max_examples=300, deadline=None)
def test_ordered_topk_equals_the_full_stable_sort(rows, width, data, kind):
    from moesim.traces.gates import _sorted_topk, ordered_topk

    k = data.draw(st.integers(0, width))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    values = torch.randn(rows, width, generator=generator)
    if kind == "few values":
        values = torch.randint(0, 3, (rows, width), generator=generator).float()
    elif kind == "half precision":
        values = values.half().float().round(decimals=1)
    elif kind == "nan and inf":
        mask = torch.rand(rows, width, generator=generator)
        values[mask < 0.1] = float("nan")
        values[(mask >= 0.1) & (mask < 0.2)] = float("-inf")
    assert torch.equal(ordered_topk(values, k), _sorted_topk(values, k))


# --- route_rows: many tokens at once, the same ids and weights as route() -------------


@st.composite
def rows_cases(draw):
    """Scores of every flavour a trace can hold, with a gate, a limit and a bias."""
    group_size = draw(st.sampled_from([1, 2, 3, 4, 8]))
    n_groups = draw(st.integers(1, 8))
    n_experts = group_size * n_groups
    kind = draw(st.sampled_from(["softmax-topk", "device-limited", "group-limited-sigmoid"]))
    limited = kind == "device-limited" or draw(st.booleans())
    if kind == "group-limited-sigmoid" and group_size < 2:
        limited = False  # top2sum needs two experts in a group
    max_groups = draw(st.integers(1, n_groups)) if limited else None
    top_k = draw(st.integers(1, (max_groups or n_groups) * group_size))
    n_tokens = draw(st.integers(0, 40))
    flavour = draw(st.sampled_from(["uniform", "few values", "signed", "zeros", "inf", "nan"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    values = rng.random((n_tokens, n_experts), dtype=np.float32)
    if flavour == "few values":
        values = rng.integers(0, 3, values.shape) / 4
    elif flavour == "signed":
        values = rng.standard_normal(values.shape) * 10.0 ** rng.integers(-8, 3, (n_tokens, 1))
        values[:, ::3] = -0.0
    elif flavour == "zeros":
        values = np.where(rng.random(values.shape) < 0.5, 0.0, -0.0)
    elif flavour in ("inf", "nan") and n_tokens:
        values[rng.integers(n_tokens), rng.integers(n_experts)] = (
            np.inf if flavour == "inf" else np.nan)
    dtype = draw(st.sampled_from([np.float16, np.float16, np.float32]))
    bias = None
    if kind == "group-limited-sigmoid":
        bias = draw(st.sampled_from([None, "zero", "random"]))
        bias = {None: None, "zero": np.zeros(n_experts, dtype=np.float32),
                "random": rng.normal(size=n_experts).astype(np.float32)}[bias]
    return values.astype(dtype), dict(kind=kind, top_k=top_k, group_size=group_size,
                                       max_groups=max_groups, bias_e=bias)


@settings(max_examples=300, deadline=None)
@given(case=rows_cases(), chunk=st.sampled_from([1, 3, 4096]), threads=st.sampled_from([1, 2]))
def test_route_rows_gives_route_s_ids_and_weights_bit_for_bit(case, chunk, threads):
    """The sort on packed half-precision keys (and the chunks, threads and fallbacks
    around it) reproduces route() exactly, ties, signed zeros and infinities included;
    it also hands out the chosen scores and each token's unrestricted top-K."""
    from moesim.traces import gates

    scores, kwargs = case
    bias = kwargs.pop("bias_e")
    reference = route(torch.from_numpy(scores.astype(np.float32)), **kwargs,
                      bias_e=None if bias is None else torch.from_numpy(bias))
    saved = gates.ROWS_PER_CHUNK
    gates.ROWS_PER_CHUNK = chunk
    try:
        rows = gates.route_rows(scores, **kwargs, bias_e=bias, threads=threads)
    finally:
        gates.ROWS_PER_CHUNK = saved
    assert np.array_equal(rows.ids_tk, reference.ids_tk.numpy())
    assert np.array_equal(rows.weights_tk.view(np.uint32),
                          reference.weights_tk.numpy().view(np.uint32))
    finite = np.isfinite(scores.astype(np.float32)).all(axis=1)
    picked = np.take_along_axis(scores.astype(np.float32), np.maximum(rows.ids_tk, 0), 1)
    assert np.array_equal(rows.picked_tk[finite], picked[finite])
    top = -np.sort(-scores.astype(np.float32), axis=1)[:, :kwargs["top_k"]]
    assert np.array_equal(rows.top_tk[finite], top[finite])


def test_route_rows_takes_rows_and_writes_into_given_arrays():
    rng = np.random.default_rng(3)
    scores = rng.random((5000, 64), dtype=np.float32).astype(np.float16)
    rows = rng.permutation(5000)[:1234]
    gate = dict(kind="group-limited-sigmoid", top_k=6, group_size=8, max_groups=3)
    whole = route(torch.from_numpy(scores[rows].astype(np.float32)), **gate)
    from moesim.traces.gates import RoutedRows, route_rows

    out = RoutedRows(*(np.full((2000, 6), -7, dtype=dtype)
                       for dtype in (np.int64, np.float32, np.float32, np.float32)))
    got = route_rows(scores, **gate, rows=rows, out=out)
    assert np.shares_memory(got.ids_tk, out.ids_tk) and got.ids_tk.shape == (1234, 6)
    assert np.array_equal(got.ids_tk, whole.ids_tk.numpy())
    assert np.array_equal(got.weights_tk, whole.weights_tk.numpy())
    assert (out.ids_tk[1234:] == -7).all()


def test_route_rows_refuses_what_route_refuses():
    scores = np.zeros((3, 8), dtype=np.float16)
    from moesim.traces.gates import route_rows

    for kwargs, field in [(dict(kind="top-p", top_k=2), "kind"),
                          (dict(kind="device-limited", top_k=2, group_size=2), "max_groups"),
                          (dict(kind="softmax-topk", top_k=2, bias_e=np.zeros(8)), "bias_e"),
                          (dict(kind="softmax-topk", top_k=9), "top_k")]:
        with pytest.raises(InputError) as err:
            route_rows(scores, **kwargs)
        assert err.value.field == field
