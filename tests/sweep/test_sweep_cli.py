"""`moesim sweep`: the same rows in local processes and on Dask, resumable after a kill,
one clear line for bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from moesim.cli.main import app

runner = CliRunner()
BASE = {"model": {"preset": "deepseek-v3", "num_layers": 4}, "topology": "h800-cluster",
        "parallel": {"ep": 16, "tokens_per_gpu": 512}, "routing": {"max_devices": None}}


def sweep_file(tmp_path: Path, axes: dict, seeds: int = 2) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": BASE, "axes": axes, "seeds": seeds}))
    return path


def run(args: list[str]):
    return runner.invoke(app, ["sweep", *args], catch_exceptions=False)


def rows(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "results.parquet")


TWO_BY_TWO = {"parallel.ep": [8, 16], "routing.capacity_factor": [None, 1.0]}


def test_a_2x2_sweep_gives_the_same_rows_locally_and_on_a_dask_cluster(tmp_path):
    from distributed import LocalCluster

    spec = sweep_file(tmp_path, TWO_BY_TWO)
    assert run([str(spec), "--out", str(tmp_path / "local"), "--workers", "2"]).exit_code == 0
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster:
        result = run([str(spec), "--out", str(tmp_path / "dask"),
                      "--scheduler", cluster.scheduler_address])
    assert result.exit_code == 0, result.output
    local, dask = rows(tmp_path / "local"), rows(tmp_path / "dask")
    pd.testing.assert_frame_equal(local, dask)
    assert len(local) == 4 and local["error"].isna().all()
    assert list(local["parallel.ep"]) == [8, 8, 16, 16]
    assert (local["step_time_s_std"] > 0).all()  # two seeds: a spread, not a copy
    for column in ("max_devices", "capacity_factor", "routed_experts", "top_k",
                   "scenario_hash", "tokens_per_s_per_gpu", "memory_gib_per_gpu",
                   "fits_in_memory", "dropped_token_fraction"):
        assert column in local.columns, column
    capped = local[local["routing.capacity_factor"] == 1.0]
    assert (capped["capacity_factor"] == 1.0).all()
    assert (capped["dropped_token_fraction"] > 0).all()


def test_a_killed_sweep_resumes_without_computing_a_point_twice(tmp_path):
    spec = sweep_file(tmp_path, {"parallel.ep": [8, 16], "routing.capacity_factor":
                                 [None, 1.0, 1.25, 1.5]}, seeds=1)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run([str(spec), "--out", str(whole), "--workers", "1"]).exit_code == 0
    command = [sys.executable, "-m", "moesim.cli.main", "sweep", str(spec), "--out",
               str(cut), "--workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while not (cut / "results.parquet").exists() and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    stored = len(rows(cut))
    assert 1 <= stored < 8

    refused = run([str(spec), "--out", str(cut)])
    assert refused.exit_code == 2 and "--resume" in refused.output
    resumed = run([str(spec), "--out", str(cut), "--resume", "--workers", "1"])
    assert resumed.exit_code == 0, resumed.output
    assert (f"{8 - stored} simulated (0 failed), 0 not valid scenarios, {stored} already "
            "stored") in resumed.output
    pd.testing.assert_frame_equal(rows(cut), rows(whole))
    again = run([str(spec), "--out", str(cut), "--resume"])
    assert "0 simulated (0 failed), 0 not valid scenarios, 8 already stored" in again.output


def test_a_failing_point_is_a_row_and_the_sweep_goes_on(tmp_path):
    spec = sweep_file(tmp_path, {"parallel.ep": [8, 16], "routing.max_devices": [2]})
    result = run([str(spec), "--out", str(tmp_path / "o"), "--workers", "1"])
    assert result.exit_code == 0
    table = rows(tmp_path / "o")
    assert "larger than" in table.loc[0, "error"]  # EP8 is one node: M = 2 is impossible
    assert pd.isna(table.loc[1, "error"]) and table.loc[1, "step_time_s"] > 0


@pytest.mark.parametrize(("text", "needle"), [
    ("axes: {parallel.ep: [8]}\nseeds: -1\n", "seeds"),
    ("axes: {nonsense.field: [1]}\n", "axes.nonsense.field"),
    ("axes: [1, 2]\n", "axes"),
    ("axes: {parallel.ep: [8]\n", "sweep.yaml"),
    ("base: missing.yaml\naxes: {parallel.ep: [8]}\n", "base"),
])
def test_bad_sweep_files_exit_2_with_one_line(tmp_path, text, needle):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    result = run([str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moesim: error:") and needle in lines[0]
    assert not (tmp_path / "o" / "results.parquet").exists()


def test_out_must_be_a_folder(tmp_path):
    spec = sweep_file(tmp_path, {"parallel.ep": [8]})
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    result = run([str(spec), "--out", str(blocker)])
    assert result.exit_code == 2 and "--out" in result.output
    assert blocker.read_text() == "keep me"


def test_an_unreachable_scheduler_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr("moesim.sweep.executors.CONNECT_TIMEOUT", "1s")
    spec = sweep_file(tmp_path, {"parallel.ep": [8]})
    result = run([str(spec), "--out", str(tmp_path / "o"), "--scheduler",
                  "tcp://127.0.0.1:9"])
    assert result.exit_code == 2 and "--scheduler" in result.output


def test_resume_refuses_a_sweep_whose_base_changed(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(BASE))
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"base": "base.yaml", "axes": {"parallel.ep": [8, 16]}}))
    out = tmp_path / "o"
    assert run([str(spec), "--out", str(out), "--workers", "1"]).exit_code == 0
    before = rows(out)
    base.write_text(yaml.safe_dump(BASE | {"parallel": {"ep": 16, "tokens_per_gpu": 256}}))
    result = run([str(spec), "--out", str(out), "--resume"])
    assert result.exit_code == 2 and "not points of this sweep" in result.output
    pd.testing.assert_frame_equal(rows(out), before)


def test_a_sweep_that_cannot_start_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr("moesim.sweep.executors.CONNECT_TIMEOUT", "1s")
    spec = sweep_file(tmp_path, {"parallel.ep": [8]})
    out = tmp_path / "deep" / "er" / "o"
    assert run([str(spec), "--out", str(out), "--scheduler", "tcp://127.0.0.1:9"]).exit_code == 2
    spec.write_text(yaml.safe_dump({"base": "missing.yaml", "axes": {"parallel.ep": [8]}}))
    assert run([str(spec), "--out", str(out)]).exit_code == 2
    assert not (tmp_path / "deep").exists()


def test_mistakes_in_set_and_axes_name_the_sweep_file(tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"base": BASE, "set": ["parallel.ep=abc"],
                                    "axes": {"parallel.tokens_per_gpu": [64]}}))
    result = run([str(spec), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert f"{spec}: set[0]: parallel.ep:" in result.output
    spec.write_text(yaml.safe_dump({"base": BASE, "axes": {"routing.capacity_factor": [-1]}}))
    assert run([str(spec), "--out", str(tmp_path / "o"), "--workers", "1"]).exit_code == 0
    error = rows(tmp_path / "o").loc[0, "error"]
    assert error.startswith(f"{spec}: axes.routing.capacity_factor:")


def test_the_table_is_not_rewritten_after_every_point(tmp_path, monkeypatch):
    import moesim.cli.output as output

    writes = []
    real = output.write_parquet
    monkeypatch.setattr(output, "write_parquet",
                        lambda path, frame: (writes.append(len(frame)), real(path, frame)))
    spec = sweep_file(tmp_path, {"routing.capacity_factor": [None, 1.0, 1.5, 2.0, 3.0, 4.0]},
                      seeds=1)
    assert run([str(spec), "--out", str(tmp_path / "o"), "--workers", "1"]).exit_code == 0
    assert writes[0] == 1 and writes[-1] == 6 and len(writes) < 6


def test_resuming_over_a_corrupt_results_file_is_one_line_naming_it(tmp_path):
    from moesim.cli.output import mark_results_folder

    spec = sweep_file(tmp_path, {"parallel.ep": [8]}, seeds=1)
    out = tmp_path / "out"
    mark_results_folder(out)
    (out / "sweep.yaml").write_text(spec.read_text())
    (out / "results.parquet").write_bytes(b"garbage, not Parquet")
    result = run([str(spec), "--out", str(out), "--resume", "--workers", "1"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"moesim: error: {out / 'results.parquet'}: not a readable "
                               "Parquet table"), lines[0]
    assert (out / "results.parquet").read_bytes() == b"garbage, not Parquet"
