"""Our own DeepSeekMoE byte LM: shapes, learning, and routing capture from held-out text.

Every model here is tiny (hidden 32, 8 experts, sequences of 32 bytes) so the whole file
runs in seconds; the default configuration is exercised by ``moesim capture`` itself.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moesim.errors import InputError
from moesim.tracefile.format import RoutingTrace
from moesim.traces.capture import capture_heldout, capture_own, default_gate_config, tiny_config
from moesim.traces.corpus import heldout_sequences, load_corpus, training_batches
from moesim.traces.layers import GATE_KINDS
from moesim.traces.model import TinyMoEConfig, TinyMoELM
from moesim.traces.train import evaluate, train

TINY = dict(
    hidden=32, num_layers=3, num_heads=4, seq_len=32, dense_intermediate=48, expert_intermediate=16
)


def _config(kind: str = "softmax-topk", **gate_overrides) -> TinyMoEConfig:
    top_k = {"switch-top1": 1}.get(kind, 2)
    return tiny_config(kind, num_experts=8, top_k=top_k, gate_overrides=gate_overrides, **TINY)


def test_forward_shapes():
    config = _config()
    model = TinyMoELM(config)
    tokens = torch.randint(0, 256, (3, 32))
    out = model(tokens)
    assert out.logits_bsv.shape == (3, 32, 256)
    assert out.aux_loss.shape == () and out.aux_loss.item() > 0
    assert len(out.gates) == 2 == len(config.moe_layer_indices)
    assert config.moe_layer_indices == [1, 2]
    for gate in out.gates:
        assert gate.routing.ids_tk.shape == (96, 2)
        assert gate.routing.scores_te.shape == (96, 8)
    # Default: the dense first layer, then MoE layers, as DeepSeek.
    default = TinyMoEConfig()
    assert (default.num_experts, default.top_k, default.first_dense_layers) == (16, 4, 1)


def test_model_is_causal():
    model = TinyMoELM(_config()).eval()
    tokens = torch.randint(0, 256, (1, 32))
    changed = tokens.clone()
    changed[0, 20:] = (changed[0, 20:] + 1) % 256
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a.logits_bsv[:, :20], b.logits_bsv[:, :20])
    np.testing.assert_array_equal(a.gates[0].routing.ids_tk[:20], b.gates[0].routing.ids_tk[:20])


@pytest.mark.parametrize(
    "fields,field",
    [
        ({"first_dense_layers": 3}, "first_dense_layers"),
        ({"num_heads": 5}, "num_heads"),
        ({"hidden": 0}, "hidden"),
        ({"num_shared": -1}, "num_shared"),
    ],
)
def test_bad_config(fields, field):
    with pytest.raises(InputError) as err:
        tiny_config("softmax-topk", num_experts=8, top_k=2, **(TINY | fields))
    assert err.value.field == field


def test_unknown_gate_kind():
    with pytest.raises(InputError, match="unknown gate kind"):
        default_gate_config("top-p", 8, 2)


def test_training_lowers_the_loss_on_a_fixed_batch():
    config = _config()
    batch = torch.from_numpy(
        next(training_batches(load_corpus().train, batch_size=4, seq_len=32, seed=7))
    )
    torch.manual_seed(0)
    before = evaluate(TinyMoELM(config), batch)  # the same initial weights train() draws
    calls = []
    model, history = train(
        config,
        steps=12,
        batch_size=8,
        seed=0,
        progress=lambda step, steps, loss: calls.append((step, steps)),
    )
    after = evaluate(model, batch)
    assert before > 5.0  # ~ ln 256 untrained
    assert after < before - 0.5
    assert [step for step, _ in history] == list(range(1, 13))
    assert history[-1][1] < history[0][1]
    assert calls == [(step, 12) for step in range(1, 13)]
    assert model.train_info["steps"] == 12
    assert model.train_info["final_loss"] == history[-1][1]


def test_capture_from_heldout_text_is_a_valid_trace():
    config = _config()
    model, history = train(config, steps=3, batch_size=4, seed=0)
    trace = capture_heldout(model, num_tokens=100)
    assert trace.expert_ids.shape == (2, 100, 2) and trace.expert_ids.dtype == np.int16
    assert trace.weights.shape == (2, 100, 2) and trace.scores.shape == (2, 100, 8)
    assert trace.bias is None
    assert trace.seq_id.tolist() == [0] * 32 + [1] * 32 + [2] * 32 + [3] * 4
    assert trace.pos.tolist() == list(range(32)) * 3 + list(range(4))
    assert trace.expert_ids.min() >= 0 and trace.expert_ids.max() < 8
    np.testing.assert_allclose(trace.scores.astype(np.float32).sum(-1), 1.0, atol=5e-3)

    meta = trace.metadata
    assert meta["schema"] == "moesim.trace/1"
    assert meta["layer_indices"] == [1, 2]
    assert meta["gate"]["kind"] == "softmax-topk"
    assert meta["gate"]["params"]["num_experts"] == 8
    assert meta["source"]["kind"] == "own-model"
    assert meta["source"]["config"]["hidden"] == 32
    assert meta["source"]["training"]["steps"] == 3
    assert meta["source"]["training"]["final_loss"] == history[-1][1]
    assert meta["corpus"]["capture"]["kind"] == "python-stdlib"
    assert meta["corpus"]["capture"]["part"] == "heldout"
    assert meta["corpus"]["capture"]["bytes_used"] == 128
    assert meta["corpus"]["training"]["train"]["bytes"] > 0
    assert meta["tokens_from"] == "text"
    assert meta["device"] == "cpu"
    assert meta["torch_version"] == torch.__version__
    assert meta["moesim_version"] and meta["created"].endswith("+00:00")

    back = RoutingTrace.from_bytes(trace.to_bytes())
    for name in ("expert_ids", "weights", "scores", "seq_id", "pos"):
        np.testing.assert_array_equal(getattr(back, name), getattr(trace, name))
    assert back.metadata == json.loads(json.dumps(meta))


def test_capture_records_what_the_gate_chose():
    model, _ = train(_config(), steps=2, batch_size=4, seed=0)
    tokens = heldout_sequences(load_corpus().heldout, num_sequences=2, seq_len=32)
    trace = capture_own(model, tokens, seq_ids=np.array([5, 9]))
    with torch.no_grad():
        gates = model(torch.from_numpy(tokens)).gates
    for layer, gate in enumerate(gates):
        np.testing.assert_array_equal(trace.expert_ids[layer], gate.routing.ids_tk.numpy())
        np.testing.assert_allclose(trace.weights[layer], gate.routing.weights_tk.numpy())
    assert trace.seq_id.tolist() == [5] * 32 + [9] * 32
    # V1 weights are the unnormalised softmax scores of the chosen experts.
    scores = trace.scores.astype(np.float32)
    chosen = np.take_along_axis(scores, trace.expert_ids.astype(np.int64), axis=-1)
    np.testing.assert_allclose(trace.weights, chosen, atol=1e-3)
    assert model.training is False


def test_same_seed_same_trace():
    def run(seed: int) -> RoutingTrace:
        model, _ = train(_config(), steps=3, batch_size=4, seed=seed)
        return capture_heldout(model, num_tokens=64)

    first, second, other = run(1), run(1), run(2)
    for name in ("expert_ids", "weights", "scores"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    assert not np.array_equal(first.scores, other.scores)


@pytest.mark.parametrize("kind", GATE_KINDS)
def test_every_gate_kind_trains_and_captures(kind):
    model, history = train(_config(kind), steps=2, batch_size=4, seed=0)
    trace = capture_heldout(model, num_tokens=64)
    top_k = 1 if kind == "switch-top1" else 2
    assert trace.expert_ids.shape == (2, 64, top_k)
    assert trace.metadata["gate"]["kind"] == kind
    assert np.isfinite(history[-1][1])
    assert (trace.bias is not None) == (kind == "group-limited-sigmoid")
    ids = trace.expert_ids
    assert ids.min() >= 0 and ids.max() < 8
    if kind in ("device-limited", "group-limited-sigmoid"):
        # 8 experts over 4 simulated devices of 2, M = 2: at most 2 devices per token.
        params = trace.metadata["gate"]["params"]
        assert (params["group_size"], params["max_groups"], params["num_groups"]) == (2, 2, 4)
        devices = ids // 2
        assert all(len(set(row)) <= 2 for row in devices.reshape(-1, top_k).tolist())
    if kind == "group-limited-sigmoid":
        np.testing.assert_allclose(trace.weights.sum(-1), 1.0, atol=1e-5)  # normalised
        assert trace.scores.min() > 0 and trace.scores.max() < 1  # sigmoid, no bias


def test_v3_bias_moves_during_training_and_is_captured():
    model, _ = train(_config("group-limited-sigmoid"), steps=4, batch_size=4, seed=0)
    biases = np.stack([layer.gate.bias.numpy() for layer in model.moe_layers])
    assert np.abs(biases).max() > 0
    # Each step moves every unbalanced expert by exactly gamma = 1e-3.
    assert np.abs(biases).max() <= 4e-3 + 1e-9
    trace = capture_heldout(model, num_tokens=32)
    np.testing.assert_array_equal(trace.bias, biases)

    frozen, _ = train(
        _config("group-limited-sigmoid", bias_rate=0.0), steps=4, batch_size=4, seed=0
    )
    assert all(float(layer.gate.bias.abs().max()) == 0 for layer in frozen.moe_layers)


def test_capacity_drops_are_captured_as_minus_one():
    model, _ = train(_config(capacity_factor=0.5), steps=2, batch_size=4, seed=0)
    trace = capture_heldout(model, num_tokens=64)
    dropped = trace.expert_ids == -1
    assert dropped.any() and not dropped.all()
    assert (trace.weights[dropped] == 0).all()
    assert RoutingTrace.from_bytes(trace.to_bytes()).expert_ids.min() == -1


def test_bad_capture_input():
    model = TinyMoELM(_config())
    with pytest.raises(InputError, match="token ids"):
        capture_own(model, np.full((1, 8), 300))
    with pytest.raises(InputError, match="sequence ids"):
        capture_own(model, np.zeros((2, 8), dtype=np.int64), seq_ids=np.array([0]))
    with pytest.raises(InputError):
        capture_heldout(model, num_tokens=0)
    with pytest.raises(InputError):
        train(_config(), steps=0)


@pytest.mark.gpu
def test_training_and_capture_run_on_a_gpu_and_the_trace_says_so():
    """The live-GPU path: train a few steps on CUDA and capture there."""
    from moesim.traces.capture import capture_heldout
    from moesim.traces.model import tiny_config
    from moesim.traces.train import train

    model, history = train(tiny_config("group-limited-sigmoid"), steps=3, batch_size=2,
                           device="cuda")
    trace = capture_heldout(model, num_tokens=256)
    assert trace.metadata["device"].startswith("cuda:0 ")
    assert len(history) == 3


@pytest.mark.parametrize(("flags", "line"), [
    (["--experts", "1099511627776"], "--experts: 1,099,511,627,776 is out of range (allowed: "
                                     "1 to 256 for the small model; more takes seconds a "
                                     "step and GiBs)"),
    (["--experts", "100000"], "--experts: 100,000 is out of range"),
    (["--seed", "-1"], "--seed: -1 is out of range (allowed: 0 to 4,294,967,295)"),
    (["--tokens", "10000000"], "--tokens: 10,000,000 is out of range (allowed: 1 to 262,144)"),
    (["--steps", "100000"], "--steps: 100,000 is out of range (allowed: 1 to 10,000)"),
    (["--top-k", "100"], "--top-k: 100 is out of range (allowed: 1 to 64, the routed experts)"),
])
def test_capture_sizes_are_refused_before_training(tmp_path, flags, line):
    from typer.testing import CliRunner

    from moesim.cli.main import app

    out = tmp_path / "c.npz"
    result = CliRunner().invoke(app, ["capture", "--train", "--steps", "1", "--tokens", "256",
                                      "--out", str(out), *flags])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"moesim: error: {line}"), result.output
    assert not out.exists()
