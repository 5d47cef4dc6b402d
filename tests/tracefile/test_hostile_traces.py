"""Stories about hostile trace inputs: files built to exhaust memory, the stack or time.

Whatever a trace archive, a Megatron JSONL file or a `moesim trace` flag holds, the
answer is one line on stderr, ``moesim: error: <file>: <field>: ...``, exit code 2, and
nothing is allocated before the input has been checked. The hostile files here are
small: a huge array needs only a hand-written .npy header.
"""

from __future__ import annotations

import io
import json
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import moesim
from moesim.errors import InputError
from moesim.tracefile import format as trace_format
from moesim.tracefile import megatron
from moesim.tracefile.format import RoutingTrace
from moesim.tracefile.megatron import import_megatron

REPO = Path(__file__).resolve().parents[2]
E, K = 8, 2


def small_trace(**overrides) -> RoutingTrace:
    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.permutation(E)[:K] for _ in range(6)]) for _ in range(2)])
    fields = dict(expert_ids=ids, weights=np.full(ids.shape, 0.5), seq_id=np.zeros(6, int),
                  pos=np.arange(6), metadata={"num_experts": E, "gate": {"kind": "test"},
                                              "source": {"kind": "test"}})
    fields.update(overrides)
    return RoutingTrace(**fields)


def members_of(trace: RoutingTrace) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(trace.to_bytes())) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def npy_header(shape: tuple[int, ...], descr: str = "<i2") -> bytes:
    """A version 1.0 .npy header declaring ``shape``, as numpy writes one."""
    text = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode("latin1")
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


def write_archive(path: Path, members: dict[str, bytes],
                  compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


# ---------------------------------------------------------------- trace archives


def _npy(data: bytes) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.frombuffer(data, dtype=np.uint8))
    return buffer.getvalue()


def test_metadata_nested_100000_deep_is_one_error_naming_the_file(tmp_path, one_error_line):
    members = members_of(small_trace())
    deep = b"[" * 100_000 + b"]" * 100_000
    members["metadata.npy"] = _npy(deep)
    path = write_archive(tmp_path / "deep.npz", members)
    line = one_error_line(["trace", "stats", str(path)], str(path), "metadata", "nested")
    assert "32" in line


def test_deep_metadata_through_a_scenario_is_one_error(tmp_path, one_error_line):
    members = members_of(small_trace())
    members["metadata.npy"] = _npy(b'{"a": ' * 50_000 + b"1" + b"}" * 50_000)
    path = write_archive(tmp_path / "deep.npz", members)
    one_error_line(["simulate", str(REPO / "examples" / "dsmoe16b-trace.yaml"),
                    "--set", f"trace={path}"], str(path), "metadata")


HUGE_HEADERS = {  # member: (declared shape, descr, bytes of data actually there)
    "expert_ids 10^12": ("expert_ids", (10**12,), "<i2", 0),
    "expert_ids 3 x 2^30 x 6": ("expert_ids", (3, 2**30, 6), "<i2", 0),
    "expert_ids 3 x 2^30 x 6 over 2 MiB": ("expert_ids", (3, 2**30, 6), "<i2", 2 << 20),
    "seq_id 2^40": ("seq_id", (2**40,), "<i4", 0),
    "metadata 2^40": ("metadata", (2**40,), "|u1", 0),
}


@pytest.mark.parametrize("case", sorted(HUGE_HEADERS))
@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_a_declared_shape_larger_than_the_member_is_refused_unread(tmp_path, case,
                                                                  compression, one_error_line):
    name, shape, descr, held = HUGE_HEADERS[case]
    members = members_of(small_trace())
    members[f"{name}.npy"] = npy_header(shape, descr) + bytes(held)
    path = write_archive(tmp_path / "huge.npz", members, compression)
    line = one_error_line(["trace", "stats", str(path)], str(path), f": {name}: ")
    assert f"{held:,}" in line


def test_more_layers_than_a_trace_may_hold_are_refused_from_the_header(tmp_path, one_error_line):
    members = members_of(small_trace())
    members["expert_ids.npy"] = npy_header((1025, 1, 1)) + bytes(2 * 1025)
    path = write_archive(tmp_path / "layers.npz", members)
    one_error_line(["trace", "stats", str(path)], str(path), "expert_ids", "1,024 layers")


def test_deflated_arrays_beyond_the_memory_budget_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(trace_format, "MAX_READ_BYTES", 100)
    path = write_archive(tmp_path / "zipped.npz", members_of(small_trace()),
                         zipfile.ZIP_DEFLATED)
    with pytest.raises(InputError, match="zipped.npz.*read into memory"):
        RoutingTrace.load(path)


def test_a_trace_no_simulation_could_hold_is_refused_on_construction():
    ids = np.zeros((1025, 1, 1), dtype=np.int16)
    with pytest.raises(InputError, match="1,024 layers"):
        small_trace(expert_ids=ids, weights=np.ones(ids.shape), seq_id=np.zeros(1, int),
                    pos=np.zeros(1, int))


def test_large_stored_traces_are_still_mapped(tmp_path, monkeypatch):
    monkeypatch.setattr(trace_format, "MAP_BYTES", 0)
    path = tmp_path / "ok.npz"
    small_trace().save(path)
    loaded = RoutingTrace.load(path)
    assert not loaded.expert_ids.flags.owndata and not loaded.expert_ids.flags.writeable


# ---------------------------------------------------------------- Megatron JSONL


def record(layer: int, top: list[list[int]], **extra) -> str:
    return json.dumps({"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": layer,
                       "rank": 0, "num_tokens": len(top), "topk": 2, "top_indices": top,
                       **extra}) + "\n"


def rank0(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "router_trace_rank0.jsonl"
    path.write_text(text)
    return path


def import_args(tmp_path: Path, source: Path) -> list[str]:
    return ["trace", "import", str(source), "--out", str(tmp_path / "out.npz"),
            "--experts", str(E)]


def test_a_megatron_line_nested_100000_deep_names_file_and_line(tmp_path, one_error_line):
    path = rank0(tmp_path, record(0, [[0, 1]]) + "[" * 100_000 + "]" * 100_000 + "\n")
    one_error_line(import_args(tmp_path, tmp_path), f"{path}:2", "nested deeper")
    assert not (tmp_path / "out.npz").exists()


def test_a_megatron_file_of_dev_zero_stops_at_the_line_limit(tmp_path, one_error_line):
    path = tmp_path / "router_trace_rank0.jsonl"
    path.symlink_to("/dev/zero")
    one_error_line(import_args(tmp_path, tmp_path), f"{path}:1", "longer than 64 MiB")


def test_the_line_limit_counts_bytes_without_the_newline(tmp_path, monkeypatch):
    line = record(0, [[0, 1]])
    monkeypatch.setattr(megatron, "MAX_LINE_BYTES", len(line) - 1)
    rank0(tmp_path, line)
    assert import_megatron(tmp_path, num_experts=E).num_tokens == 1
    rank0(tmp_path, line[:-1] + " \n")
    with pytest.raises(InputError, match=r"rank0\.jsonl:1: a line longer"):
        import_megatron(tmp_path, num_experts=E)


def test_only_the_imported_step_keeps_its_expert_ids(tmp_path):
    later = json.loads(record(0, [[2, 3]]))
    text = json.dumps({**later, "step": 5}) + "\n" + record(0, [[0, 1]])
    rank0(tmp_path, text)
    records = megatron._read_file(tmp_path / "router_trace_rank0.jsonl", num_experts=E,
                                  step=None)
    assert [r.ids_tk is None for r in records] == [True, False]
    assert import_megatron(tmp_path, num_experts=E, step=5).expert_ids.tolist() == [[[2, 3]]]


def test_a_step_of_zero_tokens_names_the_file(tmp_path, one_error_line):
    path = rank0(tmp_path, record(0, []) + record(1, []))
    one_error_line(import_args(tmp_path, tmp_path), str(path), "num_tokens", "no tokens")


def test_a_repeated_expert_names_file_and_line(tmp_path, one_error_line):
    path = rank0(tmp_path, record(0, [[0, 1]]) + record(1, [[3, 3]]))
    one_error_line(import_args(tmp_path, tmp_path), f"{path}:2", "top_indices",
                   "same expert twice")


# ---------------------------------------------------------------- trace synth / stats


@pytest.mark.parametrize("flags,field", [
    (["--layers", "100000"], "--layers"),
    (["--tokens", "2147483648"], "--tokens"),
    (["--layers", "1024", "--tokens", "131072"], "--tokens"),
])
def test_synth_refuses_traces_beyond_memory_before_allocating(tmp_path, flags, field,
                                                              one_error_line):
    out = tmp_path / "s.npz"
    start = time.perf_counter()
    one_error_line(["trace", "synth", "--out", str(out), "--experts", "64", "--top-k", "6",
                    *flags], field)
    assert time.perf_counter() - start < 5 and not out.exists()


@pytest.mark.parametrize("factor", ["inf", "1e300", "nan", "0", "10001"])
def test_stats_refuses_a_capacity_factor_without_meaning(tmp_path, factor, one_error_line):
    path = tmp_path / "t.npz"
    small_trace().save(path)
    one_error_line(["trace", "stats", str(path), "--capacity-factor", factor],
                   "--capacity-factor", "10,000")


# ---------------------------------------------------------------- replay


def trace_source(src_rank: np.ndarray):
    from moesim.routing.source import TraceSource

    tokens = src_rank.shape[0]
    ids = np.tile(np.arange(8, dtype=np.int16), (1, tokens, 1))
    trace = RoutingTrace(expert_ids=ids, weights=np.full(ids.shape, 0.125),
                         seq_id=np.zeros(tokens, int), pos=np.arange(tokens),
                         src_rank=src_rank, metadata={"num_experts": 256,
                                                      "gate": {"kind": "softmax-topk"},
                                                      "source": {"kind": "test"}})
    scenario = moesim.load_scenario(overrides=["model.num_layers=5", "mode=inference",
                                               "parallel.tokens_per_gpu=256",
                                               "parallel.micro_batches=1",
                                               "routing.max_devices=null"])
    return TraceSource(scenario, trace, gpus_per_domain=8, rng=np.random.default_rng(0))


def test_each_recorded_rank_keeps_its_tokens_in_trace_order():
    ranks = (np.arange(1000) * 7919) % 37
    source = trace_source(ranks)
    expected = [np.flatnonzero(ranks == r) for r in np.unique(ranks)]
    assert len(source.rank_tokens) == len(expected)
    for got, want in zip(source.rank_tokens, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_rank_per_token_is_grouped_in_linear_time():
    ranks = np.random.default_rng(0).permutation(200_000)
    start = time.perf_counter()
    source = trace_source(ranks)
    assert time.perf_counter() - start < 5
    assert [int(t[0]) for t in source.rank_tokens[:3]] == np.argsort(ranks)[:3].tolist()
