"""A damaged results folder (a corrupt Parquet file, a deep or huge-number JSON file) is
one line naming the file, exit code 2: `moesim report` and `moesim sweep --resume`."""

from __future__ import annotations

import pytest
import yaml

from moesim.config.loading import load_scenario

DEEP = "[" * 5000 + "]" * 5000
HUGE = '{"step_time_s": ' + "9" * 5000 + "}"


def _simulation_folder(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    scenario = load_scenario("examples/mixtral-dgx-h100.yaml")
    (folder / "scenario.yaml").write_text(yaml.safe_dump(scenario.to_dict(), sort_keys=False))
    (folder / "summary.json").write_text("{}")
    for name in ("spans", "links", "experts"):
        (folder / f"{name}.parquet").write_bytes(b"PAR1 not really\x00" * 10)
    return folder


@pytest.mark.parametrize(("name", "text", "problem"), [
    ("summary.json", DEEP, "nested deeper than 32 levels"),
    ("summary.json", HUGE, "an integer of more than 100 digits"),
    ("summary.json", "[]", "holds a JSON list, not a dict"),
    ("warnings.json", "{}", "holds a JSON dict, not a list"),
    ("spans.parquet", None, "not a readable Parquet table (Parquet magic bytes not found"),
])
def test_a_damaged_simulation_folder_is_one_line_naming_the_file(tmp_path, name, text,
                                                                 problem, one_error_line):
    folder = _simulation_folder(tmp_path)
    if text is not None:
        (folder / name).write_text(text)
    line = one_error_line(["report", str(folder), "--out", str(tmp_path / "r")])
    assert line.startswith(f"moesim: error: {folder / name}: {problem}"), line
    assert not (tmp_path / "r").exists()


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
