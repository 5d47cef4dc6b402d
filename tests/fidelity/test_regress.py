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
