"""Stories about the newer model and GPU presets: each loads through the scenario
loader, carries its published config.json numbers, and its parameter count from the
shape matches the published totals.

Numbers and their sources are in moesim/config/presets/models.yaml and gpus/*.yaml;
docs/presets.md lists them.
"""

from __future__ import annotations

import pytest

import moesim
from moesim.config.loading import hardware_preset, model_preset, preset_names
from moesim.config.model import ModelShape
from moesim.memory.model import param_counts, swiglu_params

NEW_MODELS = ["qwen3-30b-a3b", "qwen3-235b-a22b", "gpt-oss-120b", "kimi-k2", "mixtral-8x22b"]
NEW_GPUS = ["b300", "gb300"]

# Published config.json numbers: (hidden, layers, dense layers, routed experts, shared
# experts, top-k, moe width, vocab, attention, heads, kv heads or None, head_dim or None).
PUBLISHED = {
    "qwen3-30b-a3b": (2048, 48, 0, 128, 0, 8, 768, 151936, "gqa", 32, 4, 128),
    "qwen3-235b-a22b": (4096, 94, 0, 128, 0, 8, 1536, 151936, "gqa", 64, 4, 128),
    "gpt-oss-120b": (2880, 36, 0, 128, 0, 4, 2880, 201088, "gqa", 64, 8, 64),
    "kimi-k2": (7168, 61, 1, 384, 1, 8, 2048, 163840, "mla", 64, None, None),
    "mixtral-8x22b": (6144, 56, 0, 8, 0, 2, 16384, 32000, "gqa", 48, 8, 128),
}

# Published totals, and whether the vendor's "active" count includes the input embedding
# (a lookup, no GEMM): Qwen's does (3.3B: 3.35 with it, 3.04 without); OpenAI's model card
# counts the unembedding only (table 1: 5.13B = attention + 4/128 of the MLP + unembedding);
# Moonshot's 32B is matched only without it (32.9B with, 31.7B without); Mistral's 39B
# either way.
PUBLISHED_PARAMS = {  # name: (total, active, active counts the input embedding)
    "qwen3-30b-a3b": (30.5e9, 3.3e9, True),  # Qwen/Qwen3-30B-A3B model card
    "qwen3-235b-a22b": (235e9, 22e9, True),  # Qwen/Qwen3-235B-A22B model card
    "gpt-oss-120b": (116.83e9, 5.13e9, False),  # gpt-oss model card, arXiv 2508.10925
    "kimi-k2": (1.04e12, 32e9, False),  # MoonshotAI/Kimi-K2 README and tech report
    "mixtral-8x22b": (141e9, 39e9, True),  # Mistral AI, Mixtral 8x22B release
}


def load(name: str, **parallel) -> moesim.Scenario:
    """The preset in a one-GPU scenario (EP1, no TP): every parameter on that GPU."""
    return moesim.scenario_from_dict({
        "model": name, "topology": "h800-cluster",
        "parallel": {"ep": 1, "tokens_per_gpu": 64, **parallel},
    })


def total_params(scenario: moesim.Scenario) -> float:
    p = param_counts(scenario)
    return p.gemm + p.other + p.shared + p.routed


def active_params(scenario: moesim.Scenario, *, input_embedding: bool) -> float:
    """Parameters one token meets: all but the routed experts, plus K of them per MoE
    layer; ``input_embedding=False`` leaves out the embedding table (a lookup)."""
    m = scenario.model
    p = param_counts(scenario)
    routed_active = m.moe_layers * m.top_k * swiglu_params(m.hidden_size, m.moe_intermediate_size)
    active = total_params(scenario) - p.routed + routed_active
    return active if input_embedding else active - m.vocab_size * m.hidden_size


# ---------------------------------------------------------------- models


def test_the_new_model_presets_are_shipped():
    assert set(NEW_MODELS) <= set(preset_names("model"))


@pytest.mark.parametrize("name", NEW_MODELS)
def test_every_new_model_preset_loads_with_its_published_shape(name):
    s = load(name)
    m = s.model
    assert isinstance(m, ModelShape) and m.name == name
    assert m.source  # every preset says where its numbers come from
    shape = (m.hidden_size, m.num_layers, m.first_dense_layers, m.routed_experts,
             m.shared_experts, m.top_k, m.moe_intermediate_size, m.vocab_size, m.attention,
             m.num_heads, m.num_kv_heads, m.head_dim)
    assert shape == PUBLISHED[name]
    assert model_preset(name) == m


def test_qwen3_30b_a3b_spot_check():
    """128 experts, top-8, 48 layers all MoE, 32 query / 4 KV heads of 128."""
    m = load("qwen3-30b-a3b").model
    assert (m.routed_experts, m.top_k, m.num_layers, m.moe_layers) == (128, 8, 48, 48)
    assert (m.kv_heads, m.head_dim, m.shared_experts) == (4, 128, 0)


def test_gpt_oss_alternates_sliding_and_full_attention():
    """GPT-OSS: every other layer (18 of 36) attends to the last 128 tokens; GQA with
    head_dim 64, so the query width (64 x 64 = 4096) is not the hidden size (2880)."""
    m = load("gpt-oss-120b").model
    assert (m.sliding_window, m.sliding_window_layers) == (128, m.num_layers // 2)
    assert m.num_heads * m.head_dim == 4096 != m.hidden_size


def test_kimi_k2_is_deepseek_v3_shaped_without_a_group_limit():
    """Kimi-K2 keeps DeepSeek-V3's MLA (ranks 1536 / 512, head dims 128 + 64 / 128) with
    half the heads, 384 experts, one dense layer and one group (n_group = topk_group = 1)."""
    k2, v3 = load("kimi-k2").model, load("deepseek-v3").model
    mla = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
           "hidden_size", "num_layers", "moe_intermediate_size", "dense_intermediate_size",
           "top_k", "shared_experts")
    assert {f: getattr(k2, f) for f in mla} == {f: getattr(v3, f) for f in mla}
    assert (k2.num_heads, k2.routed_experts, k2.first_dense_layers) == (64, 384, 1)
    assert (k2.expert_groups, k2.topk_groups, k2.mtp_layers) == (1, 1, 0)


@pytest.mark.parametrize(("name", "gate"), [
    ("qwen3-30b-a3b", "softmax-topk"), ("qwen3-235b-a22b", "softmax-topk"),
    ("gpt-oss-120b", "softmax-topk"), ("mixtral-8x22b", "softmax-topk"),
    ("kimi-k2", "group-limited-sigmoid"),
])
def test_each_model_routes_with_its_published_gate_by_default(name, gate):
    r = load(name).routing
    assert r.gate == gate
    assert r.max_devices is None  # none of them limits the devices a token reaches


@pytest.mark.parametrize("name", NEW_MODELS)
def test_total_parameters_match_the_published_total_within_2_percent(name):
    total, _, _ = PUBLISHED_PARAMS[name]
    assert total_params(load(name)) == pytest.approx(total, rel=0.02)


@pytest.mark.parametrize("name", NEW_MODELS)
def test_active_parameters_match_the_published_count_within_2_percent(name):
    _, active, with_embedding = PUBLISHED_PARAMS[name]
    got = active_params(load(name), input_embedding=with_embedding)
    assert got == pytest.approx(active, rel=0.02)


def test_the_published_counts_pin_the_shapes_tightly():
    """Totals the shape gives (moesim's parameter count), to 0.1B: a changed width or
    layer count would move them far more than rounding does. GPT-OSS's attention and
    expert biases (~40M) and Qwen3's QK norms are not in ModelShape, hence its tiny gap."""
    got = {name: round(total_params(load(name)) / 1e9, 1) for name in NEW_MODELS}
    assert got == {"qwen3-30b-a3b": 30.5, "qwen3-235b-a22b": 235.1, "gpt-oss-120b": 116.8,
                   "kimi-k2": 1026.4, "mixtral-8x22b": 140.6}
    # GPT-OSS model card, table 1: 114.71B MLP (experts + routers), 0.96B attention.
    m = load("gpt-oss-120b").model
    mlp = m.moe_layers * m.routed_experts * (swiglu_params(m.hidden_size,
                                                           m.moe_intermediate_size) + m.hidden_size)
    assert mlp / 1e9 == pytest.approx(114.71, rel=0.001)


def test_a_new_model_preset_swaps_in_with_set():
    s = moesim.load_scenario(overrides=["model=qwen3-30b-a3b", "parallel.ep=8",
                                        "routing={}", "model.num_layers=4"])
    assert s.model.name == "qwen3-30b-a3b" and s.routing.gate == "softmax-topk"


# ---------------------------------------------------------------- GPUs


def test_the_new_gpu_presets_are_shipped():
    assert set(NEW_GPUS) <= set(preset_names("hardware"))


@pytest.mark.parametrize(("name", "bf16", "fp8", "hbm_gb", "hbm_gbps", "sms"), [
    ("b300", 2250, 4500, 288, 7750, 160),
    ("gb300", 2500, 5000, 278, 8000, 160),
])
def test_blackwell_ultra_presets_carry_the_datasheet_numbers(name, bf16, fp8, hbm_gb, hbm_gbps,
                                                            sms):
    hw = hardware_preset(name)
    assert hw.name == name and hw.source
    assert (hw.bf16_tflops, hw.fp8_tflops, hw.hbm_GB, hw.hbm_GBps, hw.sms) == (
        bf16, fp8, hbm_gb, hbm_gbps, sms)
    assert hw.peak_flops("fp8") == 2 * hw.peak_flops("bf16")


@pytest.mark.parametrize(("name", "fp4"), [("b300", 14000), ("gb300", 15000)])
def test_blackwell_ultra_dense_nvfp4_rate(name, fp4):
    hw = hardware_preset(name)
    if "fp4_tflops" not in type(hw).__pydantic_fields__:
        pytest.skip("HardwareSpec has no fp4_tflops field")
    assert hw.fp4_tflops == fp4


@pytest.mark.parametrize(("new", "old"), [("b300", "b200"), ("gb300", "gb200")])
def test_efficiencies_are_carried_over_from_the_blackwell_fit(new, old):
    """No kernel is fitted on Blackwell Ultra yet: every kernel efficiency, curve and
    overhead is the Blackwell preset's; only the published peaks, memory and SMs differ,
    and the backward GEMM efficiency, fitted on each GPU's own training steps
    (docs/training.md)."""
    peaks = {"name", "source", "bf16_tflops", "fp8_tflops", "fp4_tflops", "hbm_GBps",
             "hbm_GB", "sms", "backward_gemm_efficiency"}
    a, b = hardware_preset(new), hardware_preset(old)
    fields = set(type(a).__pydantic_fields__) - peaks
    assert {f: getattr(a, f) for f in fields} == {f: getattr(b, f) for f in fields}
    assert "carried over" in a.source and "not fitted" in a.source
