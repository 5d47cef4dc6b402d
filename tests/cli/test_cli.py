"""The command line, through typer's CliRunner: every documented example runs, bad
input exits 2 with the field named, outputs appear whole."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import moesim
from moesim.cli.main import app

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()

SUMMARY_KEYS = {  # the summary keys other tools rely on (README, docs/metrics.md)
    "step_time_s", "tokens_per_s", "dispatch_time_s", "combine_time_s",
    "expert_compute_time_s", "attention_time_s", "comm_exposed_time_s", "mfu",
    "nvlink_bytes", "rdma_bytes", "max_over_mean_gpu_load", "dropped_token_fraction",
    "tokens_dispatched", "tokens_computed", "tokens_dropped",
}


def readme_examples() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"^\$ moesim (.+)$", text, flags=re.M)


def docstring_examples() -> list[str]:
    from moesim.cli import (
        calibrate,
        capture,
        placement,
        plan,
        regress,
        report,
        simulate,
        sweep,
        topo,
        trace,
    )

    found = []
    for command in (simulate.simulate, topo.topo_show, capture.capture, trace.stats,
                    trace.import_, trace.synth, regress.regress, calibrate.calibrate,
                    placement.placement, sweep.sweep, plan.plan, report.report):
        doc = command.__doc__ or ""
        found += re.findall(r"^\s+moesim (.+)$", doc.split("Examples:")[-1], flags=re.M)
    return found


def _tiny_mixtral(path: Path) -> None:
    """A random-weight Mixtral checkpoint small enough for a test (no tokenizer)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=100, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=128)
    transformers.MixtralForCausalLM(config).save_pretrained(path)


def _megatron_trace(root: Path) -> None:
    """Two ranks, two MoE layers, in Megatron-Core's router-trace JSONL format."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for rank in range(2):
        lines = [json.dumps({"step": 0, "stage": "pre_dispatch", "block": "decoder",
                             "layer": layer, "rank": rank, "num_tokens": 16, "topk": 6,
                             "top_indices": [rng.permutation(64)[:6].tolist()
                                             for _ in range(16)]})
                 for layer in (1, 2)]
        (root / f"router_trace_rank{rank}.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(autouse=True)
def close_figures():
    """`simulate --report` leaves its matplotlib figures open in this process; close them
    after each test so that many reports do not pile up."""
    yield
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")


@pytest.fixture
def in_sandbox(tmp_path, monkeypatch):
    """Run from an empty folder that sees the repository's example scenarios and sample
    traces, and holds the inputs the examples name."""
    (tmp_path / "examples").symlink_to(REPO / "examples")
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / "samples").symlink_to(REPO / "traces" / "samples")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "examples").symlink_to(REPO / "reports" / "examples")
    (tmp_path / "moesim" / "fidelity").mkdir(parents=True)
    (tmp_path / "moesim" / "fidelity" / "gpu_runs").symlink_to(REPO / "moesim/fidelity/gpu_runs")
    _megatron_trace(tmp_path / "runs" / "megatron-trace")
    _tiny_mixtral(tmp_path / "runs" / "tiny-mixtral")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def invoke(args: list[str]):
    return runner.invoke(app, args, catch_exceptions=False)


def test_the_readme_documents_examples():
    assert len(readme_examples()) >= 8
    assert len(docstring_examples()) >= 12


@pytest.mark.parametrize("example", readme_examples() + docstring_examples())
def test_documented_example_runs(example, in_sandbox):
    result = invoke(example.split())
    assert result.exit_code == 0, result.output
    assert result.output.strip()
    for path in re.findall(r"(?:--out|--png) (\S+)", example):
        assert (in_sandbox / path).exists()
    for path in re.findall(r"(\S+\.npz)", example):
        if "--out" in example and example.split("--out ")[1].startswith(path):
            assert moesim.RoutingTrace.load(in_sandbox / path).num_tokens > 0


def test_json_summary_has_every_public_key(small_overrides):
    args = ["simulate", "--json"] + [a for o in small_overrides for a in ("--set", o)]
    result = invoke(args)
    assert result.exit_code == 0
    summary = json.loads(result.output)
    assert summary.keys() >= SUMMARY_KEYS
    assert summary["step_time_s"] > 0


def test_out_writes_tables_trace_and_report(tmp_path, small_overrides):
    out = tmp_path / "run"
    args = ["simulate", "--out", str(out), "--report", "--what-if", "routing.max_devices=8"]
    args += [a for o in small_overrides for a in ("--set", o)]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    for name in ("summary.json", "scenario.yaml", "spans.parquet", "links.parquet",
                 "experts.parquet", "timeline.json", "report.md", "report.html",
                 "figures/step_breakdown.png", "figures/link_utilization.png"):
        assert (out / name).stat().st_size > 0, name
    trace = json.loads((out / "timeline.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert spans and all(e["dur"] >= 0 for e in spans)
    assert "What if" in (out / "report.md").read_text()
    assert not list(out.glob(".*.tmp")), "temporary files left behind"
    # The resolved scenario loads back and simulates to the same summary.
    again = invoke(["simulate", str(out / "scenario.yaml"), "--json"])
    assert json.loads(again.output) == json.loads((out / "summary.json").read_text())


BAD_INPUT = [
    (["--set", "parallel.ep=7"], "parallel.ep", "1, 2, 4, 8, 16, 32, 64, 128, 256"),
    (["--set", "routing.max_devices=9"], "routing.max_devices", "1..8"),
    (["--set", "parallel.tokens_per_gpu=0"], "parallel.tokens_per_gpu", "> 0"),
    (["--set", "parallel.gpus=4096", "--set", "parallel.ep=256"], "parallel.gpus", "1..2048"),
    (["--set", "parallel.ep=abc"], "parallel.ep", "int"),
    (["--set", "model=deepseek-v9"], "model", "deepseek-v3"),
    (["--set", "parallel.epp=3"], "parallel.epp", "tokens_per_gpu"),
    (["--set", "topology=nowhere"], "topology", "h800-cluster"),
    (["--set", "parallel.dispatch_kernel=ring"], "parallel.dispatch_kernel", "deepep-normal"),
    (["--set", "routing.max_devices=1", "--set", "routing.limit_scope=device"],
     "routing.max_devices", "2..64"),
    (["--set", "noequals"], "noequals", "FIELD=VALUE"),
]


@pytest.mark.parametrize(("args", "field", "allowed"), BAD_INPUT)
def test_bad_overrides_exit_2_naming_the_field(args, field, allowed, tmp_path):
    out = tmp_path / "never"
    result = runner.invoke(app, ["simulate", *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    message = result.stderr
    assert message.startswith("moesim: error: ")
    assert field in message and allowed in message
    assert "Traceback" not in result.output
    assert len(message.strip().splitlines()) == 1
    assert not out.exists(), "bad input must not write anything"


@pytest.mark.parametrize(("text", "field"), [
    ("model: [1\n", "line 2"),
    ("model: deepseek-v3\ntopology: h800-cluster\n"
     "parallel: {ep: 64, tokens_per_gpu: 64, foo: 1}\n", "parallel.foo"),
    ("model: deepseek-v3\ntopology: h800-cluster\nparallel: {ep: 64}\n",
     "parallel.tokens_per_gpu"),
    ("- a list\n", "mapping"),
    ("schema: moesim.scenario/9\n", "schema"),
])
def test_bad_scenario_files_exit_2_naming_file_and_field(text, field, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = runner.invoke(app, ["simulate", str(path)])
    assert result.exit_code == 2
    assert str(path) in result.stderr and field in result.stderr


def test_missing_scenario_file_exits_2(tmp_path):
    result = runner.invoke(app, ["simulate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "cannot read file" in result.stderr


def test_report_needs_out():
    result = runner.invoke(app, ["simulate", "--report"])
    assert result.exit_code == 2 and "--out" in result.stderr


def test_topology_errors_exit_2():
    result = runner.invoke(app, ["topo", "show", "h800-cluster", "--gpus", "4096"])
    assert result.exit_code == 2 and "gpus" in result.stderr and "1..2048" in result.stderr
    result = runner.invoke(app, ["topo", "show", "atlantis"])
    assert result.exit_code == 2 and "h800-node" in result.stderr


def test_topo_show_reports_bandwidths():
    result = invoke(["topo", "show", "h800-cluster", "--gpus", "64", "--json"])
    summary = json.loads(result.output)
    assert summary["n_gpus"] == 64 and summary["n_domains"] == 8
    assert summary["nvlink_achievable_GBps"] == pytest.approx(160)
    assert summary["bisection_GBps"] > 0


def test_version():
    result = invoke(["--version"])
    assert result.exit_code == 0 and result.output.startswith("moesim ")


def test_help_does_not_load_heavy_modules():
    """`moesim --help` stays fast: no torch, matplotlib, pandas, simpy or rich at
    import."""
    code = ("import sys; import moesim.cli.main; "
            "print(sorted(m for m in ('torch', 'matplotlib', 'pandas', 'simpy', 'networkx', "
            "'rich') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("content", [b"not a zip", b"PK\x03\x04 truncated"])
def test_a_corrupted_trace_exits_2_naming_the_file(content, tmp_path):
    path = tmp_path / "broken.npz"
    path.write_bytes(content)
    for args in (["trace", "stats", str(path)],
                 ["simulate", "--set", f"trace={path}", "--set", "model.num_layers=4"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert str(path) in result.stderr and "Traceback" not in result.output


def test_a_trace_of_the_wrong_shape_for_the_scenario_exits_2(tmp_path):
    """The sample traces have 64 experts; DeepSeek-V3 has 256."""
    result = runner.invoke(app, ["simulate", "--set",
                                 f"trace={REPO / 'traces/samples/tiny-v1.npz'}"])
    assert result.exit_code == 2
    assert "trace" in result.stderr and "256" in result.stderr


def test_capture_needs_exactly_one_source(tmp_path):
    result = runner.invoke(app, ["capture", "--out", str(tmp_path / "t.npz")])
    assert result.exit_code == 2 and "--train" in result.stderr
    assert not (tmp_path / "t.npz").exists()


def test_regress_passes_on_the_shipped_runs_and_fails_on_a_perturbed_one(tmp_path):
    result = invoke(["regress"])
    assert result.exit_code == 0 and "MAPE" in result.output and "PASSED" in result.output
    text = (REPO / "moesim/fidelity/gpu_runs/deepgemm_grouped_h800.yaml").read_text()
    assert "value: 1346" in text
    bad = tmp_path / "perturbed.yaml"
    bad.write_text(text.replace("value: 1346", "value: 2346", 1))
    result = runner.invoke(app, ["regress", str(bad)])
    assert result.exit_code == 1 and "FAIL" in result.output
    result = runner.invoke(app, ["regress", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2


def test_capture_on_cuda_without_a_gpu_exits_2(tmp_path):
    result = runner.invoke(app, ["capture", "--train", "--device", "cuda",
                                 "--out", str(tmp_path / "t.npz")])
    assert result.exit_code == 2 and "CUDA" in result.stderr
    assert not (tmp_path / "t.npz").exists()


@pytest.mark.parametrize(("text", "fields"), [
    ("routing.max_devices=8", ["routing.max_devices=8"]),
    ("routing.max_devices=8,parallel.dispatch_kernel=nccl-alltoall",
     ["routing.max_devices=8", "parallel.dispatch_kernel=nccl-alltoall"]),
    ("a.b=[1,2], c=3", ["a.b=[1,2]", "c=3"]),
    ("a={x: 1, y: 2},b=null", ["a={x: 1, y: 2}", "b=null"]),
    ("name='x,y=z',b=1", ["name='x,y=z'", "b=1"]),
    ("a=1,2", ["a=1,2"]),  # a comma not followed by FIELD= stays in the value
])
def test_a_what_if_splits_on_the_commas_that_start_a_field(text, fields):
    from moesim.cli.simulate import split_what_if

    assert split_what_if(text) == fields


def test_a_what_if_without_field_equals_value_exits_2(tmp_path, small_overrides):
    args = ["simulate", "--out", str(tmp_path / "never"), "--report",
            "--what-if", "routing.max_devices"]
    result = runner.invoke(app, args + [a for o in small_overrides for a in ("--set", o)])
    assert result.exit_code == 2
    assert "--what-if" in result.stderr and "FIELD=VALUE" in result.stderr
    assert not (tmp_path / "never").exists()


def test_a_what_if_sets_several_fields_and_compares_per_gpu_throughput(tmp_path,
                                                                     small_overrides):
    sets = [a for o in small_overrides for a in ("--set", o)]
    out = tmp_path / "run"
    result = invoke(["simulate", *sets, "--out", str(out), "--report",
                     "--what-if", "routing.max_devices=2,parallel.micro_batches=1",
                     "--what-if", "parallel.dispatch_kernel=nccl-alltoall"])
    assert result.exit_code == 0, result.output
    both = moesim.simulate(moesim.load_scenario(overrides=[
        *small_overrides, "routing.max_devices=2", "parallel.micro_batches=1"])).summary
    base = json.loads((out / "summary.json").read_text())
    per_gpu = [s["tokens_per_s"] / s["gpus"] for s in (base, both)]
    # Terminal: one row per run, the variant's fields one per line.
    lines = result.output.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:1] == ["what"])
    rows = lines[head + 2:head + 6]
    assert rows[0].split()[0] == "baseline" and rows[0].split()[-1] == "-"
    assert rows[1].split()[0] == "routing.max_devices=2"
    assert rows[2].strip() == "parallel.micro_batches=1"
    assert f"{per_gpu[1]:,.0f}" in rows[1].split()
    assert f"{per_gpu[1] / per_gpu[0] - 1:+.1%}" in rows[1].split()
    assert f"{both['dropped_token_fraction']:.2%}" in rows[1].split()
    assert rows[3].split()[0] == "parallel.dispatch_kernel=nccl-alltoall"
    # Report: one column per run, the per-GPU throughput and its change among the rows.
    report = (out / "report.md").read_text()
    assert ("| quantity | baseline | routing.max_devices=2, parallel.micro_batches=1 | "
            "parallel.dispatch_kernel=nccl-alltoall |") in report
    assert f"| tokens/s per GPU | {per_gpu[0]:,.0f} | {per_gpu[1]:,.0f} |" in report
    assert f"| tokens/s per GPU vs baseline | - | {per_gpu[1] / per_gpu[0] - 1:+.1%} |" in report
    assert "| drop rate |" in report


def test_topo_list_aligns_its_columns():
    result = invoke(["topo", "list"])
    assert result.exit_code == 0
    assert result.output == invoke(["topo", "list"]).output  # byte-identical reruns
    lines = result.output.splitlines()
    head = lines[0]
    assert head.split()[:2] == ["preset", "GPU"] and set(lines[1]) == {"-"}
    gpu, end, text = head.index("GPU"), head.index("GPUs") + 4, head.index("description")
    presets = [line for line in lines[2:] if line[:1] != " "]
    assert len(presets) >= 9
    for line in presets:
        name, rest = line[:gpu].strip(), line[gpu:]
        assert name and rest[:1] != " " and line[gpu - 1] == " ", line
        assert line[end - 1].isdigit() and line[end] == " ", line  # max GPUs right-aligned
        assert line[text - 1] == " " and line[text] != " ", line
    for line in lines[2:]:  # wrapped descriptions continue in their column
        assert len(line) <= 100
        if line[:1] == " ":
            assert line[:text].strip() == "" and line[text] != " ", line


def test_terminal_output_is_plain_and_deterministic(small_overrides):
    sets = [a for o in small_overrides for a in ("--set", o)]
    first = invoke(["simulate", *sets])
    assert first.exit_code == 0
    assert first.output == invoke(["simulate", *sets]).output
    assert "\x1b[" not in first.output
    lines = first.output.splitlines()
    starts = {len(line) - len(line[2:].split("  ", 1)[1].lstrip())
              for line in lines[1:] if line.startswith("  ") and not line.startswith("  (")
              and "  " in line[2:]}
    assert len(starts) == 1, "the breakdown's values start in one column"


@pytest.mark.parametrize(("args", "needle"), [
    (["simulate", "--bogus"], "No such option: --bogus"),
    (["simulate", "--trace-gpus", "abc"], "--trace-gpus"),
    (["nothing"], "No such command 'nothing'"),
    (["sweep"], "Missing argument"),
    (["topo", "show"], "Missing argument"),
])
def test_usage_mistakes_are_one_line_and_exit_2(args, needle):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moesim: error: moesim"), result.output
    assert needle in lines[0]


@pytest.mark.parametrize(("args", "commands"), [
    ([], "simulate, capture, regress"),
    (["trace"], "stats, import, synth"),
    (["topo"], "show, list"),
    (["perfdb"], "import, fit, subset"),
])
def test_a_group_without_a_command_is_one_line_naming_its_commands(args, commands):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    path = " ".join(["moesim", *args])
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"moesim: error: {path}: missing command (allowed: {commands}")
    assert lines[0].endswith(f"see {path} --help)")
