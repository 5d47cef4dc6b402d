"""Stories about importing Megatron-Core router traces.

Megatron-Core writes ``router_trace_rank{rank}.jsonl`` per rank, one JSON record per
(step, block, layer), and optionally bfloat16 logits in ``logits_rank{rank}.bin``. The
files here are written by hand in that format. The import gives one RoutingTrace of one
step: every rank's tokens in rank order, layers sorted, and a clear error naming
``file:line`` and the field for anything malformed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moesim.errors import InputError
from moesim.tracefile.format import RoutingTrace
from moesim.tracefile.megatron import import_megatron

E = 8

# Exactly as Megatron's tracer writes it (json.dumps defaults), two ranks, two layers
# recorded out of order, two steps.
RANK0 = """\
{"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 3, "rank": 0, "num_tokens": 2, "topk": 2, "top_indices": [[1, 2], [3, 4]]}
{"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 1, "rank": 0, "num_tokens": 2, "topk": 2, "top_indices": [[0, 1], [2, 3]]}
{"step": 1, "stage": "pre_dispatch", "block": "decoder", "layer": 1, "rank": 0, "num_tokens": 1, "topk": 2, "top_indices": [[7, 6]]}
{"step": 1, "stage": "pre_dispatch", "block": "decoder", "layer": 3, "rank": 0, "num_tokens": 1, "topk": 2, "top_indices": [[5, 4]]}
"""  # noqa: E501
RANK1 = """\
{"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 1, "rank": 1, "num_tokens": 3, "topk": 2, "top_indices": [[4, 5], [6, 7], [0, 7]]}
{"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 3, "rank": 1, "num_tokens": 3, "topk": 2, "top_indices": [[5, 6], [7, 0], [1, 6]]}
{"step": 1, "stage": "pre_dispatch", "block": "decoder", "layer": 1, "rank": 1, "num_tokens": 1, "topk": 2, "top_indices": [[0, 2]]}
{"step": 1, "stage": "pre_dispatch", "block": "decoder", "layer": 3, "rank": 1, "num_tokens": 1, "topk": 2, "top_indices": [[1, 3]]}
"""  # noqa: E501


def write_ranks(root: Path, *texts: str) -> Path:
    for rank, text in enumerate(texts):
        (root / f"router_trace_rank{rank}.jsonl").write_text(text)
    return root


def record(layer: int, rank: int, top: list[list[int]], *, step: int = 0,
           block: str = "decoder", **extra) -> dict:
    return {"step": step, "stage": "pre_dispatch", "block": block, "layer": layer,
            "rank": rank, "num_tokens": len(top), "topk": len(top[0]) if top else 2,
            "top_indices": top, **extra}


def jsonl(*records: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def to_bf16_bytes(values: np.ndarray) -> bytes:
    """bfloat16 bytes of float32 values that bfloat16 represents exactly."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32)
    assert not (bits & 0xFFFF).any(), "pick values exact in bfloat16"
    return (bits >> 16).astype("<u2").tobytes()


# ---------------------------------------------------------------- the happy path


def test_two_ranks_concatenate_in_rank_order_with_sorted_layers(tmp_path):
    trace = import_megatron(write_ranks(tmp_path, RANK0, RANK1), num_experts=E)
    assert trace.metadata["layer_indices"] == [1, 3]
    # Layer 1: rank 0's two tokens, then rank 1's three.
    np.testing.assert_array_equal(trace.expert_ids[0],
                                  [[0, 1], [2, 3], [4, 5], [6, 7], [0, 7]])
    np.testing.assert_array_equal(trace.expert_ids[1],
                                  [[1, 2], [3, 4], [5, 6], [7, 0], [1, 6]])
    np.testing.assert_array_equal(trace.src_rank, [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(trace.seq_id, [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(trace.pos, [0, 1, 0, 1, 2])
    assert trace.scores is None
    np.testing.assert_array_equal(trace.weights, np.full((2, 5, 2), 0.5, dtype=np.float32))
    assert trace.metadata["weights"]["known"] is False
    assert trace.metadata["gate"] == {"kind": "unknown"}
    source = trace.metadata["source"]
    assert source["kind"] == "megatron-router-trace"
    assert source["step"] == 0 and source["ranks"] == [0, 1]
    assert [Path(f).name for f in source["files"]] == ["router_trace_rank0.jsonl",
                                                      "router_trace_rank1.jsonl"]


def test_the_import_saves_and_loads_as_a_valid_trace(tmp_path):
    trace = import_megatron(write_ranks(tmp_path, RANK0, RANK1), num_experts=E,
                            gate={"kind": "softmax-topk"})
    again = RoutingTrace.from_bytes(trace.to_bytes())
    np.testing.assert_array_equal(again.expert_ids, trace.expert_ids)
    assert again.metadata["gate"] == {"kind": "softmax-topk"}


def test_a_list_of_files_in_any_order_equals_the_directory(tmp_path):
    root = write_ranks(tmp_path, RANK0, RANK1)
    listed = import_megatron([root / "router_trace_rank1.jsonl",
                              root / "router_trace_rank0.jsonl"], num_experts=E)
    np.testing.assert_array_equal(listed.expert_ids,
                                  import_megatron(root, num_experts=E).expert_ids)
    np.testing.assert_array_equal(listed.src_rank, [0, 0, 1, 1, 1])


def test_another_step(tmp_path):
    trace = import_megatron(write_ranks(tmp_path, RANK0, RANK1), num_experts=E, step=1)
    np.testing.assert_array_equal(trace.expert_ids[:, :, 0], [[7, 0], [5, 1]])
    assert trace.metadata["source"]["step"] == 1


def test_default_step_is_the_first_present(tmp_path):
    shifted = RANK0.replace('"step": 0', '"step": 4').replace('"step": 1', '"step": 5')
    (tmp_path / "router_trace_rank0.jsonl").write_text(shifted)
    trace = import_megatron(tmp_path, num_experts=E)
    assert trace.metadata["source"]["step"] == 4 and trace.num_tokens == 2


def test_mtp_layers_only_on_request_and_after_the_decoder(tmp_path):
    text = jsonl(record(2, 0, [[0, 1]]), record(0, 0, [[2, 3]], block="mtp", mtp_idx=0),
                 record(1, 0, [[4, 5]]))
    (tmp_path / "router_trace_rank0.jsonl").write_text(text)
    plain = import_megatron(tmp_path, num_experts=E)
    assert plain.metadata["layer_indices"] == [1, 2]
    with_mtp = import_megatron(tmp_path, num_experts=E, include_mtp=True)
    assert with_mtp.metadata["layer_indices"] == [1, 2, 3]
    assert with_mtp.metadata["layers"][2] == {"block": "mtp", "mtp_idx": 0, "layer": 0}
    np.testing.assert_array_equal(with_mtp.expert_ids[:, 0], [[4, 5], [0, 1], [2, 3]])


def test_repeated_layer_records_are_micro_batches(tmp_path):
    """Training records every micro-batch: the k-th record of each layer is micro-batch k."""
    text = jsonl(record(0, 0, [[0, 1], [1, 2]]), record(1, 0, [[2, 3], [3, 4]]),
                 record(0, 0, [[4, 5]]), record(1, 0, [[6, 7]]))
    (tmp_path / "router_trace_rank0.jsonl").write_text(text)
    trace = import_megatron(tmp_path, num_experts=E)
    np.testing.assert_array_equal(trace.expert_ids[1], [[2, 3], [3, 4], [6, 7]])
    np.testing.assert_array_equal(trace.seq_id, [0, 0, 1])
    np.testing.assert_array_equal(trace.pos, [0, 1, 0])


def test_ranks_may_hold_different_token_counts(tmp_path):
    trace = import_megatron(write_ranks(tmp_path, RANK0, RANK1), num_experts=E)
    assert np.bincount(trace.src_rank).tolist() == [2, 3]


# ---------------------------------------------------------------- logits sidecar


LOGITS_0 = np.array([[0, 1, 2, -1, 0.5, 0, 0, -2], [3, 0, 0, 0, 1, 0.25, 0, 0]], np.float32)
LOGITS_1 = np.array([[1, 1, 1, 1, 1, 1, 1, 4]], np.float32)


def write_with_logits(root: Path) -> None:
    """Rank 0, two layers; the sidecar holds layer 0's logits, then layer 1's."""
    first = to_bf16_bytes(LOGITS_0)
    second = to_bf16_bytes(LOGITS_1.repeat(2, axis=0))
    (root / "logits_rank0.bin").write_bytes(first + second)
    text = jsonl(
        record(0, 0, [[2, 1], [0, 4]], logit_offset=0, logit_bytes=len(first),
               logit_shape=[2, E]),
        record(1, 0, [[7, 0], [7, 1]], logit_offset=len(first), logit_bytes=len(second),
               logit_shape=[2, E]),
    )
    (root / "router_trace_rank0.jsonl").write_text(text)


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_logits_give_scores_and_the_chosen_scores_as_weights(tmp_path, score_function):
    write_with_logits(tmp_path)
    trace = import_megatron(tmp_path, num_experts=E, score_function=score_function)
    logits = np.stack([LOGITS_0, LOGITS_1.repeat(2, axis=0)]).astype(np.float64)
    if score_function == "softmax":
        expected = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    else:
        expected = 1 / (1 + np.exp(-logits))
    assert trace.scores.dtype == np.float16
    np.testing.assert_allclose(trace.scores, expected, rtol=1e-3)
    chosen = np.take_along_axis(expected, trace.expert_ids.astype(int), axis=2)
    np.testing.assert_allclose(trace.weights, chosen, rtol=1e-6)
    assert trace.metadata["weights"] == {
        "known": True, "kind": "chosen-scores", "score_function": score_function,
        "note": "scores of the chosen experts, not renormalised"}


def test_missing_logits_sidecar(tmp_path):
    write_with_logits(tmp_path)
    (tmp_path / "logits_rank0.bin").unlink()
    with pytest.raises(InputError) as info:
        import_megatron(tmp_path, num_experts=E)
    message = str(info.value)
    assert "router_trace_rank0.jsonl:1" in message and "logits_rank0.bin" in message
    assert info.value.field == "logit_offset"


def test_truncated_logits_sidecar(tmp_path):
    write_with_logits(tmp_path)
    path = tmp_path / "logits_rank0.bin"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(InputError, match=r"router_trace_rank0\.jsonl:2.*ends before"):
        import_megatron(tmp_path, num_experts=E)


def test_logits_on_some_records_only(tmp_path):
    write_with_logits(tmp_path)
    path = tmp_path / "router_trace_rank0.jsonl"
    first, second = path.read_text().splitlines()
    second = json.loads(second)
    for name in ("logit_offset", "logit_bytes", "logit_shape"):
        del second[name]
    path.write_text(first + "\n" + json.dumps(second) + "\n")
    with pytest.raises(InputError, match=r"router_trace_rank0\.jsonl:2.*some records"):
        import_megatron(tmp_path, num_experts=E)


# ---------------------------------------------------------------- malformed input


GOOD = record(0, 0, [[0, 1], [2, 3]])


def with_(**changes) -> str:
    rec = {**GOOD, **changes}
    return json.dumps({k: v for k, v in rec.items() if v is not _DROP})


_DROP = object()

BAD_LINES = {
    "bad JSON": ('{"step": 0, "layer": ', None),
    "not an object": ("[1, 2, 3]", None),
    "missing field": (with_(top_indices=_DROP), "top_indices"),
    "missing step": (with_(step=_DROP), "step"),
    "negative layer": (with_(layer=-1), "layer"),
    "string step": (with_(step="0"), "step"),
    "unknown block": (with_(block="encoder"), "block"),
    "mtp without index": (with_(block="mtp"), "mtp_idx"),
    "other stage": (with_(stage="post_dispatch"), "stage"),
    "rows != num_tokens": (with_(num_tokens=3), "top_indices"),
    "cols != topk": (with_(topk=3), "top_indices"),
    "ragged": (with_(top_indices=[[0, 1], [2]]), "top_indices"),
    "float ids": (with_(top_indices=[[0.5, 1], [2, 3]]), "top_indices"),
    "id too large": (with_(top_indices=[[0, E], [2, 3]]), "top_indices"),
    "negative id": (with_(top_indices=[[0, -1], [2, 3]]), "top_indices"),
    "wrong rank": (with_(rank=1), "rank"),
    "logit shape": (with_(logit_offset=0, logit_bytes=32, logit_shape=[2, 4]), "logit_shape"),
    "logit bytes": (with_(logit_offset=0, logit_bytes=31, logit_shape=[2, E]), "logit_bytes"),
    "half the logit fields": (with_(logit_offset=0), "logit_bytes"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_malformed_record_names_file_line_and_field(tmp_path, case):
    line, field = BAD_LINES[case]
    text = jsonl(GOOD, record(1, 0, [[0, 1], [2, 3]])) + line + "\n"
    (tmp_path / "router_trace_rank0.jsonl").write_text(text)
    with pytest.raises(InputError) as info:
        import_megatron(tmp_path, num_experts=E)
    assert "router_trace_rank0.jsonl:3" in str(info.value)
    assert info.value.field == field
    assert info.value.allowed


def test_blank_lines_are_skipped_but_counted(tmp_path):
    text = jsonl(GOOD) + "\n\n" + with_(layer=-1) + "\n"
    (tmp_path / "router_trace_rank0.jsonl").write_text(text)
    with pytest.raises(InputError, match=r"router_trace_rank0\.jsonl:4"):
        import_megatron(tmp_path, num_experts=E)


def test_layers_with_different_token_counts_in_one_rank(tmp_path):
    text = jsonl(GOOD, record(1, 0, [[0, 1]]))
    (tmp_path / "router_trace_rank0.jsonl").write_text(text)
    with pytest.raises(InputError) as info:
        import_megatron(tmp_path, num_experts=E)
    assert "router_trace_rank0.jsonl:2" in str(info.value)
    assert info.value.field == "num_tokens"


def test_topk_differs_between_records(tmp_path):
    text = jsonl(GOOD, record(1, 0, [[0, 1, 2], [2, 3, 4]]))
    (tmp_path / "router_trace_rank0.jsonl").write_text(text)
    with pytest.raises(InputError) as info:
        import_megatron(tmp_path, num_experts=E)
    assert "router_trace_rank0.jsonl:2" in str(info.value) and info.value.field == "topk"


def test_a_rank_missing_a_layer(tmp_path):
    write_ranks(tmp_path, jsonl(GOOD, record(1, 0, [[0, 1]] * 2)), jsonl(record(0, 1, [[2, 3]])))
    with pytest.raises(InputError) as info:
        import_megatron(tmp_path, num_experts=E)
    assert "router_trace_rank1.jsonl" in str(info.value) and "decoder layer 1" in str(info.value)
    assert info.value.field == "layer"


def test_a_rank_missing_the_step(tmp_path):
    write_ranks(tmp_path, RANK0, jsonl(record(1, 1, [[0, 1]], step=1)))
    with pytest.raises(InputError) as info:
        import_megatron(tmp_path, num_experts=E)
    assert "router_trace_rank1.jsonl" in str(info.value)
    assert info.value.field == "step" and info.value.allowed == "1"


def test_an_absent_step(tmp_path):
    with pytest.raises(InputError, match=r"step.*allowed: 0, 1"):
        import_megatron(write_ranks(tmp_path, RANK0, RANK1), num_experts=E, step=7)


def test_two_files_of_one_rank(tmp_path):
    (tmp_path / "a.jsonl").write_text(jsonl(GOOD))
    (tmp_path / "b.jsonl").write_text(jsonl(GOOD))
    with pytest.raises(InputError) as info:
        import_megatron([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], num_experts=E)
    assert "b.jsonl" in str(info.value) and info.value.field == "rank"


def test_empty_file_directory_and_missing_file(tmp_path):
    (tmp_path / "router_trace_rank0.jsonl").write_text("\n")
    with pytest.raises(InputError, match="router_trace_rank0.jsonl: no records"):
        import_megatron(tmp_path, num_experts=E)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no router trace files"):
        import_megatron(empty, num_experts=E)
    with pytest.raises(InputError, match="router_trace_rank9.jsonl"):
        import_megatron([tmp_path / "router_trace_rank9.jsonl"], num_experts=E)


@pytest.mark.parametrize("kwargs,field", [
    ({"num_experts": 0}, "num_experts"), ({"num_experts": 2**15}, "num_experts"),
    ({"num_experts": E, "score_function": "relu"}, "score_function"),
    ({"num_experts": E, "step": -1}, "step"),
])
def test_bad_options(tmp_path, kwargs, field):
    write_ranks(tmp_path, RANK0)
    with pytest.raises(InputError) as info:
        import_megatron(tmp_path, **kwargs)
    assert info.value.field == field
