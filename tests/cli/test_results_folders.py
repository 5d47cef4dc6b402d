"""A damaged results folder (a corrupt Parquet file, a deep or huge-number JSON file) is
one line naming the file, exit code 2: `moesim report` and `moesim sweep --resume`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from moesim.cli.main import app

DEEP = "[" * 5000 + "]" * 5000
HUGE = '{"step_time_s": ' + "9" * 5000 + "}"


TINY = ["model.num_layers=4", "parallel.ep=8", "routing.max_devices=null",
        "parallel.tokens_per_gpu=16", "routing.layer_samples=1", "engine=fast"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Folders `moesim simulate`, `sweep` and `plan --out` wrote for a tiny scenario."""
    root = tmp_path_factory.mktemp("written")
    base = yaml.safe_load(Path("moesim/config/presets/default-scenario.yaml").read_text())
    base["model"] = {"preset": "deepseek-v3", "num_layers": 4}
    base["parallel"].update(ep=8, tokens_per_gpu=16)
    base["routing"].update(max_devices=None, layer_samples=1)
    runs = {"simulate": ["simulate", *sum((["--set", t] for t in TINY), [])]}
    for kind, key in (("sweep", "axes"), ("plan", "search")):
        (root / f"{kind}.yaml").write_text(yaml.safe_dump(
            {"base": base, key: {"parallel.ep": [4, 8]}}))
        runs[kind] = [kind, str(root / f"{kind}.yaml"), "--workers", "1"]
    for kind, args in runs.items():
        result = CliRunner().invoke(app, [*args, "--out", str(root / kind)])
        assert result.exit_code == 0, result.output
    return root


def _copy(written, kind: str, tmp_path) -> Path:
    folder = tmp_path / kind
    shutil.copytree(written / kind, folder)
    return folder


@pytest.mark.parametrize(("name", "text", "problem"), [
    ("summary.json", DEEP, "nested deeper than 32 levels"),
    ("summary.json", HUGE, "an integer of more than 100 digits"),
    ("summary.json", "[]", "holds a JSON list, not a dict"),
    ("warnings.json", "{}", "holds a JSON dict, not a list"),
    ("spans.parquet", "PAR1 not really", "not a readable Parquet table"),
])
def test_a_damaged_simulation_folder_is_one_line_naming_the_file(written, tmp_path, name,
                                                                 text, problem,
                                                                 one_error_line):
    folder = _copy(written, "simulate", tmp_path)
    (folder / name).write_text(text)
    line = one_error_line(["report", str(folder), "--out", str(tmp_path / "r")])
    assert line.startswith(f"moesim: error: {folder / name}: {problem}"), line
    assert not (tmp_path / "r").exists()


def test_the_tables_simulate_writes_are_what_a_report_reads(written):
    from moesim.cli.folders import check_columns, read_parquet
    from moesim.output.tables import TABLE_COLUMNS

    for name, kinds in TABLE_COLUMNS.items():
        path = written / "simulate" / f"{name}.parquet"
        frame = read_parquet(path, columns=kinds)
        assert list(frame.columns) == list(kinds), name
        check_columns(frame, kinds, source=path)


def _rewrite_column(path: Path, name: str, values) -> None:
    frame = pd.read_parquet(path)
    frame[name] = values
    frame.to_parquet(path)


@pytest.mark.parametrize(("kind", "damage", "where", "problem"), [
    ("simulate", ("summary.json", "step_time_s", "fast"), "step_time_s",
     "not the summary moesim wrote (allowed: a number"),
    ("simulate", ("summary.json", "step_time_s", None), "step_time_s",
     "not the summary moesim wrote (allowed: a number"),
    ("simulate", ("summary.json", "gpus", 8.5), "gpus", "(allowed: an integer"),
    ("simulate", ("summary.json", "speed", 1), "speed", "(allowed: one of the summary keys"),
    ("simulate", ("spans.parquet", "gpu", "zero"), "gpu", "a column of str values"),
    ("simulate", ("spans.parquet", "end_s", float("inf")), "end_s",
     "(allowed: finite numbers"),
    ("simulate", ("experts.parquet", "tokens", 1.5), "tokens", "(allowed: integers"),
    ("simulate", ("summary.json", "step_time_s", 1e308), "step_time_s", "a number"),
    ("simulate", ("links.parquet", "utilization", 1e200), "utilization",
     "(allowed: finite numbers up to 1e100"),
    ("simulate", ("experts.parquet", "expert", 0), "expert", "an expert twice in one layer"),
    ("sweep", ("results.parquet", "step_time_s", "slow"), "step_time_s",
     "(allowed: numbers or empty"),
    ("sweep", ("results.parquet", "tokens_per_s_per_gpu_std", -1.0),
     "tokens_per_s_per_gpu_std", "(allowed: numbers >= 0 or empty"),
    ("sweep", ("results.parquet", "memory_gib_per_gpu", "a lot"), "memory_gib_per_gpu",
     "(allowed: numbers >= 0 or empty"),
    ("sweep", ("progress.json", "complete", "yes"), "complete", "(allowed: true or false"),
    ("sweep", ("sweep.yaml", "seeds", "two"), "seeds", "valid integer"),
    ("plan", ("plan.json", "frontier_axes", None), "frontier_axes", ""),
    ("plan", ("plan.json", "cost_unit", 3), "cost_unit", ""),
    ("plan", ("plan.parquet", "status", 1.0), "status", "(allowed: text or empty"),
])
def test_a_folder_moesim_wrote_then_damaged_is_one_line_naming_file_and_field(
        written, tmp_path, kind, damage, where, problem, one_error_line):
    folder = _copy(written, kind, tmp_path)
    name, key, value = damage
    path = folder / name
    if name.endswith((".json", ".yaml")):
        data = yaml.safe_load(path.read_text())  # JSON is YAML
        data[key] = value
        path.write_text(json.dumps(data))
    else:
        _rewrite_column(path, key, value)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    line = one_error_line(["report", str(folder)])
    assert line.startswith(f"moesim: error: {path}: {where}"), line
    assert problem in line, line
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("name", ["spans", "experts"])
def test_a_table_without_rows_is_refused(written, tmp_path, name, one_error_line):
    folder = _copy(written, "simulate", tmp_path)
    path = folder / f"{name}.parquet"
    pd.read_parquet(path).iloc[:0].to_parquet(path)
    line = one_error_line(["report", str(folder)])
    assert line.startswith(f"moesim: error: {path}: no rows"), line


def test_an_undamaged_folder_of_each_kind_still_reports(written, tmp_path):
    for kind in ("simulate", "sweep", "plan"):
        folder = _copy(written, kind, tmp_path)
        result = CliRunner().invoke(app, ["report", str(folder)])
        assert result.exit_code == 0, result.output
        assert (folder / "report.html").exists()


@pytest.mark.parametrize(("name", "text", "problem"), [
    ("progress.json", DEEP, "nested deeper than 32 levels"),
    ("results.parquet", "garbage", "not a readable Parquet table"),
])
def test_a_damaged_sweep_folder_is_one_line_naming_the_file(tmp_path, name, text, problem,
                                                            one_error_line):
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / "sweep.yaml").write_text("axes: {parallel.ep: [8]}\n")
    (folder / "results.parquet").write_bytes(b"garbage")
    (folder / name).write_text(text)
    line = one_error_line(["report", str(folder), "--out", str(tmp_path / "r")])
    assert line.startswith(f"moesim: error: {folder / name}: {problem}"), line


def test_a_plan_folder_with_a_deep_plan_json_is_one_line(tmp_path, one_error_line):
    folder = tmp_path / "plan"
    folder.mkdir()
    (folder / "plan.json").write_text(DEEP)
    line = one_error_line(["report", str(folder), "--out", str(tmp_path / "r")])
    assert line == f"moesim: error: {folder / 'plan.json'}: nested deeper than 32 levels"
