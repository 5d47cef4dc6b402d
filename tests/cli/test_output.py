"""Results folders: written again they are replaced whole, a folder of the user's own
files is refused untouched, and what a killed run left behind goes with the next write."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from moesim.cli.main import app
from moesim.cli.output import MARKER, staged_folder, write_text
from moesim.errors import InputError


def simulate(out, small_overrides, *extra):
    args = ["simulate", "--out", str(out)]
    args += [a for o in small_overrides for a in ("--set", o)]
    return CliRunner().invoke(app, [*args, *extra])


def test_writing_results_again_replaces_the_folder_whole(tmp_path, small_overrides):
    out = tmp_path / "run"
    assert simulate(out, small_overrides, "--report").exit_code == 0
    assert (out / "report.md").is_file() and (out / MARKER).is_file()
    again = simulate(out, small_overrides, "--set", "parallel.tokens_per_gpu=64")
    assert again.exit_code == 0, again.output
    # The report of the first run described other results: it must not stay beside them.
    assert not (out / "report.md").exists()
    assert "tokens_per_gpu: 64" in (out / "scenario.yaml").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing left beside it


def test_a_folder_of_the_users_own_files_is_refused_untouched(tmp_path, small_overrides):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "summary.json").write_text("my own notes")
    result = simulate(out, small_overrides)
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("moesim: error: --out: folder") and "did not write" in line
    assert (out / "summary.json").read_text() == "my own notes"
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]


def test_an_empty_folder_takes_results(tmp_path, small_overrides):
    out = tmp_path / "empty"
    out.mkdir()
    assert simulate(out, small_overrides).exit_code == 0
    assert (out / "summary.json").is_file()
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)  # not the stage's private mode


def test_a_report_is_added_to_the_results_it_describes(tmp_path, small_overrides):
    out = tmp_path / "run"
    assert simulate(out, small_overrides).exit_code == 0
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "summary.json").is_file() and (out / "report.md").is_file()


def dead_pid() -> int:
    """The id of a process that has finished (and been reaped)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    return int(child.stdout)


def test_a_killed_runs_leftovers_go_with_the_next_write(tmp_path):
    out = tmp_path / "run"
    dead = dead_pid()
    stale_folder = tmp_path / f".run.{dead}.abc123.partial"
    stale_folder.mkdir()
    (stale_folder / "summary.json").write_text("{}")
    stale_file = tmp_path / f".note.txt.{dead}.abc.tmp"
    stale_file.write_text("half")
    alive = tmp_path / f".run.{os.getpid()}.xyz.partial"  # a write still going on
    alive.mkdir()
    with staged_folder(out) as stage:
        (stage / "summary.json").write_text("{}")
    write_text(tmp_path / "note.txt", "whole")
    assert not stale_folder.exists() and not stale_file.exists()
    assert alive.exists()


def test_a_failed_write_leaves_the_earlier_results(tmp_path):
    out = tmp_path / "run"
    with staged_folder(out) as stage:
        (stage / "summary.json").write_text("first")
    with pytest.raises(RuntimeError), staged_folder(out) as stage:
        (stage / "summary.json").write_text("second")
        raise RuntimeError("killed half-way")
    assert (out / "summary.json").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_unmarked_folder_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "data.csv").write_text("1,2")
    with pytest.raises(InputError, match="did not write"), staged_folder(out):
        pytest.fail("the block must not run")
