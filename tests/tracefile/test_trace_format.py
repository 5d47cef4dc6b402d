"""Stories about the routing-trace file (schema ``moesim.trace/1``).

A trace is one ``.npz`` archive of plain arrays plus its metadata as JSON bytes, read
without pickle. Whatever a user hands us, loading either returns a valid trace with the
schema's dtypes or raises one InputError that names the file and the field at fault.
"""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.errors import InputError
from moesim.tracefile import format as trace_format
from moesim.tracefile.format import SCHEMA, RoutingTrace

E, K, L, T = 8, 2, 3, 6


@pytest.fixture(autouse=True, params=["read", "mapped"])
def loading(request, monkeypatch):
    """Every story twice: files read whole, and stored arrays mapped however small."""
    if request.param == "mapped":
        monkeypatch.setattr(trace_format, "MAP_BYTES", 0)
    return request.param


def make_trace(**overrides) -> RoutingTrace:
    rng = np.random.default_rng(0)
    ids_ltk = np.stack([np.stack([rng.permutation(E)[:K] for _ in range(T)]) for _ in range(L)])
    ids_ltk[1, 2, 1] = -1  # one dropped slot
    scores_lte = rng.dirichlet(np.ones(E), size=(L, T))
    fields = dict(
        expert_ids=ids_ltk,
        weights=np.take_along_axis(scores_lte, np.maximum(ids_ltk, 0), axis=2),
        scores=scores_lte,
        bias=rng.normal(size=(L, E)),
        seq_id=np.array([0, 0, 0, 1, 1, 1]),
        pos=np.array([0, 1, 2, 0, 1, 2]),
        src_rank=np.array([0, 0, 0, 1, 1, 1]),
        metadata={"num_experts": E, "top_k": K, "layer_indices": [1, 2, 3],
                  "gate": {"kind": "softmax-topk"},
                  "source": {"kind": "test", "note": "ünïcode ok"}},
    )
    fields.update(overrides)
    return RoutingTrace(**fields)


def archive(**arrays) -> bytes:
    """A hand-made .npz; ``metadata`` may be a dict (JSON-encoded here) or raw bytes."""
    meta = arrays.pop("metadata", None)
    if isinstance(meta, dict):
        meta = json.dumps(meta).encode()
    if meta is not None:
        arrays["metadata"] = np.frombuffer(meta, dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def good_arrays() -> dict:
    trace = make_trace()
    arrays = {name: getattr(trace, name) for name in
              ("expert_ids", "weights", "scores", "bias", "seq_id", "pos", "src_rank")}
    arrays["metadata"] = dict(trace.metadata)
    return arrays


def assert_same(a: RoutingTrace, b: RoutingTrace) -> None:
    for name in ("expert_ids", "weights", "scores", "bias", "seq_id", "pos", "src_rank"):
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is None and y is None, name
            continue
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    assert a.metadata == b.metadata


# ---------------------------------------------------------------- round trips


def test_construction_normalises_dtypes_and_fills_metadata():
    """Arrays come in as int64/float64 and leave in the schema's dtypes."""
    trace = make_trace()
    assert trace.expert_ids.dtype == np.int16
    assert trace.weights.dtype == np.float32
    assert trace.scores.dtype == np.float16
    assert trace.bias.dtype == np.float32
    assert trace.seq_id.dtype == trace.pos.dtype == trace.src_rank.dtype == np.int32
    assert trace.metadata["schema"] == SCHEMA
    assert (trace.num_layers, trace.num_tokens, trace.top_k, trace.num_experts) == (L, T, K, E)


def test_bytes_round_trip_preserves_arrays_dtypes_and_metadata():
    trace = make_trace()
    again = RoutingTrace.from_bytes(trace.to_bytes())
    assert_same(trace, again)


def test_file_round_trip_and_plain_numpy_can_read_it_without_pickle(tmp_path):
    path = tmp_path / "t.npz"
    trace = make_trace()
    trace.save(path)
    assert_same(trace, RoutingTrace.load(path))
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == sorted(
            ["expert_ids", "weights", "scores", "bias", "seq_id", "pos", "src_rank", "metadata"])
        assert json.loads(npz["metadata"].tobytes())["schema"] == SCHEMA


def test_optional_arrays_stay_absent(tmp_path):
    trace = make_trace(scores=None, bias=None, src_rank=None)
    path = tmp_path / "minimal.npz"
    trace.save(path)
    again = RoutingTrace.load(path)
    assert again.scores is None and again.bias is None and again.src_rank is None
    with np.load(path, allow_pickle=False) as npz:
        assert "scores" not in npz.files


@settings(max_examples=25, deadline=None)
@given(n_layers=st.integers(1, 3), n_tokens=st.integers(1, 5), top_k=st.integers(1, 4),
       extra=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_any_valid_trace_round_trips(n_layers, n_tokens, top_k, extra, seed):
    rng = np.random.default_rng(seed)
    n_experts = top_k + extra
    # K distinct experts per token, some slots dropped (-1), never a whole layer.
    ids = rng.permuted(np.broadcast_to(np.arange(n_experts), (n_layers, n_tokens, n_experts)),
                       axis=-1)[..., :top_k].copy()
    ids[(rng.random(ids.shape) < 0.3) & (np.arange(n_tokens) > 0)[None, :, None]] = -1
    trace = RoutingTrace(
        expert_ids=ids, weights=rng.random((n_layers, n_tokens, top_k)),
        seq_id=np.zeros(n_tokens, dtype=np.int32), pos=np.arange(n_tokens),
        metadata={"num_experts": n_experts, "gate": {}, "source": {"kind": "hypothesis"}})
    assert_same(trace, RoutingTrace.from_bytes(trace.to_bytes()))


# ---------------------------------------------------------------- damaged files


def load_error(tmp_path, data: bytes, name: str = "bad.npz") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(InputError) as info:
        RoutingTrace.load(path)
    message = str(info.value)
    assert name in message
    return message


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(InputError, match="nope.npz"):
        RoutingTrace.load(tmp_path / "nope.npz")


@pytest.mark.parametrize("cut", [0, 2, 30, 200, -200, -22, -1])
def test_truncated_file(tmp_path, cut):
    data = make_trace().to_bytes()
    load_error(tmp_path, data[:cut])


def test_random_bytes(tmp_path):
    data = np.random.default_rng(1).bytes(2000)
    assert "not a .npz" in load_error(tmp_path, data)


def test_random_bytes_behind_a_zip_signature(tmp_path):
    data = b"PK\x03\x04" + np.random.default_rng(2).bytes(2000)
    load_error(tmp_path, data)


def test_every_single_byte_flip_is_rejected_or_harmless():
    """Damage anywhere (headers, compressed data, CRCs) gives InputError or, where the
    byte is one zip ignores (timestamps, ...), the very same trace: never a crash."""
    trace = make_trace()
    data = trace.to_bytes()
    for i in range(len(data)):
        damaged = bytearray(data)
        damaged[i] ^= 0xFF
        try:
            again = RoutingTrace.from_bytes(bytes(damaged), source="flip.npz")
        except InputError as err:
            assert "flip.npz" in str(err)
        else:
            assert_same(trace, again)


@pytest.mark.parametrize("missing", ["expert_ids", "weights", "seq_id", "pos", "metadata"])
def test_missing_array(tmp_path, missing):
    arrays = good_arrays()
    del arrays[missing]
    assert missing in load_error(tmp_path, archive(**arrays))


def test_wrong_shapes(tmp_path):
    cases = {
        "expert_ids": lambda a: a["expert_ids"][0],  # 2-D
        "weights": lambda a: a["weights"][:, :-1],
        "scores": lambda a: a["scores"][..., :-1],
        "bias": lambda a: a["bias"][:, :-1],
        "seq_id": lambda a: a["seq_id"][:-1],
        "pos": lambda a: a["pos"].reshape(2, 3),
        "src_rank": lambda a: np.zeros(T + 1, dtype=np.int32),
    }
    for field, change in cases.items():
        arrays = good_arrays()
        arrays[field] = change(arrays)
        message = load_error(tmp_path, archive(**arrays))
        assert f": {field}" in message, (field, message)


@pytest.mark.parametrize("bad_id", [E, 99, -2])
def test_expert_ids_out_of_range(tmp_path, bad_id):
    arrays = good_arrays()
    arrays["expert_ids"] = arrays["expert_ids"].copy()
    arrays["expert_ids"][0, 0, 0] = bad_id
    message = load_error(tmp_path, archive(**arrays))
    assert "expert_ids" in message and f"0..{E - 1}" in message


@pytest.mark.parametrize("field", ["weights", "scores", "bias"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf_values(tmp_path, field, value):
    arrays = good_arrays()
    arrays[field] = arrays[field].astype(np.float32)
    arrays[field].flat[3] = value
    message = load_error(tmp_path, archive(**arrays))
    assert f": {field}" in message and "NaN" in message


def test_text_weights_are_rejected_not_crashed(tmp_path):
    arrays = good_arrays()
    arrays["weights"] = np.full(arrays["weights"].shape, "x")
    assert ": weights" in load_error(tmp_path, archive(**arrays))


def test_negative_positions(tmp_path):
    arrays = good_arrays()
    arrays["pos"] = -arrays["pos"] - 1
    assert ": pos" in load_error(tmp_path, archive(**arrays))


def test_unknown_schema_version(tmp_path):
    arrays = good_arrays()
    arrays["metadata"]["schema"] = "moesim.trace/99"
    message = load_error(tmp_path, archive(**arrays))
    assert "metadata.schema" in message and SCHEMA in message


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b'[1, 2]', b'"text"', b""])
def test_metadata_not_a_json_object(tmp_path, raw):
    arrays = good_arrays()
    arrays["metadata"] = raw
    assert ": metadata" in load_error(tmp_path, archive(**arrays))


@pytest.mark.parametrize("key", ["num_experts", "gate", "source"])
def test_missing_metadata_key(tmp_path, key):
    arrays = good_arrays()
    del arrays["metadata"][key]
    arrays.pop("scores")  # scores would supply num_experts
    assert f"metadata.{key}" in load_error(tmp_path, archive(**arrays))


@pytest.mark.parametrize("key,value", [("num_experts", 0), ("num_experts", "8"),
                                       ("top_k", K + 1), ("layer_indices", [0]),
                                       ("layer_indices", 3)])
def test_inconsistent_metadata(tmp_path, key, value):
    arrays = good_arrays()
    arrays["metadata"][key] = value
    assert f"metadata.{key}" in load_error(tmp_path, archive(**arrays))


def test_unknown_extra_array(tmp_path):
    arrays = good_arrays()
    arrays["logits"] = np.zeros((L, T, E), dtype=np.float32)
    message = load_error(tmp_path, archive(**arrays))
    assert ": logits" in message and "expert_ids" in message


def test_pickled_object_array_is_refused(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, value in good_arrays().items():
            if name == "metadata":
                value = np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)
            if name == "weights":
                value = np.array([{"evil": 1}], dtype=object)
            member = io.BytesIO()
            np.save(member, value, allow_pickle=True)
            zf.writestr(f"{name}.npy", member.getvalue())
    load_error(tmp_path, buffer.getvalue())


def test_values_beyond_float16_fail_on_construction_not_on_reload():
    """Scores are stored as float16: 1e6 would become inf and the file unreadable."""
    with pytest.raises(InputError, match="scores"):
        make_trace(scores=np.full((L, T, E), 1e6))


# ---------------------------------------------------------------- stored, mapped arrays


def member_offsets(path) -> dict:
    """Where each member's array data starts in the file."""
    offsets = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
        for info in zf.infolist():
            assert info.compress_type == zipfile.ZIP_STORED, info.filename
            raw.seek(info.header_offset + 26)
            name_len, extra_len = np.frombuffer(raw.read(4), dtype="<u2")
            raw.seek(info.header_offset + 30 + int(name_len) + int(extra_len))
            np.lib.format.read_array_header_1_0(raw) if np.lib.format.read_magic(raw) == (
                1, 0) else np.lib.format.read_array_header_2_0(raw)
            offsets[info.filename] = raw.tell()
    return offsets


def test_arrays_are_stored_64_byte_aligned_and_mapped_read_only(tmp_path, loading):
    path = tmp_path / "t.npz"
    trace = make_trace()
    trace.save(path)
    assert all(offset % 64 == 0 for offset in member_offsets(path).values())
    again = RoutingTrace.load(path)
    assert_same(trace, again)
    assert again.scores.flags.writeable == (loading == "read")
    for layer in range(L):  # handing back a layer's pages keeps its data readable
        again.release(layer)
    assert_same(trace, again)


def test_saving_over_a_mapped_file_leaves_its_reader_the_old_data(tmp_path):
    path = tmp_path / "t.npz"
    first = make_trace()
    first.save(path)
    mapped = RoutingTrace.load(path)
    second = make_trace(scores=np.full((L, T, E), 0.5), bias=None)
    second.save(path)
    assert_same(first, mapped)
    assert_same(second, RoutingTrace.load(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npz"]  # no temporary left


def test_deflated_archives_still_load(tmp_path):
    arrays = good_arrays()
    arrays["metadata"] = np.frombuffer(json.dumps(arrays["metadata"]).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    path = tmp_path / "old.npz"
    path.write_bytes(buffer.getvalue())
    assert_same(make_trace(), RoutingTrace.load(path))


def test_damaged_files_on_disk_are_rejected_or_harmless(tmp_path):
    """Flipped bytes in a file that is mapped (no CRC is checked on mapped data): an
    InputError, or a valid trace, never a crash."""
    data = make_trace().to_bytes()
    path = tmp_path / "flip.npz"
    for i in range(0, len(data), 3):
        damaged = bytearray(data)
        damaged[i] ^= 0xFF
        path.write_bytes(bytes(damaged))
        try:
            again = RoutingTrace.load(path)
        except InputError as err:
            assert "flip.npz" in str(err)
        else:
            assert again.expert_ids.shape == (L, T, K)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_repeated_experts_are_found_whatever_the_top_k(data):
    """The slot-by-slot check (K <= 16) and the sorting one (larger K) agree with the
    definition: some row names an expert >= 0 twice."""
    from moesim.tracefile.format import repeats_an_expert

    top_k = data.draw(st.integers(1, 20))
    rows = data.draw(st.integers(1, 30))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    ids = rng.integers(-1, data.draw(st.integers(1, 40)), (rows, top_k)).astype(np.int16)
    expected = any(len({e for e in row if e >= 0}) < sum(e >= 0 for e in row)
                   for row in ids.tolist())
    assert repeats_an_expert(ids) == expected
