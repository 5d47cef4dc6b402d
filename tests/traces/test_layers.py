"""Stories about the torch MoE modules: GateConfig, MoEGate and the DeepSeekMoE layer.

The gate and the layer are checked against transformers' DeepSeek-V3 router and MoE
block with the same weights; the rest checks the wiring: dropping, protected
sequences, losses, bias update, gradients, shapes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3MoE,
    DeepseekV3TopkRouter,
)

from moesim.errors import InputError
from moesim.traces import losses
from moesim.traces.layers import GateConfig, MoEGate, MoELayer

V3 = dict(kind="group-limited-sigmoid", num_experts=16, top_k=4, group_size=4, max_groups=2,
          scale=2.5, normalize=True)
V2 = dict(kind="device-limited", num_experts=16, top_k=4, group_size=4, max_groups=2)


def hf_v3_config() -> DeepseekV3Config:
    config = DeepseekV3Config(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4,
                              n_group=4, topk_group=2, routed_scaling_factor=2.5,
                              norm_topk_prob=True, moe_intermediate_size=8, n_shared_experts=2,
                              num_attention_heads=4, num_key_value_heads=4)
    config._experts_implementation = "eager"  # the plain loop over experts, outside a model
    return config


def as_sets(ids_tk: torch.Tensor) -> list[set[int]]:
    return [set(row) - {-1} for row in ids_tk.tolist()]


# --- config validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (dict(kind="top-p"), "kind"),
        (dict(top_k=17), "top_k"),
        (dict(top_k=9), "max_groups"),  # 2 groups of 4 hold 8 experts < K
        (dict(group_size=5), "group_size"),
        (dict(max_groups=5), "max_groups"),
        (dict(scale=0.0), "scale"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(drop_policy="random"), "drop_policy"),
        (dict(never_drop_fraction=0.1), "never_drop_fraction"),  # without a capacity
        (dict(seq_loss=-1.0), "seq_loss"),
        (dict(max_groups=None, comm_loss=0.02), "max_groups"),
    ],
)
def test_infeasible_gate_config_names_the_field(changes, field):
    with pytest.raises(InputError) as err:
        GateConfig(**{**V3, **changes})
    assert err.value.field == field


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        (dict(kind="device-limited", num_experts=8, top_k=2, group_size=2), "max_groups"),
        (dict(kind="noisy-topk", num_experts=8, top_k=2, group_size=2, max_groups=2),
         "max_groups"),
        (dict(kind="switch-top1", num_experts=8, top_k=2), "top_k"),
        (dict(kind="gshard-top2", num_experts=8, top_k=2, scale=2.0), "scale"),
        (dict(kind="softmax-topk", num_experts=8, top_k=2, bias_rate=1e-3), "bias_rate"),
        (dict(kind="softmax-topk", num_experts=8, top_k=2, device_loss=0.05), "group_size"),
    ],
)
def test_gate_kinds_reject_options_they_cannot_use(settings, field):
    with pytest.raises(InputError) as err:
        GateConfig(**settings)
    assert err.value.field == field


def test_gate_config_is_frozen_and_keyword_only():
    config = GateConfig(**V3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.top_k = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        GateConfig("softmax-topk", 8, 2)  # type: ignore[misc]


# --- the gate against transformers ----------------------------------------------------


def test_v3_gate_matches_transformers_router():
    torch.manual_seed(0)
    hf = DeepseekV3TopkRouter(hf_v3_config())
    with torch.no_grad():
        hf.weight.normal_()
        hf.e_score_correction_bias.uniform_(-0.3, 0.3)
    gate = MoEGate(32, GateConfig(**V3))
    gate.load_state_dict({"weight": hf.weight, "bias": hf.e_score_correction_bias})
    x = torch.randn(300, 32)
    hf_logits, hf_weights, hf_ids = hf(x)
    out = gate(x)
    assert torch.allclose(out.logits_te, hf_logits, atol=1e-5)
    assert as_sets(out.routing.ids_tk) == as_sets(hf_ids)
    ours = out.routing.weights_tk.gather(1, out.routing.ids_tk.argsort(-1))
    theirs = hf_weights.gather(1, hf_ids.argsort(-1))
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not out.dropped_tk.any()
    assert out.aux_loss.item() == 0.0


def test_moe_layer_matches_transformers_deepseek_v3_block():
    torch.manual_seed(1)
    hf = DeepseekV3MoE(hf_v3_config())
    with torch.no_grad():
        for param in hf.parameters():
            param.normal_(std=0.3)
        hf.gate.e_score_correction_bias.uniform_(-0.3, 0.3)
    layer = MoELayer(32, 8, 2, GateConfig(**V3))
    state = {
        "gate.weight": hf.gate.weight,
        "gate.bias": hf.gate.e_score_correction_bias,
        "gate_up_proj": hf.experts.gate_up_proj,
        "down_proj": hf.experts.down_proj,
        **{f"shared_experts.{k}": v for k, v in hf.shared_experts.state_dict().items()},
    }
    layer.load_state_dict(state)
    x = torch.randn(2, 40, 32)
    y, _ = layer(x)
    with torch.no_grad():
        expected = hf(x)
    assert y.shape == x.shape
    assert torch.allclose(y, expected, atol=1e-4)


# --- dropping, protection, losses, bias --------------------------------------------------


def test_dropped_slots_are_accounted_for():
    torch.manual_seed(2)
    gate = MoEGate(16, GateConfig(**V2, capacity_factor=0.5))
    out = gate(torch.randn(64, 16))
    routing, dropped = out.routing, out.dropped_tk
    assert dropped.any()
    kept = routing.ids_tk >= 0
    assert int(kept.sum()) + int(dropped.sum()) == 64 * 4  # routed = kept + dropped
    assert (routing.ids_tk[dropped] == -1).all() and (routing.weights_tk[dropped] == 0).all()
    device_load = torch.bincount(routing.ids_tk[kept] // 4, minlength=4)
    assert (device_load <= 32).all()  # ceil(0.5 * 256 / 4) per device
    # A token's M devices still bound it after dropping.
    for row in routing.ids_tk.tolist():
        assert len({e // 4 for e in row if e >= 0}) <= 2


def test_protected_sequences_are_never_dropped_by_the_gate():
    torch.manual_seed(3)
    config = GateConfig(**V2, capacity_factor=0.25, never_drop_fraction=0.5, seed=7)
    gate = MoEGate(16, config)
    seq = torch.arange(16).repeat_interleave(8)
    out = gate(torch.randn(128, 16), seq)
    dropped_seq = out.dropped_tk.any(dim=1)
    protected = {s for s in range(16) if not dropped_seq[seq == s].any()}
    assert 0 < len(protected) < 16
    everyone = MoEGate(16, dataclasses.replace(config, never_drop_fraction=1.0))
    everyone.load_state_dict(gate.state_dict())
    assert not everyone(torch.randn(128, 16), seq).dropped_tk.any()


def test_position_policy_drops_the_latest_positions():
    torch.manual_seed(4)
    gate = MoEGate(8, GateConfig(kind="switch-top1", num_experts=2, top_k=1, capacity_factor=0.5,
                                 drop_policy="position"))
    with torch.no_grad():
        gate.weight.copy_(torch.tensor([[1.0] * 8, [-1.0] * 8]))
    x = torch.ones(6, 8)  # every token picks expert 0; capacity ceil(6 / 2 * 0.5) = 2
    seq = torch.tensor([0, 0, 0, 1, 1, 1])
    out = gate(x, seq)
    # Positions 0 of both sequences survive, later positions go first.
    assert out.routing.ids_tk[:, 0].tolist() == [0, -1, -1, 0, -1, -1]


def test_gate_aux_loss_is_the_weighted_sum_of_its_terms():
    torch.manual_seed(5)
    config = GateConfig(**V2, expert_loss=0.003, device_loss=0.05, comm_loss=0.02, z_loss=1e-3)
    gate = MoEGate(16, config)
    x = torch.randn(32, 16)
    out = gate(x)
    scores, routed = out.routing.scores_te, out.routing.ids_tk
    expected = (0.003 * losses.expert_balance_loss(scores, routed)
                + 0.05 * losses.device_balance_loss(scores, routed, experts_per_device=4)
                + 0.02 * losses.comm_balance_loss(scores, routed, experts_per_device=4,
                                                  max_devices=2)
                + 1e-3 * losses.z_loss(out.logits_te))
    assert torch.allclose(out.aux_loss, expected)


def test_v3_sequence_loss_uses_row_sequences_by_default():
    torch.manual_seed(6)
    layer = MoELayer(16, 8, 1, GateConfig(**V3, seq_loss=1e-4))
    x = torch.randn(3, 10, 16)
    _, out = layer(x)
    seq = torch.arange(3).repeat_interleave(10)
    expected = 1e-4 * losses.sequence_balance_loss(out.routing.scores_te, seq, top_k=4)
    assert torch.allclose(out.aux_loss, expected)


def test_bias_update_follows_the_load_and_stays_fp32():
    torch.manual_seed(7)
    gate = MoEGate(16, GateConfig(**V3, bias_rate=0.001)).to(torch.bfloat16)
    assert gate.weight.dtype == torch.bfloat16 and gate.bias.dtype == torch.float32
    load = torch.tensor([8, 0, 4, 4] * 4)  # mean 4
    gate.update_bias(load)
    assert gate.bias.dtype == torch.float32
    assert gate.bias.tolist() == pytest.approx([-0.001, 0.001, 0.0, 0.0] * 4)
    with pytest.raises(InputError):
        MoEGate(16, GateConfig(**V2)).update_bias(load)


def test_bias_only_steers_selection():
    torch.manual_seed(8)
    gate = MoEGate(16, GateConfig(**V3))
    x = torch.randn(20, 16)
    with torch.no_grad():
        gate.bias[5] = 10.0
    out = gate(x)
    assert all(5 in row for row in as_sets(out.routing.ids_tk))
    slot = (out.routing.ids_tk == 5).float().argmax(dim=1)
    s = torch.sigmoid(out.logits_te)
    chosen = s.gather(1, out.routing.ids_tk)
    expected = s[:, 5] / chosen.sum(dim=1) * 2.5
    assert torch.allclose(out.routing.weights_tk.gather(1, slot[:, None])[:, 0], expected)


def test_half_precision_input_routes_like_fp32():
    torch.manual_seed(9)
    gate = MoEGate(16, GateConfig(**V3))
    x = torch.randn(50, 16).to(torch.bfloat16)
    half, full = gate(x), gate(x.float())
    assert torch.equal(half.routing.ids_tk, full.routing.ids_tk)
    assert half.logits_te.dtype == torch.float32


# --- the layer: shapes, shared experts, gradients ----------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        GateConfig(kind="softmax-topk", num_experts=8, top_k=2, expert_loss=0.01),
        GateConfig(**V2, capacity_factor=1.0, expert_loss=0.003, device_loss=0.05,
                   comm_loss=0.02),
        GateConfig(**V3, bias_rate=1e-3, seq_loss=1e-4),
        GateConfig(kind="switch-top1", num_experts=8, top_k=1, capacity_factor=1.0,
                   expert_loss=0.01, z_loss=1e-3),
        GateConfig(kind="gshard-top2", num_experts=8, top_k=2, capacity_factor=1.0,
                   expert_loss=0.01),
        GateConfig(kind="noisy-topk", num_experts=8, top_k=2, expert_loss=0.01),
    ],
    ids=lambda c: c.kind,
)
def test_every_gate_kind_runs_forward_and_backward(config):
    torch.manual_seed(10)
    layer = MoELayer(16, 8, 1, config).train()
    x = torch.randn(2, 12, 16, requires_grad=True)
    y, out = layer(x)
    assert y.shape == x.shape
    (y.square().mean() + out.aux_loss).backward()
    assert layer.gate.weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0
    empty, empty_out = layer(torch.randn(0, 16))
    assert empty.shape == (0, 16) and empty_out.routing.ids_tk.shape == (0, config.top_k)


def test_shared_experts_serve_every_token_even_when_routed_ones_drop_it():
    torch.manual_seed(11)
    layer = MoELayer(16, 8, 2, GateConfig(**V2, capacity_factor=0.1))
    x = torch.randn(1, 40, 16)
    y, out = layer(x)
    fully_dropped = (out.routing.ids_tk < 0).all(dim=1)
    assert fully_dropped.any()
    shared = layer.shared_experts(x[0])
    assert torch.allclose(y[0, fully_dropped], shared[fully_dropped])
    assert shared[fully_dropped].abs().sum() > 0
    assert not torch.allclose(y[0, ~fully_dropped], shared[~fully_dropped])


def test_layer_output_is_shared_plus_weighted_routed_experts():
    torch.manual_seed(12)
    layer = MoELayer(16, 8, 0, GateConfig(kind="softmax-topk", num_experts=4, top_k=2))
    x = torch.randn(5, 16)
    y, out = layer(x)
    expected = torch.zeros_like(x)
    for token in range(5):
        for expert, weight in zip(out.routing.ids_tk[token].tolist(),
                                  out.routing.weights_tk[token].tolist(), strict=True):
            gate_w, up_w = layer.gate_up_proj[expert].chunk(2, dim=0)
            hidden = torch.nn.functional.silu(gate_w @ x[token]) * (up_w @ x[token])
            expected[token] += weight * (layer.down_proj[expert] @ hidden)
    assert torch.allclose(y, expected, atol=1e-5)


def test_gradients_reach_the_gate_through_weights_and_through_the_aux_loss():
    torch.manual_seed(13)
    config = GateConfig(kind="softmax-topk", num_experts=8, top_k=2, expert_loss=0.01)
    layer = MoELayer(16, 8, 1, config)
    x = torch.randn(2, 10, 16)
    y, out = layer(x)
    y.sum().backward(retain_graph=True)
    through_weights = layer.gate.weight.grad.clone()
    assert through_weights.abs().sum() > 0
    layer.zero_grad()
    out.aux_loss.backward()
    assert layer.gate.weight.grad.abs().sum() > 0
    assert layer.gate_up_proj.grad is None or layer.gate_up_proj.grad.abs().sum() == 0
