"""Stories about scenarios: presets, overrides, and the errors a user sees.

A scenario names a model preset and a topology, may override any preset field, and
takes ``--set FIELD.PATH=VALUE`` overrides on top. Every mistake is one
:class:`moesim.InputError` naming where it came from (the file or ``--set``), the
field, and what would be allowed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import moesim
from moesim import InputError

MODEL_PRESETS = ["deepseek-v2-lite", "deepseek-v2", "deepseek-v3", "deepseekmoe-16b",
                 "mixtral-8x7b", "qwen3-30b-a3b"]

# Published Hugging Face config.json numbers:
# (hidden, layers, dense layers, routed experts, shared experts, top-k, moe width, vocab)
PUBLISHED = {
    "deepseek-v3": (7168, 61, 3, 256, 1, 8, 2048, 129280),
    "deepseek-v2": (5120, 60, 1, 160, 2, 6, 1536, 102400),
    "deepseek-v2-lite": (2048, 27, 1, 64, 2, 6, 1408, 102400),
    "deepseekmoe-16b": (2048, 28, 1, 64, 2, 6, 1408, 102400),
    "mixtral-8x7b": (4096, 32, 0, 8, 0, 2, 14336, 32000),
    "qwen3-30b-a3b": (2048, 48, 0, 128, 0, 8, 768, 151936),
}

SMALL = {
    "name": "small",
    "model": {"preset": "deepseek-v2-lite", "num_layers": 3},
    "topology": "h800-cluster",
    "parallel": {"ep": 16, "tokens_per_gpu": 64},
}


def write(tmp_path: Path, data, name: str = "scenario.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def with_(base: dict, section: str, **fields) -> dict:
    """``base`` with ``fields`` merged into its ``section`` mapping."""
    return {**base, section: {**base.get(section, {}), **fields}}


def load_error(path: Path, overrides=()) -> InputError:
    with pytest.raises(InputError) as info:
        moesim.load_scenario(path, overrides=overrides)
    return info.value


# ---------------------------------------------------------------- presets


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_every_model_preset_loads_with_its_published_shape(preset):
    scenario = moesim.scenario_from_dict({**SMALL, "model": preset,
                                          "parallel": {"ep": 8, "tokens_per_gpu": 64}})
    m = scenario.model
    assert m.name == preset
    assert m.source  # every preset says where its numbers come from
    shape = (m.hidden_size, m.num_layers, m.first_dense_layers, m.routed_experts,
             m.shared_experts, m.top_k, m.moe_intermediate_size, m.vocab_size)
    assert shape == PUBLISHED[preset]
    assert m.moe_layers == m.num_layers - m.first_dense_layers


def test_deepseek_v3_preset_spot_check():
    """DeepSeek-V3: hidden 7168, 256 routed experts + 1 shared, top-8 within 4 of 8
    groups, 61 layers of which the first 3 are dense, MLA with 128 heads, and
    node-limited routing to at most 4 nodes by default (report sec. 2.1.2)."""
    s = moesim.scenario_from_dict({**SMALL, "model": "deepseek-v3",
                                   "parallel": {"ep": 64, "tokens_per_gpu": 64}})
    m, r = s.model, s.routing
    assert (m.hidden_size, m.routed_experts, m.top_k, m.num_layers,
            m.first_dense_layers) == (7168, 256, 8, 61, 3)
    assert (m.expert_groups, m.topk_groups, m.shared_experts) == (8, 4, 1)
    assert (m.attention, m.num_heads, m.kv_lora_rank, m.q_lora_rank) == ("mla", 128, 512, 1536)
    assert (r.gate, r.max_devices, r.limit_scope) == ("group-limited-sigmoid", 4, "node")
    assert s.hardware.name == "h800"  # taken from the topology's GPU


def test_deepseek_v2_routes_to_at_most_three_devices_by_default():
    s = moesim.scenario_from_dict({**SMALL, "model": "deepseek-v2",
                                   "parallel": {"ep": 32, "tokens_per_gpu": 64}})
    assert (s.routing.gate, s.routing.max_devices, s.routing.limit_scope) == (
        "device-limited", 3, "device")


def test_the_embedded_default_scenario_loads():
    s = moesim.load_scenario()
    assert s.model.name == "deepseek-v3" and s.topology == "h800-cluster"
    assert s.parallel.ep == 64 and s.parallel.micro_batches == 2


# ---------------------------------------------------------------- overrides


def test_a_scenario_can_override_any_preset_field(tmp_path):
    """``model: {preset: deepseek-v3, num_layers: 8}`` keeps every other V3 number."""
    path = write(tmp_path, {"model": {"preset": "deepseek-v3", "num_layers": 8,
                                      "routed_experts": 64},
                            "topology": "h800-cluster",
                            "parallel": {"ep": 64, "tokens_per_gpu": 64}})
    m = moesim.load_scenario(path).model
    assert (m.num_layers, m.routed_experts) == (8, 64)
    assert (m.hidden_size, m.top_k, m.first_dense_layers) == (7168, 8, 3)


def test_the_scenario_routing_overrides_the_preset_default(tmp_path):
    path = write(tmp_path, {**with_(SMALL, "routing", max_devices=1), "model": "deepseek-v3"})
    r = moesim.load_scenario(path).routing
    assert (r.gate, r.max_devices) == ("group-limited-sigmoid", 1)


def test_set_overrides_apply_on_top_of_the_file(tmp_path):
    """``--set`` values are YAML: numbers become numbers, mappings mappings (a mapping
    replaces the whole section); a preset can be swapped for another."""
    path = write(tmp_path, with_(SMALL, "routing", drop_policy="position"))
    s = moesim.load_scenario(path, overrides=[
        "routing={assignment: zipf}", "parallel.ep=32", "parallel.tokens_per_gpu=128",
        "routing.capacity_factor=1.25", "model.num_layers=4", "mode=inference", "seed=9",
    ])
    assert s.routing.drop_policy == "probs"  # the mapping replaced the file's routing
    assert (s.parallel.ep, s.parallel.tokens_per_gpu) == (32, 128)
    assert s.routing.capacity_factor == 1.25 and s.routing.assignment == "zipf"
    assert s.model.num_layers == 4 and s.model.name == "deepseek-v2-lite"
    assert (s.mode, s.seed) == ("inference", 9)

    swapped = moesim.load_scenario(path, overrides=["model=mixtral-8x7b", "parallel.ep=8"])
    assert swapped.model.name == "mixtral-8x7b" and swapped.model.routed_experts == 8


def test_later_overrides_win():
    s = moesim.load_scenario(overrides=["parallel.tokens_per_gpu=64",
                                        "parallel.tokens_per_gpu=128"])
    assert s.parallel.tokens_per_gpu == 128


# ---------------------------------------------------------------- round trip


def test_to_dict_round_trips_to_an_equal_scenario(tmp_path):
    """A resolved scenario written out (as a dict, YAML or JSON) loads back equal."""
    s = moesim.load_scenario(write(tmp_path, with_(SMALL, "routing", capacity_factor=1.1,
                                                   assignment="zipf")))
    data = s.to_dict()
    assert data["schema"] == "moesim.scenario/1"
    assert moesim.scenario_from_dict(data) == s
    assert moesim.scenario_from_dict(json.loads(json.dumps(data))) == s
    assert moesim.load_scenario(write(tmp_path, data, "resolved.yaml")) == s
    default = moesim.load_scenario()
    assert moesim.scenario_from_dict(default.to_dict()) == default


# ---------------------------------------------------------------- mistakes


def test_broken_yaml_names_the_file_and_line(tmp_path):
    path = write(tmp_path, "model: [deepseek-v3\nparallel: {ep: 8\n", "broken.yaml")
    err = load_error(path)
    assert err.source == str(path)
    assert str(path) in str(err) and "line" in str(err)


def test_missing_file_names_the_file(tmp_path):
    err = load_error(tmp_path / "nowhere.yaml")
    assert "nowhere.yaml" in str(err)


@pytest.mark.parametrize("model", ["deepseek-v9", {"preset": "deepseek-v9"}])
def test_unknown_preset_lists_the_presets(tmp_path, model):
    path = write(tmp_path, {**SMALL, "model": model})
    err = load_error(path)
    assert err.field == "model.preset" and err.source == str(path)
    assert "deepseek-v9" in str(err)
    for name in MODEL_PRESETS:
        assert name in err.allowed


def test_unknown_field_lists_the_fields_of_its_section(tmp_path):
    path = write(tmp_path, with_(SMALL, "parallel", tokns_per_gpu=3))
    err = load_error(path)
    assert (err.field, err.source) == ("parallel.tokns_per_gpu", str(path))
    assert "unknown field" in str(err)
    assert "tokens_per_gpu" in err.allowed and "dispatch_kernel" in err.allowed

    top = load_error(write(tmp_path, {**SMALL, "colour": "red"}, "top.yaml"))
    assert top.field == "colour" and "parallel" in top.allowed


def test_wrong_type_names_the_field_and_the_type(tmp_path):
    path = write(tmp_path, with_(SMALL, "parallel", ep="eight"))
    err = load_error(path)
    assert (err.field, err.source) == ("parallel.ep", str(path))
    assert "eight" in str(err) and "int" in err.allowed


def test_unknown_choice_lists_the_choices(tmp_path):
    err = load_error(write(tmp_path, with_(SMALL, "parallel", dispatch_kernel="nccl")))
    assert err.field == "parallel.dispatch_kernel"
    for kernel in ("deepep-normal", "deepep-low-latency", "nccl-alltoall"):
        assert kernel in err.allowed


def test_ep_must_divide_the_experts(tmp_path):
    """64 experts cannot be split over 48 GPUs; the divisors of 64 are offered."""
    path = write(tmp_path, with_(SMALL, "parallel", ep=48))
    err = load_error(path)
    assert (err.field, err.source) == ("parallel.ep", str(path))
    assert err.allowed.startswith("1, 2, 4, 8, 16, 32, 64; or an eplb placement")


def test_m_larger_than_the_nodes_of_the_group(tmp_path):
    """EP 16 = two 8-GPU nodes: a node limit of 3 is impossible."""
    path = write(tmp_path, with_(SMALL, "routing", max_devices=3))
    err = load_error(path)
    assert (err.field, err.source) == ("routing.max_devices", str(path))
    assert err.allowed == "1..2"

    device = load_error(write(tmp_path, with_(SMALL, "routing", max_devices=17,
                                              limit_scope="device"), "device.yaml"))
    assert device.field == "routing.max_devices"
    assert device.allowed.endswith("..16")


def test_the_allowed_m_range_offered_is_really_allowed(tmp_path):
    """EP 16 of 64 experts, device scope, K = 6: M must lie in 2..16 (one GPU holds only
    4 experts). Asking for M = 17 must not suggest M = 1, which fails in turn."""
    err = load_error(write(tmp_path, with_(SMALL, "routing", max_devices=17,
                                           limit_scope="device")))
    assert err.allowed == "2..16"


def test_m_times_experts_per_unit_must_reach_k(tmp_path):
    """EP 16 of 64 experts = 4 experts per GPU: one GPU cannot hold a token's 6 experts."""
    path = write(tmp_path, with_(SMALL, "routing", max_devices=1, limit_scope="device"))
    err = load_error(path)
    assert (err.field, err.source) == ("routing.max_devices", str(path))
    assert "top_k" in str(err) and err.allowed == "2..16"


def test_zero_tokens_per_gpu(tmp_path):
    path = write(tmp_path, with_(SMALL, "parallel", tokens_per_gpu=0))
    err = load_error(path)
    assert (err.field, err.source) == ("parallel.tokens_per_gpu", str(path))
    assert err.allowed and "0" in err.allowed


def test_more_gpus_than_the_topology_has(tmp_path):
    path = write(tmp_path, with_(SMALL, "parallel", gpus=4096))
    err = load_error(path)
    assert (err.field, err.source) == ("parallel.gpus", str(path))
    assert err.allowed == "1..2048"

    # Without `gpus` the EP size sets the GPU count, so the error names the field written.
    node = load_error(write(tmp_path, {**SMALL, "topology": "h800-node"}, "node.yaml"))
    assert node.field == "parallel.ep" and node.allowed == "1..8"


def test_unknown_set_path_names_set(tmp_path):
    path = write(tmp_path, SMALL)
    err = load_error(path, overrides=["parallel.epp=3"])
    assert (err.source, err.field) == ("--set", "parallel.epp")
    assert "ep" in err.allowed.split(", ")

    err = load_error(path, overrides=["foo.bar=1"])
    assert (err.source, err.field) == ("--set", "foo.bar")
    assert "routing" in err.allowed

    err = load_error(path, overrides=["parallel.ep"])  # no '='
    assert err.source == "--set"


def test_a_bad_set_value_names_set_not_the_file(tmp_path):
    """When the wrong value came from ``--set``, the error says so, whether it is a type
    error, an infeasible value, or an infeasible value inside a mapping override."""
    path = write(tmp_path, SMALL)
    for override, field in [("parallel.ep=eight", "parallel.ep"),
                            ("parallel.ep=48", "parallel.ep"),
                            ("routing.max_devices=3", "routing.max_devices"),
                            ("parallel={ep: 48, tokens_per_gpu: 64}", "parallel.ep"),
                            ("routing={max_devices: 3}", "routing.max_devices")]:
        err = load_error(path, overrides=[override])
        assert (err.field, err.source) == (field, "--set"), override
