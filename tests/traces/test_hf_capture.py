"""Capture from Hugging Face MoE checkpoints: tiny random-weight models of six families.

Each checkpoint is built with transformers' own config class and ``save_pretrained``;
the captured routing is checked against the router logits the model itself reports
(``output_router_logits=True``), re-routed here with each family's published rule.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from moesim.errors import InputError  # noqa: E402
from moesim.tracefile.format import RoutingTrace  # noqa: E402
from moesim.traces.hf_capture import (  # noqa: E402
    FAMILIES,
    capture_hf,
    capture_hf_model,
    token_sequences,
)

CPU = torch.device("cpu")

VOCAB = 100
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
)
DEEPSEEK = dict(
    moe_intermediate_size=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    q_lora_rank=None,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
)


def _configs() -> dict[str, tuple[object, list[int]]]:
    """name -> (config, MoE layer indices the family's layer rule gives)."""
    return {
        "deepseek_v2": (
            transformers.DeepseekV2Config(
                **COMMON, **DEEPSEEK, topk_method="greedy", routed_scaling_factor=1.5
            ),
            [1, 2],
        ),
        "deepseek_v2_grouped": (
            transformers.DeepseekV2Config(
                **COMMON,
                **DEEPSEEK,
                topk_method="group_limited_greedy",
                n_group=4,
                topk_group=2,
                routed_scaling_factor=2.0,
            ),
            [1, 2],
        ),
        "deepseek_v3": (
            transformers.DeepseekV3Config(
                **COMMON, **DEEPSEEK, n_group=4, topk_group=2, routed_scaling_factor=2.5
            ),
            [1, 2],
        ),
        "mixtral": (
            transformers.MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2),
            [0, 1, 2],
        ),
        "qwen2_moe": (
            transformers.Qwen2MoeConfig(
                **COMMON,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=32,
                num_experts=8,
                num_experts_per_tok=2,
                mlp_only_layers=[0],
            ),
            [1, 2],
        ),
        "qwen3_moe": (
            transformers.Qwen3MoeConfig(
                **COMMON,
                moe_intermediate_size=16,
                num_experts=8,
                num_experts_per_tok=2,
                norm_topk_prob=True,
            ),
            [0, 1, 2],
        ),
        "olmoe": (
            transformers.OlmoeConfig(
                **COMMON, num_experts=8, num_experts_per_tok=2, pad_token_id=1, eos_token_id=2
            ),
            [0, 1, 2],
        ),
    }


CHECKPOINTS = list(_configs())
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "while",
    "a",
    "small",
    "mixture",
    "of",
    "experts",
    "routes",
    "every",
    "token",
    "to",
    "two",
    "of",
    "eight",
    "experts",
]


def _save_tokenizer(directory: Path) -> None:
    """A word-level tokenizer built offline with `tokenizers`, ids well inside VOCAB."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(directory)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    paths = {}
    for name, (config, _) in _configs().items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        if name == "deepseek_v3":
            # A visible selection bias, so "scores before bias" and "bias stored apart"
            # can be told from the biased choice.
            for layer in model.model.layers:
                if hasattr(layer.mlp, "gate"):
                    layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.3)
        model.save_pretrained(root / name)
        if name == "mixtral":
            _save_tokenizer(root / name)
        paths[name] = root / name
    return paths


def _reroute(logits: torch.Tensor, gate: dict, bias: torch.Tensor | None):
    """The family rule from the gate metadata, written out independently of the hooks."""
    params = gate["params"]
    k, scale = params["top_k"], params["scale"]
    logits = logits.float()
    if gate["kind"] == "group-limited-sigmoid":
        scores = logits.sigmoid()
        choice = scores + bias
        grouped = choice.view(len(choice), params["num_groups"], -1)
        group_score = grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(params["max_groups"], dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(params["group_size"], 1), float("-inf"))
        ids = choice.topk(k, dim=-1).indices
        weights = scores.gather(1, ids)
    else:
        scores = logits.softmax(-1)
        masked = scores
        if gate["kind"] == "device-limited":
            group_score = scores.view(len(scores), params["num_groups"], -1).amax(-1)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(params["max_groups"], dim=-1).indices, True)
            masked = scores.masked_fill(~keep.repeat_interleave(params["group_size"], 1), 0.0)
        weights, ids = masked.topk(k, dim=-1)
    if params["normalize"]:
        weights = weights / weights.sum(-1, keepdim=True)
    return ids, weights * scale, scores


def _by_id(ids: np.ndarray, weights: np.ndarray):
    """Treat the K slots as a set (HF's DeepSeek routers use sorted=False)."""
    order = np.argsort(ids, axis=-1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(weights, order, -1)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_capture_matches_the_models_own_routing(checkpoints, name):
    path = checkpoints[name]
    _, moe_layers = _configs()[name]
    trace = capture_hf(path, text=None, num_tokens=40, seq_len=16, seed=3)

    assert trace.expert_ids.shape == (len(moe_layers), 40, 2)
    assert trace.scores.shape == (len(moe_layers), 40, 8)
    assert trace.metadata["layer_indices"] == moe_layers
    assert trace.expert_ids.min() >= 0 and trace.expert_ids.max() < 8
    assert (np.sort(trace.expert_ids, -1)[..., 0] != np.sort(trace.expert_ids, -1)[..., 1]).all()
    assert trace.seq_id.tolist() == [0] * 16 + [1] * 16 + [2] * 8
    assert trace.pos.tolist() == list(range(16)) * 2 + list(range(8))

    # The model's own router logits for the same tokens (one forward per length).
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    sequences = token_sequences(num_tokens=40, seq_len=16, vocab_size=VOCAB, seed=3)
    per_layer: list[list[torch.Tensor]] = [[] for _ in moe_layers]
    with torch.no_grad():
        for batch in (np.stack(sequences[:2]), sequences[2][None]):
            out = model(input_ids=torch.as_tensor(batch), output_router_logits=True)
            for layer, logits in enumerate(out.router_logits):
                per_layer[layer].append(logits)
    gate = trace.metadata["gate"]
    for layer, index in enumerate(moe_layers):
        logits = torch.cat(per_layer[layer])
        bias = None
        if gate["kind"] == "group-limited-sigmoid":
            bias = model.model.layers[index].mlp.gate.e_score_correction_bias
        ids, weights, scores = _reroute(logits, gate, bias)
        got_ids, got_w = _by_id(trace.expert_ids[layer], trace.weights[layer])
        want_ids, want_w = _by_id(ids.numpy(), weights.numpy())
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            trace.scores[layer].astype(np.float32), scores.numpy(), atol=1e-3
        )
    if gate["kind"] == "group-limited-sigmoid":
        assert trace.bias is not None and trace.bias.shape == (len(moe_layers), 8)
    else:
        assert trace.bias is None
        np.testing.assert_allclose(trace.scores.astype(np.float32).sum(-1), 1.0, atol=5e-3)


@pytest.mark.parametrize(
    "name,kind",
    [
        ("deepseek_v2", "softmax-topk"),
        ("deepseek_v2_grouped", "device-limited"),
        ("deepseek_v3", "group-limited-sigmoid"),
        ("mixtral", "softmax-topk"),
        ("qwen2_moe", "softmax-topk"),
        ("qwen3_moe", "softmax-topk"),
        ("olmoe", "softmax-topk"),
    ],
)
def test_metadata_names_source_gate_and_tokens(checkpoints, name, kind):
    trace = capture_hf(checkpoints[name], text=None, num_tokens=8, seq_len=8, seed=0)
    meta = trace.metadata
    model_type = "deepseek_v2" if name.startswith("deepseek_v2") else name
    assert meta["schema"] == "moesim.trace/1"
    assert meta["source"]["kind"] == "hf-checkpoint"
    assert meta["source"]["model_type"] == model_type
    assert meta["source"]["architectures"] and meta["source"]["architectures"][0].endswith(
        "ForCausalLM"
    )
    assert meta["source"]["path"] == str(checkpoints[name].resolve())
    assert meta["gate"]["kind"] == kind
    assert meta["num_experts"] == 8 and meta["top_k"] == 2
    assert meta["tokens_from"] == "random-token-ids"
    assert meta["device"] == "cpu"
    assert meta["torch_version"] == torch.__version__
    assert meta["moesim_version"] and meta["created"].endswith("+00:00")
    expected = {
        "deepseek_v2": {"scale": 1.5, "normalize": False},
        "deepseek_v2_grouped": {"num_groups": 4, "max_groups": 2, "scale": 2.0},
        "deepseek_v3": {"num_groups": 4, "max_groups": 2, "scale": 2.5, "normalize": True},
        "mixtral": {"normalize": True},
        "qwen3_moe": {"normalize": True},
        "olmoe": {"normalize": False},
    }.get(name, {})
    assert expected.items() <= meta["gate"]["params"].items()
    back = RoutingTrace.from_bytes(trace.to_bytes())
    assert back.metadata == json.loads(json.dumps(meta))
    np.testing.assert_array_equal(back.expert_ids, trace.expert_ids)


def test_weights_are_what_the_experts_consumed(checkpoints):
    """The experts pre-hook, not the router output, decides ids and weights: a block that
    changed the router's choice on the way (EP masking, rescaling) is recorded as run."""
    path = checkpoints["mixtral"]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    sequences = token_sequences(num_tokens=16, seq_len=16, vocab_size=VOCAB, seed=0)
    plain = capture_hf_model(model, sequences, family=FAMILIES["mixtral"], device=CPU)[1]

    def halve_and_hide_expert_0(_module, args):
        hidden, ids, weights = args
        return hidden, torch.where(ids == 0, 8, ids), weights * 0.5  # 8 == E: "not local"

    for layer in model.model.layers:
        layer.mlp.experts.register_forward_pre_hook(halve_and_hide_expert_0)
    changed = capture_hf_model(model, sequences, family=FAMILIES["mixtral"], device=CPU)[1]
    # Layer 0 only: its changed output moves the routing of the layers after it.
    np.testing.assert_allclose(changed["weights"][0], plain["weights"][0] * 0.5)
    hidden = plain["expert_ids"][0] == 0
    assert hidden.any()
    assert (changed["expert_ids"][0][hidden] == -1).all()
    np.testing.assert_array_equal(
        changed["expert_ids"][0][~hidden], plain["expert_ids"][0][~hidden]
    )
    np.testing.assert_array_equal(changed["scores"][0], plain["scores"][0])


def test_v3_bias_is_stored_apart_and_scores_stay_unbiased(checkpoints):
    path = checkpoints["deepseek_v3"]
    trace = capture_hf(path, text=None, num_tokens=64, seq_len=32, seed=1)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    saved = np.stack(
        [model.model.layers[i].mlp.gate.e_score_correction_bias.numpy() for i in (1, 2)]
    )
    np.testing.assert_allclose(trace.bias, saved)
    # Scores are sigmoid affinities in (0, 1) without the bias; re-selecting from them
    # *without* the bias gives different experts for some tokens, so the bias mattered.
    scores = torch.as_tensor(trace.scores.astype(np.float32))
    assert scores.min() > 0 and scores.max() < 1
    gate = trace.metadata["gate"]
    unbiased = [
        _reroute(torch.logit(scores[layer]), gate, torch.zeros(8))[0].sort(-1).values
        for layer in range(2)
    ]
    captured = np.sort(trace.expert_ids, -1)
    assert any((u.numpy() != c).any() for u, c in zip(unbiased, captured, strict=True))


def test_text_through_the_checkpoint_tokenizer(checkpoints):
    text = " ".join(WORDS * 6)
    trace = capture_hf(checkpoints["mixtral"], text=text, num_tokens=48, seq_len=16, seed=0)
    meta = trace.metadata
    assert meta["tokens_from"] == "text"
    assert meta["corpus"]["kind"] == "text" and meta["corpus"]["chars"] == len(text)
    assert meta["corpus"]["bos_per_sequence"] is True
    assert trace.expert_ids.shape == (3, 48, 2)
    again = capture_hf(checkpoints["mixtral"], text=text, num_tokens=48, seq_len=16, seed=9)
    # Text decides the tokens, not the seed.
    np.testing.assert_array_equal(again.expert_ids, trace.expert_ids)
    random_ids = capture_hf(checkpoints["mixtral"], text=None, num_tokens=48, seq_len=16, seed=0)
    assert random_ids.metadata["tokens_from"] == "random-token-ids"
    assert not np.array_equal(random_ids.expert_ids, trace.expert_ids)


def test_text_too_short_for_the_tokens_asked(checkpoints):
    with pytest.raises(InputError, match="more text"):
        capture_hf(checkpoints["mixtral"], text="the fox", num_tokens=48, seq_len=16, seed=0)


def test_checkpoint_without_tokenizer_falls_back_to_random_ids(checkpoints):
    with pytest.warns(UserWarning, match="no tokenizer"):
        trace = capture_hf(
            checkpoints["qwen3_moe"], text="some text", num_tokens=16, seq_len=8, seed=0
        )
    assert trace.metadata["tokens_from"] == "random-token-ids"
    assert "no tokenizer" in trace.metadata["tokens_note"]


def test_same_seed_same_trace(checkpoints):
    first = capture_hf(checkpoints["olmoe"], text=None, num_tokens=24, seq_len=12, seed=5)
    second = capture_hf(checkpoints["olmoe"], text=None, num_tokens=24, seq_len=12, seed=5)
    other = capture_hf(checkpoints["olmoe"], text=None, num_tokens=24, seq_len=12, seed=6)
    np.testing.assert_array_equal(first.expert_ids, second.expert_ids)
    np.testing.assert_array_equal(first.weights, second.weights)
    assert not np.array_equal(first.expert_ids, other.expert_ids)


# ------------------------------------------------------------------ bad input


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="no such checkpoint"):
        capture_hf(tmp_path / "nope", text=None, num_tokens=8, seq_len=8, seed=0)


def test_directory_without_config(tmp_path):
    with pytest.raises(InputError, match="no config.json"):
        capture_hf(tmp_path, text=None, num_tokens=8, seq_len=8, seed=0)


def test_dense_model_is_not_moe(tmp_path):
    transformers.LlamaConfig(**COMMON).save_pretrained(tmp_path)
    with pytest.raises(InputError, match="not an MoE model") as err:
        capture_hf(tmp_path, text=None, num_tokens=8, seq_len=8, seed=0)
    assert "deepseek_v3" in str(err.value) and "mixtral" in str(err.value)


def test_unsupported_moe_family(tmp_path):
    transformers.GraniteMoeConfig(**COMMON, num_local_experts=8).save_pretrained(tmp_path)
    with pytest.raises(InputError, match="not supported yet") as err:
        capture_hf(tmp_path, text=None, num_tokens=8, seq_len=8, seed=0)
    assert "qwen3_moe" in str(err.value)


def test_cuda_without_a_gpu_is_a_clear_error(checkpoints, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="no CUDA GPU"):
        capture_hf(
            checkpoints["mixtral"], text=None, num_tokens=8, seq_len=8, seed=0, device="cuda"
        )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"device": "tpu"}, "unknown device"),
        ({"num_tokens": 0}, "num_tokens"),
        ({"seq_len": 0}, "seq_len"),
        ({"seq_len": 65}, "max_position_embeddings"),
        ({"text": "   "}, "empty text"),
    ],
)
def test_bad_arguments(checkpoints, kwargs, match):
    args = {"text": None, "num_tokens": 8, "seq_len": 8, "seed": 0} | kwargs
    with pytest.raises(InputError, match=match):
        capture_hf(checkpoints["mixtral"], **args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_capture_on_cuda_matches_cpu(checkpoints):
    on_gpu = capture_hf(
        checkpoints["deepseek_v3"], text=None, num_tokens=64, seq_len=32, seed=0, device="cuda"
    )
    on_cpu = capture_hf(checkpoints["deepseek_v3"], text=None, num_tokens=64, seq_len=32, seed=0)
    assert on_gpu.metadata["device"].startswith("cuda:0 ")
    assert (on_gpu.expert_ids == on_cpu.expert_ids).mean() > 0.99
    np.testing.assert_allclose(on_gpu.scores, on_cpu.scores, atol=2e-3)
