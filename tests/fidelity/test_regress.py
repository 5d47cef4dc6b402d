"""Regression against recorded GPU runs: the shipped runs pass, a measured value moved
beyond its tolerance fails, bad files name their file and field, MAPE is what it says."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import yaml

from moesim.cli.regress import format_runs as format_report
from moesim.config.loading import hardware_preset
from moesim.errors import InputError
from moesim.fidelity.regress import regress, simulate_run
from moesim.fidelity.runs import KNOWN_GAPS, gpu_runs_dir, load_runs
from moesim.topologies import load_topology

SHIPPED = gpu_runs_dir()

VALID = {
    "schema": "moesim.recorded-run/1",
    "source": {"repo": "example/repo", "path": "README.md", "commit": "abc", "note": "test"},
    "runs": [
        {
            "id": "gemm",
            "topology": "h800-node",
            "gpus": 1,
            "workload": {"kind": "dense-gemm", "m": 4096, "n": 4096, "k": 7168},
            "measured": {"tflops": {"value": 1286.35}},
            "tolerance": 0.1,
        },
        {
            "id": "a2a",
            "topology": "dgx-h100-superpod",
            "gpus": 8,
            "workload": {"kind": "alltoall", "bytes_per_rank": 2**30},
            "measured": {"busbw_GBps": {"value": 350.0}},
            "tolerance": 0.1,
        },
    ],
}


def write(tmp_path, data, name="runs.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def test_shipped_runs_pass_and_known_gaps_stay_out():
    report = regress([SHIPPED])
    assert report.rows, "no shipped runs found"
    assert report.passed, format_report(report)
    assert not any(row.file.endswith(KNOWN_GAPS) for row in report.rows)
    # Every shipped file is valid on its own and ran.
    files = {p.name for p in SHIPPED.glob("*.yaml")} - {KNOWN_GAPS}
    assert {"deepep_intranode.yaml", "deepgemm_grouped_h800.yaml", "deepgemm_dense_h800.yaml",
            "nccl_alltoall_h100.yaml"} <= files
    assert {r.file.rsplit("/", 1)[-1] for r in report.rows} == files


def test_known_gaps_run_on_request_and_fail_as_data():
    gaps = regress([SHIPPED / KNOWN_GAPS])
    assert gaps.rows and not gaps.passed
    everything = regress([SHIPPED], include_known_gaps=True)
    assert len(everything.rows) == len(regress([SHIPPED]).rows) + len(gaps.rows)


def test_measured_value_beyond_tolerance_fails_that_row(tmp_path):
    data = yaml.safe_load((SHIPPED / "deepgemm_grouped_h800.yaml").read_text())
    target = data["runs"][0]
    target["measured"]["tflops"]["value"] *= 1 + 3 * target["tolerance"]
    report = regress([write(tmp_path, data)])
    assert not report.passed
    failed = [row for row in report.rows if not row.passed]
    assert [(row.run, row.metric) for row in failed] == [(target["id"], "tflops")]
    assert abs(failed[0].rel_error) > failed[0].tolerance
    assert "FAIL" in format_report(report)


def test_mape_is_the_mean_absolute_relative_error(tmp_path):
    report = regress([write(tmp_path, VALID)])
    errors = [row.rel_error for row in report.rows]
    for row in report.rows:
        assert row.rel_error == pytest.approx((row.simulated - row.measured) / row.measured)
    assert report.mape == pytest.approx(np.mean(np.abs(errors)))
    assert report.mape_by_op == pytest.approx(
        {row.op: abs(row.rel_error) for row in report.rows})
    assert f"MAPE {report.mape:.1%}" in format_report(report)


def test_alltoall_busbw_by_hand(tmp_path):
    """Each rank sends 7/8 of its buffer over its NVLink: t = overheads + bytes / bw."""
    run = load_runs(write(tmp_path, VALID)).runs[1]
    topo = load_topology("dgx-h100-superpod", gpus=8)
    hw = hardware_preset(topo.gpu)
    size = 2**30
    seconds = (hw.comm_overhead_s("nccl-alltoall") + topo.nvlink_latency
               + size * 7 / 8 / topo.nvlink_bw)
    busbw = size / seconds * 7 / 8 / 1e9
    assert simulate_run(run)["busbw_GBps"] == pytest.approx(busbw)


def test_ep_runs_are_deterministic():
    run = load_runs(SHIPPED / "deepep_intranode.yaml").runs[0]
    assert simulate_run(run) == simulate_run(run)


def _mutate(edit):
    data = copy.deepcopy(VALID)
    edit(data)
    return data


BAD = {
    "broken-yaml": ("runs: [ {id: x\n", None),
    "unknown-field": (_mutate(lambda d: d["runs"][0]["workload"].update(bogus=1)),
                      "runs[0].workload.bogus"),
    "missing-measured": (_mutate(lambda d: d["runs"][1].pop("measured")), "runs[1].measured"),
    "wrong-type": (_mutate(lambda d: d["runs"][1]["measured"]["busbw_GBps"].update(
        value="fast")), "runs[1].measured.busbw_GBps.value"),
    "unknown-kind": (_mutate(lambda d: d["runs"][0]["workload"].update(kind="moe-step")),
                     "runs[0].workload.kind"),
    "unknown-topology": (_mutate(lambda d: d["runs"][1].update(topology="tpu-pod")),
                         "runs[1].topology"),
    "unknown-metric": (_mutate(lambda d: d["runs"][0]["measured"].update(
        busbw_GBps={"value": 1.0})), "runs[0].measured.busbw_GBps"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_name_file_and_field(tmp_path, case):
    data, field = BAD[case]
    path = write(tmp_path, data)
    with pytest.raises(InputError) as info:
        load_runs(path)
    err = info.value
    assert err.source == str(path)
    assert str(path) in str(err)
    if field is not None:
        assert err.field == field
        assert field in str(err)
    else:
        assert "YAML" in str(err)


def test_bad_values_say_what_is_allowed(tmp_path):
    data = _mutate(lambda d: d["runs"][0]["workload"].update(kind="moe-step"))
    with pytest.raises(InputError, match="allowed: ep-dispatch-combine, grouped-gemm"):
        load_runs(write(tmp_path, data))
    data = _mutate(lambda d: d["runs"][1].update(topology="tpu-pod"))
    with pytest.raises(InputError, match="h800-node"):
        load_runs(write(tmp_path, data))


@pytest.mark.parametrize(("changes", "field"), [
    ({"experts": 10**18}, "runs[0].workload.experts: input should be less than or equal to "
                          "16384"),
    ({"tokens_per_rank": 2**31}, "runs[0].workload.tokens_per_rank: input should be less"),
    ({"gpus": 3_200_000_000}, "runs[0].gpus: input should be less than or equal to 65536"),
    ({"gpus": 256, "topology": "h800-cluster", "top_k": 1024},
     "runs[0].workload.top_k: 536,870,912 routed picks to draw"),
])
def test_recorded_run_sizes_are_bounded(tmp_path, changes, field, one_error_line):
    run = {"id": "ep", "topology": "h800-node", "gpus": 8, "tolerance": 0.15,
           "workload": {"kind": "ep-dispatch-combine", "kernel": "deepep-normal",
                        "tokens_per_rank": 4096, "hidden": 7168, "experts": 16384,
                        "top_k": 8},
           "measured": {"combine_bw_GBps": {"value": 158, "link": "nvlink"}}}
    for name, value in changes.items():
        (run if name in run else run["workload"])[name] = value
    file = tmp_path / "runs.yaml"
    file.write_text(yaml.safe_dump({**VALID, "runs": [run]}))
    line = one_error_line(["regress", str(file)])
    assert line.startswith(f"moesim: error: {file}: {field}"), line


def _hostile_table(tmp_path, op: str | None = None, **columns) -> str:
    """Three rows of the shipped table (of ``op``) with ``columns`` replaced, the writer's
    pandas metadata (which says Int64) kept."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(SHIPPED / "perfdb_subset.parquet")
    if op is not None:
        table = table.filter(pc.equal(table["op"], op))
    table = table.slice(0, 3)
    for column, values in columns.items():
        i = table.column_names.index(column)
        table = table.set_column(i, pa.field(column, pa.array(values).type), pa.array(values))
    path = tmp_path / "t.parquet"
    pq.write_table(table.replace_schema_metadata(table.schema.metadata), path)
    return str(path)


def test_a_table_of_inf_gpus_or_huge_sizes_is_one_line_naming_the_column(tmp_path, one_error_line):
    inf = _hostile_table(tmp_path, gpus=[float("inf"), 1.0, 2.0])
    line = one_error_line(["regress", inf])
    assert line.startswith(f"moesim: error: {inf}: gpus: inf is not a whole number"), line
    line = one_error_line(["perfdb", "fit", inf, "--system", "b200_sxm",
                            "--out", str(tmp_path / "fit.yaml")])
    assert line.startswith(f"moesim: error: {inf}: gpus: inf is not a whole number"), line
    assert not (tmp_path / "fit.yaml").exists()
    huge = _hostile_table(tmp_path, experts=[10**12, 8, 8])
    line = one_error_line(["regress", huge])
    assert line.startswith(f"moesim: error: {huge}: experts: 1000000000000 (row id "), line
    assert line.endswith("(allowed: whole numbers from 0 to 16,384, or <NA>)")
    picks = _hostile_table(tmp_path, op="deepep_ll", nodes=[128, 1, 1], tokens=[4096, 4, 4],
                           topk=[1024, 2, 2])
    line = one_error_line(["regress", picks])
    assert line.startswith(f"moesim: error: {picks}: topk: "), line
    assert "routed picks to draw" in line


def test_a_folder_without_runs_or_a_device_is_not_a_pass(tmp_path, one_error_line):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "a folder without recorded runs" in one_error_line(["regress", str(empty)])
    line = one_error_line(["regress", "/dev/zero"])
    assert line == ("moesim: error: /dev/zero: not a regular file or a folder (allowed: "
                    "recorded-run YAML or Parquet files, or folders of them)")
