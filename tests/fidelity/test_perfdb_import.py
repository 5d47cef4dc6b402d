"""`moesim perfdb import`: aiconfigurator-core's measured latencies become a
moesim.recorded-table/1 table with the right rows, units and <NA> columns; the
Parquet file reads back equal; bad input exits 2 and writes nothing."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from moesim.cli import perfdb as perfdb_cmd
from moesim.cli.main import app
from moesim.errors import InputError
from moesim.fidelity.perfdb.importer import find_data_root, import_perfdb, package_version
from moesim.fidelity.perfdb.table import (
    COLUMNS,
    DTYPES,
    INT_COLUMNS,
    SCHEMA,
    read_table,
    table_to_parquet_bytes,
    validate_table,
)

runner = CliRunner()
H100 = "NVIDIA H100 80GB HBM3"


def _write(path: Path, rows: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path, index=False)


def make_layout(data: Path) -> Path:
    """A tiny copy of aiconfigurator-core's systems/data layout."""
    h100 = data / "h100_sxm"
    _write(h100 / "gemm/trtllm/1.3.0rc20/gemm_perf.parquet", {
        "framework": ["TRTLLM"] * 3, "version": ["1.3.0rc20"] * 3, "device": [H100] * 3,
        "op_name": ["gemm"] * 3, "kernel_source": ["torch_flow"] * 3,
        "gemm_dtype": ["bfloat16", "fp8", "bfloat16"],
        "m": [1, 128, 4096], "n": [7168, 7168, 2048], "k": [2048, 2048, 7168],
        "latency": [0.5, 0.25, 1.5]})
    _write(h100 / "moe/trtllm/1.3.0rc20/moe_perf.parquet", {
        "framework": ["TRTLLM"] * 3, "version": ["1.3.0rc20"] * 3, "device": [H100] * 3,
        "op_name": ["moe"] * 3, "kernel_source": ["moe_torch_flow"] * 3,
        "moe_dtype": ["fp8_block"] * 3, "num_tokens": [1, 2, 4], "hidden_size": [7168] * 3,
        "inter_size": [2048] * 3, "topk": [8] * 3, "num_experts": [256] * 3,
        "moe_tp_size": [1] * 3, "moe_ep_size": [8] * 3,
        "distribution": ["uniform", "power_law_1.01", "uniform"],
        "latency": [0.125, 0.0, 0.375]})  # the 0.0 row is dropped
    _write(h100 / "comm/nccl/2.29.2/nccl_perf.parquet", {
        "framework": ["TRTLLM"] * 2, "version": ["2.29.2"] * 2, "device": [H100] * 2,
        "op_name": ["all_reduce", "alltoall"], "kernel_source": ["NCCL"] * 2,
        "nccl_dtype": ["half", "half"], "num_gpus": [8, 4],
        "message_size": [1048576, 256], "latency": [0.0625, 0.01]})
    _write(h100 / "comm/sglang/0.5.12/wideep_deepep_normal_perf.parquet", {
        "framework": ["sglang"] * 2, "version": ["0.5.12"] * 2, "device": [H100] * 2,
        "op_name": ["normal"] * 2, "kernel_source": ["deepep"] * 2, "node_num": [1, 2],
        "hidden_size": [7168] * 2, "num_token": [128, 4096], "num_topk": [8] * 2,
        "num_experts": [256] * 2, "dispatch_sms": [20, 24],
        "dispatch_transmit_us": [30.0, 400.0], "dispatch_notify_us": [2.5, 0.0],
        "combine_sms": [16, 24], "combine_transmit_us": [40.0, 600.0],
        "combine_notify_us": [0.0, 1.5]})
    _write(h100 / "comm/sglang/0.5.12/wideep_deepep_ll_perf.parquet", {
        "framework": ["sglang"], "version": ["0.5.12"], "device": [H100], "op_name": ["ll"],
        "kernel_source": ["deepep"], "node_num": [2], "hidden_size": [7168],
        "num_token": [128], "num_topk": [8], "num_experts": [256],
        "combine_avg_t_us": [120.5], "combine_bandwidth_gbps": [50.0],
        "dispatch_avg_t_us": [80.25], "dispatch_bandwidth_gbps": [40.0]})
    # An old attention table without window_size: window is <NA>.
    _write(h100 / "attention/vllm/0.24.0/generation_attention_perf.parquet", {
        "framework": ["VLLM"], "version": ["0.24.0"], "device": [H100],
        "op_name": ["generation_attention"], "kernel_source": ["vllm_flash_attn"],
        "batch_size": [32], "isl": [1], "num_heads": [64], "num_key_value_heads": [8],
        "head_dim": [128], "beam_width": [1], "attn_dtype": ["bfloat16"],
        "kv_cache_dtype": ["fp8"], "step": [4095], "latency": [0.03125]})
    # Ignored: a table moesim does not import, and a reuse declaration without data.
    _write(h100 / "comm/trtllm/1.3.0rc20/custom_allreduce_perf.parquet",
           {"latency": [1.0]})
    (h100 / "gemm/trtllm/1.3.0rc23").mkdir(parents=True)
    (h100 / "gemm/trtllm/1.3.0rc23/reuse.yaml").write_text("reuse: []\n")
    _write(data / "h200_sxm/mla/trtllm/1.3.0rc20/context_mla_perf.parquet", {
        "framework": ["TRTLLM"], "version": ["1.3.0rc20"], "device": ["NVIDIA H200"],
        "op_name": ["mla_context"], "kernel_source": ["default"],
        "mla_dtype": ["bfloat16"], "kv_cache_dtype": ["bfloat16"], "num_heads": [128],
        "batch_size": [2], "isl": [1024], "tp_size": [1], "step": [0], "latency": [2.0]})
    (data / "l4").mkdir()  # a system folder without any table moesim imports
    return data


@pytest.fixture
def site(tmp_path) -> Path:
    """A site-packages folder holding aiconfigurator_core (data only) and its dist-info."""
    site = tmp_path / "site"
    make_layout(site / "aiconfigurator_core" / "systems" / "data")
    dist = site / "aiconfigurator_core-0.12.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.4\nName: aiconfigurator-core\n"
                                   "Version: 0.12.0\n")
    return site


@pytest.fixture
def data(site) -> Path:
    return site / "aiconfigurator_core" / "systems" / "data"


def _fake_spec(monkeypatch, location: Path | None) -> None:
    """Make find_spec("aiconfigurator_core") see ``location`` (None: not installed)."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name != "aiconfigurator_core":
            return real(name, *args, **kwargs)
        if location is None:
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(location)]
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def _row(frame: pd.DataFrame, id_: str) -> pd.Series:
    rows = frame[frame["id"] == id_]
    assert len(rows) == 1, id_
    return rows.iloc[0]


def _na(row: pd.Series, keep: set[str]) -> list[str]:
    """The shape columns of ``row`` that are <NA>, except those it should have."""
    return [c for c in INT_COLUMNS if c not in keep and not pd.isna(row[c])]


def test_importer_maps_every_table_to_rows(data):
    frame, provenance = import_perfdb(data)
    assert list(frame.columns) == list(COLUMNS)
    assert {c: str(frame[c].dtype) for c in COLUMNS} == DTYPES
    assert frame["id"].tolist() == [
        "h100_sxm/gemm/trtllm-1.3.0rc20/gemm_perf#0",
        "h100_sxm/gemm/trtllm-1.3.0rc20/gemm_perf#1",
        "h100_sxm/gemm/trtllm-1.3.0rc20/gemm_perf#2",
        "h100_sxm/moe/trtllm-1.3.0rc20/moe_perf#0",
        "h100_sxm/moe/trtllm-1.3.0rc20/moe_perf#2",
        "h100_sxm/attention/vllm-0.24.0/generation_attention_perf#0",
        "h100_sxm/comm/nccl-2.29.2/nccl_perf#0",
        "h100_sxm/comm/nccl-2.29.2/nccl_perf#1",
        "h100_sxm/comm/sglang-0.5.12/wideep_deepep_normal_perf#0:dispatch",
        "h100_sxm/comm/sglang-0.5.12/wideep_deepep_normal_perf#1:dispatch",
        "h100_sxm/comm/sglang-0.5.12/wideep_deepep_normal_perf#0:combine",
        "h100_sxm/comm/sglang-0.5.12/wideep_deepep_normal_perf#1:combine",
        "h100_sxm/comm/sglang-0.5.12/wideep_deepep_ll_perf#0:dispatch",
        "h100_sxm/comm/sglang-0.5.12/wideep_deepep_ll_perf#0:combine",
        "h200_sxm/mla/trtllm-1.3.0rc20/context_mla_perf#0",
    ]

    gemm = _row(frame, "h100_sxm/gemm/trtllm-1.3.0rc20/gemm_perf#2")
    assert (gemm["system"], gemm["op"], gemm["phase"]) == ("h100_sxm", "gemm", "")
    assert (gemm["m"], gemm["n"], gemm["k"]) == (4096, 2048, 7168)
    assert gemm["latency_us"] == 1500.0  # 1.5 ms
    assert (gemm["dtype"], gemm["kernel"], gemm["framework"], gemm["framework_version"],
            gemm["device"], gemm["file"], gemm["kv_dtype"], gemm["distribution"]) == (
        "bfloat16", "torch_flow", "trtllm", "1.3.0rc20", H100,
        "h100_sxm/gemm/trtllm/1.3.0rc20/gemm_perf.parquet", "", "")
    assert _na(gemm, {"m", "n", "k"}) == []
    assert math.isnan(gemm["tolerance"])

    moe = _row(frame, "h100_sxm/moe/trtllm-1.3.0rc20/moe_perf#2")
    assert [moe[c] for c in ("tokens", "hidden", "inter", "topk", "experts", "moe_tp",
                             "moe_ep")] == [4, 7168, 2048, 8, 256, 1, 8]
    assert (moe["latency_us"], moe["dtype"], moe["distribution"]) == (
        375.0, "fp8_block", "uniform")
    assert _na(moe, {"tokens", "hidden", "inter", "topk", "experts", "moe_tp", "moe_ep"}) == []

    attn = _row(frame, "h100_sxm/attention/vllm-0.24.0/generation_attention_perf#0")
    assert attn["op"] == "attention_generation"
    assert [attn[c] for c in ("batch", "isl", "step", "heads", "kv_heads", "head_dim")] == [
        32, 1, 4095, 64, 8, 128]
    assert pd.isna(attn["window"])  # the old table has no window_size column
    assert (attn["dtype"], attn["kv_dtype"], attn["latency_us"]) == ("bfloat16", "fp8", 31.25)

    nccl = frame[frame["op"] == "nccl"]
    assert nccl["phase"].tolist() == ["all_reduce", "alltoall"]
    assert nccl["gpus"].tolist() == [8, 4]
    assert nccl["bytes"].tolist() == [1048576, 256]
    assert nccl["latency_us"].tolist() == [62.5, 10.0]
    assert nccl["framework"].tolist() == ["nccl", "nccl"]

    normal = frame[frame["op"] == "deepep_normal"]
    assert normal["phase"].tolist() == ["dispatch", "dispatch", "combine", "combine"]
    assert normal["latency_us"].tolist() == [32.5, 400.0, 40.0, 601.5]  # transmit + notify
    assert normal["sms"].tolist() == [20, 24, 16, 24]
    assert normal["tokens"].tolist() == [128, 4096, 128, 4096]
    assert normal["nodes"].tolist() == [1, 2, 1, 2]
    assert normal["dtype"].tolist() == [""] * 4
    assert _na(normal.iloc[0], {"nodes", "hidden", "tokens", "topk", "experts", "sms"}) == []

    ll = frame[frame["op"] == "deepep_ll"]
    assert ll["latency_us"].tolist() == [80.25, 120.5]
    assert ll["sms"].isna().all()

    mla = _row(frame, "h200_sxm/mla/trtllm-1.3.0rc20/context_mla_perf#0")
    assert [mla[c] for c in ("heads", "batch", "isl", "tp", "step")] == [128, 2, 1024, 1, 0]
    assert (mla["op"], mla["latency_us"], mla["device"]) == ("mla_context", 2000.0,
                                                            "NVIDIA H200")

    assert provenance["package"] == "aiconfigurator-core"
    assert provenance["package_version"] == "0.12.0"
    assert provenance["root"] == str(data)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", provenance["imported_at"])
    assert provenance["rows"] == 15 and provenance["dropped_rows"] == 1
    assert provenance["files"]["h100_sxm/moe/trtllm/1.3.0rc20/moe_perf.parquet"] == {
        "rows": 3, "imported": 2, "dropped": 1}
    assert provenance["files"][
        "h100_sxm/comm/sglang/0.5.12/wideep_deepep_normal_perf.parquet"] == {
        "rows": 2, "imported": 4, "dropped": 0}
    assert len(provenance["files"]) == 7
    assert provenance["frameworks"] == {"nccl": ["2.29.2"], "sglang": ["0.5.12"],
                                        "trtllm": ["1.3.0rc20"], "vllm": ["0.24.0"]}
    assert provenance["systems"] == ["h100_sxm", "h200_sxm"]
    # What the importer builds already passes the schema's checks.
    pd.testing.assert_frame_equal(validate_table(frame, source="import"), frame)


def test_filters_select_systems_ops_and_frameworks(data, site):
    frame, _ = import_perfdb(data, systems=["h200_sxm"])
    assert frame["id"].tolist() == ["h200_sxm/mla/trtllm-1.3.0rc20/context_mla_perf#0"]
    frame, provenance = import_perfdb(data, ops=["deepep_normal", "nccl"])
    assert frame["op"].tolist() == ["nccl"] * 2 + ["deepep_normal"] * 4
    assert provenance["ops"] == ["nccl", "deepep_normal"]
    frame, _ = import_perfdb(data, frameworks=["sglang"], ops=["deepep_ll"])
    assert frame["phase"].tolist() == ["dispatch", "combine"]
    # The package folder works as a root too.
    frame, _ = import_perfdb(site / "aiconfigurator_core", systems=["h200_sxm"])
    assert len(frame) == 1


@pytest.mark.parametrize(("kwargs", "field", "allowed"), [
    ({"systems": ["h999"]}, "--system", "h100_sxm, h200_sxm"),
    ({"systems": ["l4"]}, "--system", "h100_sxm, h200_sxm"),
    ({"ops": ["attention"]}, "--op", "attention_context, attention_generation, deepep_ll"),
    ({"frameworks": ["tensorrt"]}, "--framework", "nccl, sglang, trtllm, vllm"),
    ({"systems": ["h200_sxm"], "ops": ["gemm"]}, "--op", "mla_context"),
    ({"systems": ["h200_sxm"], "frameworks": ["nccl"]}, "--framework", "trtllm"),
])
def test_unknown_filter_values_name_what_exists(data, kwargs, field, allowed):
    with pytest.raises(InputError) as err:
        import_perfdb(data, **kwargs)
    assert err.value.field == field
    assert allowed in err.value.allowed


def test_root_errors(tmp_path, data):
    with pytest.raises(InputError, match="not a folder"):
        import_perfdb(tmp_path / "nowhere")
    with pytest.raises(InputError, match="no aiconfigurator-core tables"):
        import_perfdb(tmp_path)
    _write(data / "h100_sxm/gemm/trtllm/1.3.0rc20/gemm_perf.parquet",
           {"m": [1], "n": [2], "gemm_dtype": ["fp8"], "latency": [0.5]})
    with pytest.raises(InputError) as err:
        import_perfdb(data)
    assert err.value.field == "k"
    assert err.value.source == "h100_sxm/gemm/trtllm/1.3.0rc20/gemm_perf.parquet"


def test_find_data_root_without_importing(monkeypatch, site, tmp_path):
    _fake_spec(monkeypatch, site / "aiconfigurator_core")
    assert find_data_root() == site / "aiconfigurator_core" / "systems" / "data"
    _fake_spec(monkeypatch, None)
    with pytest.raises(InputError) as err:
        find_data_root()
    assert str(err.value) == (
        "--root: aiconfigurator-core is not installed (allowed: pip install "
        "'moesim[perfdb]' (aiconfigurator-core==0.12.0), or --root PATH to its "
        "systems/data folder)")
    # Without a dist-info the version is unknown, or comes from a version file.
    bare = make_layout(tmp_path / "bare" / "aiconfigurator_core" / "systems" / "data")
    assert package_version(bare) == "unknown"
    (bare.parent.parent / "_version.py").write_text('__version__ = "0.12.0rc1"\n')
    assert package_version(bare) == "0.12.0rc1"


def test_parquet_round_trip_keeps_table_and_provenance(data):
    frame, provenance = import_perfdb(data)
    blob = table_to_parquet_bytes(frame, provenance)
    path = data.parent / "t.parquet"
    path.write_bytes(blob)
    back, meta = read_table(path)
    pd.testing.assert_frame_equal(back, frame)
    assert meta == provenance


def _valid_table(data) -> pd.DataFrame:
    return import_perfdb(data)[0]


def _set(frame, column, index, value):
    frame = frame.copy()
    frame.loc[index, column] = value
    return frame


@pytest.mark.parametrize(("change", "field", "allowed"), [
    (lambda f: f.drop(columns=["sms"]), "sms", "the columns of moesim.recorded-table/1"),
    (lambda f: f.assign(extra=1), "extra", "latency_us, tolerance"),
    (lambda f: _set(f, "op", 3, "all2all"), "op", "gemm, moe, attention_context"),
    (lambda f: _set(f, "phase", 0, "dispatch"), "phase", "''"),
    (lambda f: _set(f, "phase", 6, "broadcast"), "phase", "'all_gather', 'all_reduce'"),
    (lambda f: _set(f, "id", 1, f["id"].iloc[0]), "id", "unique"),
    (lambda f: _set(f, "latency_us", 2, 0.0), "latency_us", "> 0"),
    (lambda f: _set(f, "latency_us", 2, np.nan), "latency_us", "> 0"),
    (lambda f: _set(f, "tolerance", 2, -0.5), "tolerance", "> 0"),
    (lambda f: f.assign(m=f["m"].astype("Float64") + 0.5), "m", "whole numbers"),
    (lambda f: f.assign(k=f["k"].astype(str)), "k", "whole numbers"),
    (lambda f: _set(f, "m", 0, -1), "m", ">= 0"),
    (lambda f: f.assign(latency_us=f["latency_us"].astype(str)), "latency_us", "float64"),
    (lambda f: f.assign(dtype=f["m"]), "dtype", "a string"),
    (lambda f: _set(f, "kernel", 0, None), "kernel", "a string"),
])
def test_validate_table_names_the_column(data, change, field, allowed):
    with pytest.raises(InputError) as err:
        validate_table(change(_valid_table(data)), source="subset.parquet")
    assert err.value.source == "subset.parquet"
    assert err.value.field == field
    assert allowed in err.value.allowed


def test_validate_table_casts_and_accepts_tolerance(data):
    frame = _valid_table(data)
    loose = frame.assign(m=frame["m"].astype("float64"), tolerance=0.1,
                         dtype=frame["dtype"].astype(object))
    checked = validate_table(loose, source="x")
    assert {c: str(checked[c].dtype) for c in COLUMNS} == DTYPES
    assert checked["m"].tolist()[:3] == [1, 128, 4096]
    assert checked["tolerance"].tolist() == [0.1] * len(frame)


def test_read_table_rejects_other_files(tmp_path):
    text = tmp_path / "notes.parquet"
    text.write_text("not parquet at all")
    with pytest.raises(InputError, match="not a Parquet file") as err:
        read_table(text)
    assert err.value.source == str(text)
    other = tmp_path / "other.parquet"
    pd.DataFrame({"a": [1]}).to_parquet(other)
    with pytest.raises(InputError) as err:
        read_table(other)
    assert (err.value.field, err.value.allowed) == ("moesim.schema", SCHEMA)
    assert "missing" in err.value.problem
    with pytest.raises(InputError, match="cannot read file"):
        read_table(tmp_path / "nope.parquet")


def test_read_table_rejects_a_wrong_schema_name(data, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame, provenance = import_perfdb(data)
    table = pq.read_table(pa.BufferReader(table_to_parquet_bytes(frame, provenance)))
    meta = dict(table.schema.metadata)
    meta[b"moesim.schema"] = b"moesim.recorded-table/9"
    path = tmp_path / "future.parquet"
    pq.write_table(table.replace_schema_metadata(meta), path)
    with pytest.raises(InputError) as err:
        read_table(path)
    assert str(err.value) == (f"{path}: moesim.schema: schema is 'moesim.recorded-table/9' "
                              "(allowed: moesim.recorded-table/1)")


def test_cli_import_writes_a_table_that_reads_back(data, tmp_path):
    out = tmp_path / "out" / "x.parquet"
    result = runner.invoke(app, ["perfdb", "import", "--root", str(data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["h100_sxm", "h200_sxm", "total"]
    assert lines[1].split() == ["rows"]
    assert lines[2].split() == ["gemm", "3", "0", "3"]
    assert lines[3].split() == ["moe", "2", "0", "2"]
    assert lines[-3].split() == ["total", "14", "1", "15"]
    assert "15 rows from 7 files of aiconfigurator-core 0.12.0" in result.stdout
    assert "1 measurements dropped" in result.stdout
    back, provenance = read_table(out)
    frame, expected = import_perfdb(data)
    pd.testing.assert_frame_equal(back, frame)
    assert provenance == expected
    assert not list(out.parent.glob(".*.tmp"))


def test_cli_uses_the_installed_package(monkeypatch, site, tmp_path):
    _fake_spec(monkeypatch, site / "aiconfigurator_core")
    out = tmp_path / "x.parquet"
    result = runner.invoke(app, ["perfdb", "import", "--system", "h200_sxm", "--op",
                                 "mla_context", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert read_table(out)[0]["latency_us"].tolist() == [2000.0]


def test_cli_without_the_package_exits_2(monkeypatch, tmp_path):
    _fake_spec(monkeypatch, None)
    out = tmp_path / "x.parquet"
    result = runner.invoke(app, ["perfdb", "import", "--out", str(out)])
    assert result.exit_code == 2
    assert "pip install 'moesim[perfdb]'" in result.stderr
    assert result.stderr.startswith("moesim: error: --root: ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--system", "h999"], "--system: unknown value 'h999' (allowed: h100_sxm, h200_sxm)"),
    (["--op", "mla"], "--op: unknown value 'mla'"),
    (["--framework", "trt"], "--framework: unknown value 'trt' (allowed: nccl, sglang, "
                             "trtllm, vllm)"),
])
def test_cli_bad_filters_exit_2_and_write_nothing(data, tmp_path, args, message):
    out = tmp_path / "x.parquet"
    result = runner.invoke(app, ["perfdb", "import", "--root", str(data), *args,
                                 "--out", str(out)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"moesim: error: {message}")
    assert "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_cli_bad_out_exits_2(data, tmp_path):
    (tmp_path / "file").write_text("")
    for out in (tmp_path, tmp_path / "file" / "x.parquet"):
        result = runner.invoke(app, ["perfdb", "import", "--root", str(data),
                                     "--out", str(out)])
        assert result.exit_code == 2 and "--out" in result.stderr
        assert result.stdout == ""


def docstring_examples() -> list[str]:
    doc = perfdb_cmd.import_.__doc__ or ""
    return re.findall(r"^\s+moesim (.+)$", doc.split("Examples:")[-1], flags=re.M)


def test_the_command_documents_examples():
    assert len(docstring_examples()) >= 2


@pytest.mark.parametrize("example", docstring_examples())
def test_documented_examples_run(example, tmp_path, monkeypatch):
    make_layout(tmp_path / "aic" / "systems" / "data")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, example.split())
    assert result.exit_code == 0, result.output
    out = re.search(r"--out (\S+)", example).group(1)
    frame, _ = read_table(tmp_path / out)
    assert len(frame) > 0


def test_a_corrupt_source_table_names_the_file(data):
    (data / "h200_sxm/mla/trtllm/1.3.0rc20/context_mla_perf.parquet").write_text("oops")
    with pytest.raises(InputError, match="cannot read the table") as err:
        import_perfdb(data)
    assert err.value.source == "h200_sxm/mla/trtllm/1.3.0rc20/context_mla_perf.parquet"
    assert import_perfdb(data, systems=["h100_sxm"])[1]["rows"] == 14
