"""One error path: scenarios, topology files and recorded GPU runs share one strict
pydantic base and one translation of its errors, so the same mistake reads the same way
in every file: the file, the field as the user wrote it, the problem, what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import moesim
from moesim.cli.main import app
from moesim.errors import InputError
from moesim.fidelity.runs import gpu_runs_dir, load_runs
from moesim.topologies import load_topology

REPO = Path(__file__).resolve().parents[2]


def edited(tmp_path: Path, source: Path, edit) -> Path:
    data = yaml.safe_load(source.read_text())
    edit(data)
    path = tmp_path / source.name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def error_of(load, path: Path) -> InputError:
    with pytest.raises(InputError) as info:
        load(path)
    return info.value


def scenario_file(tmp_path: Path, edit) -> Path:
    return edited(tmp_path, REPO / "examples" / "v2-device-limited.yaml", edit)


def topology_file(tmp_path: Path, edit) -> Path:
    return edited(tmp_path, REPO / "topologies" / "h800-node.yaml", edit)


def runs_file(tmp_path: Path, edit) -> Path:
    return edited(tmp_path, gpu_runs_dir() / "deepgemm_grouped_h800.yaml", edit)


def test_an_unknown_key_reads_alike_in_every_file(tmp_path):
    cases = [
        (moesim.load_scenario, scenario_file(tmp_path, lambda d: d["parallel"].update(
            epp=8)), "parallel.epp", "micro_batches"),
        (load_topology, topology_file(tmp_path, lambda d: d["fabric"].update(rials=2)),
         "fabric.rials", "rails"),
        (load_runs, runs_file(tmp_path, lambda d: d["runs"][1]["workload"].update(mm=1)),
         "runs[1].workload.mm", "m_per_group"),
    ]
    for load, path, field, listed in cases:
        err = error_of(load, path)
        assert (err.source, err.field, err.problem) == (str(path), field, "unknown field")
        assert listed in err.allowed.split(", ")
        assert str(err).startswith(f"{path}: {field}: unknown field (allowed: ")


def test_a_value_out_of_bounds_reads_alike_in_every_file(tmp_path):
    cases = [
        (moesim.load_scenario, scenario_file(tmp_path, lambda d: d["parallel"].update(
            comm_sms=-1)), "parallel.comm_sms", ">= 0 and <= 10000"),
        (load_topology, topology_file(tmp_path, lambda d: d["links"]["nvlink"].update(
            efficiency=1.5)), "links.nvlink.efficiency", "> 0 and <= 1"),
        (load_runs, runs_file(tmp_path, lambda d: d["runs"][0].update(tolerance=0)),
         "runs[0].tolerance", "> 0 and <= 1"),
    ]
    for load, path, field, allowed in cases:
        err = error_of(load, path)
        assert (err.field, err.allowed) == (field, allowed)
        assert "(got " in err.problem


def test_a_missing_field_and_further_problems_are_counted(tmp_path):
    def drop_two(d):
        del d["runs"][0]["gpus"], d["runs"][0]["tolerance"]

    err = error_of(load_runs, runs_file(tmp_path, drop_two))
    assert err.field == "runs[0].gpus"
    assert err.problem == "missing required field; 1 more problem(s) after this one"


def test_a_tagged_union_names_its_kinds(tmp_path):
    path = runs_file(tmp_path, lambda d: d["runs"][0]["workload"].update(kind="gemm"))
    err = error_of(load_runs, path)
    assert err.field == "runs[0].workload.kind"
    assert err.problem == "unknown workload kind 'gemm'"
    assert err.allowed == "ep-dispatch-combine, grouped-gemm, dense-gemm, alltoall, training-step"


def test_a_quoted_number_is_a_mistake_in_a_topology(tmp_path):
    path = topology_file(tmp_path, lambda d: d.update(gpus_per_domain="8"))
    err = error_of(load_topology, path)
    assert (err.field, err.allowed) == ("gpus_per_domain", "int, >= 1 and <= 65536")


@pytest.mark.parametrize("command, kind", [
    (["simulate"], scenario_file), (["topo", "show"], topology_file), (["regress"], runs_file),
])
def test_the_cli_prints_one_line_and_exits_2(tmp_path, command, kind):
    path = kind(tmp_path, lambda d: d.update(colour="blue"))
    result = CliRunner().invoke(app, [*command, str(path)])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"moesim: error: {path}: colour: unknown field (allowed: ")
