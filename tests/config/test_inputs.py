"""Hostile input files get one clear line and exit 2: bytes that are not UTF-8, a file
without end, nesting without end, aliases that multiply, a key written twice, a section of
the wrong type. Every file a user hands moesim is read by ``moesim.inputs``."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from moesim.cli.main import app
from moesim.errors import InputError
from moesim.inputs import MAX_DEPTH, load_json, load_yaml, read_text

HOSTILE = {
    "not-utf8.yaml": (b"name: x\n\xff\xfe\n", "not UTF-8 text"),
    "deep.yaml": (("a: " + "[" * 100 + "]" * 100 + "\n").encode(), "nested deeper than"),
    "long-integer.yaml": (("seed: " + "9" * 5000 + "\n").encode(), "more than 100 digits"),
    "laughs.yaml": (b'a: &a ["x", "x"]\nb: &b [*a, *a]\nc: [*b, *b]\n', "aliases"),
    "twice.yaml": (b"model: deepseek-v3\nmodel: mixtral-8x7b\n", "duplicate key 'model'"),
    "broken.yaml": (b"model: [unclosed\n", "broken YAML at line"),
}
COMMANDS = [["simulate"], ["topo", "show"], ["regress"]]
CASES = [(command, name) for command in COMMANDS for name in sorted(HOSTILE)]
# A scenario's section of the wrong type is no longer taken as absent.
CASES.append((["simulate"], "list-routing.yaml"))
HOSTILE["list-routing.yaml"] = (b"routing: []\n", "expected a mapping, got list")


@pytest.mark.parametrize("command, name", CASES)
def test_hostile_files_exit_2_with_one_line(tmp_path, command, name):
    content, problem = HOSTILE[name]
    path = tmp_path / name
    path.write_bytes(content)
    result = CliRunner().invoke(app, [*command, str(path)])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"moesim: error: {path}") and problem in line


def test_an_endless_file_is_refused_unread():
    with pytest.raises(InputError, match="larger than 16 MiB"):
        read_text("/dev/zero")


def test_depth_limit_leaves_room_for_every_schema():
    nested = "a:\n" + "".join("  " * i + "b:\n" for i in range(1, MAX_DEPTH - 1))
    assert load_yaml(nested, source="x") is not None
    with pytest.raises(InputError, match="nested deeper"):
        load_yaml("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), source="x")


@pytest.mark.parametrize("text, problem", [
    ("[" * 100_000, "nested deeper than 32"),
    ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "nested deeper than 32"),
    ("{\"n\": " + "9" * 5000 + "}", "more than 100 digits"),
    ("{\"n\": 1", "broken JSON at line 1, column 8"),
    (b"\xff", "not UTF-8 text"),
])
def test_json_has_the_limits_yaml_has(text, problem):
    with pytest.raises(InputError, match=problem):
        load_json(text, source="x")
    nested = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert load_json(nested, source="x") is not None
    assert load_json('{"n": 12345678901234567890}', source="x") == {"n": 12345678901234567890}


@pytest.mark.parametrize("text", ["mode: " + "x" * 1_000_000, "x" * 1_000_000 + ": 1"])
def test_a_huge_value_or_key_is_not_echoed_whole(tmp_path, text):
    path = tmp_path / "huge.yaml"
    path.write_text(text + "\n")
    result = CliRunner().invoke(app, ["simulate", str(path)])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"moesim: error: {path}") and len(line) < 1000


def test_a_named_pipe_without_a_writer_reads_as_empty_rather_than_waiting(tmp_path):
    import os

    pipe = tmp_path / "scenario.yaml"
    os.mkfifo(pipe)
    assert read_text(pipe) == ""
    with pytest.raises(InputError, match="is a folder"):
        read_text(tmp_path)
