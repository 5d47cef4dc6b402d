"""`moesim plan`: what it writes and prints, and one line for bad plan files."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from moesim.cli.main import app

runner = CliRunner()


def test_a_plan_writes_the_winner_frontier_counts_and_a_figure(tmp_path, repo):
    out = tmp_path / "plan"
    result = runner.invoke(app, ["plan", str(repo / "examples/plans/quick.yaml"), "--out",
                                 str(out), "--workers", "1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    document = json.loads((out / "plan.json").read_text())
    assert document["points_total"] == 12
    assert document["points_simulated"] == document["counts"]["simulated"] == 3
    assert document["counts"]["unreachable"] == 4  # 8 and 16 GPUs cannot reach 3M tokens/s
    winner = document["winner"]
    assert winner["gpus"] == 32 and winner["tokens_per_s"] >= 3.0e6
    assert winner["setup"] in result.output and "Pareto frontier" in result.output
    assert any(r["setup"] == winner["setup"] for r in document["frontier"])
    assert document["explanation"][0].startswith("Searched 12 setups: simulated 3")
    table = pd.read_parquet(out / "plan.parquet")
    assert len(table) == 12 and set(table["status"]) == {"invalid", "unreachable",
                                                          "simulated"}
    assert (out / "figures" / "frontier.png").stat().st_size > 10_000
    again = runner.invoke(app, ["plan", str(repo / "examples/plans/quick.yaml"), "--out",
                                str(out)])
    assert again.exit_code == 2 and "already holds a plan" in again.output


@pytest.mark.parametrize(("text", "needle"), [
    ("search: {parallel.ep: [8]}\ncost: {metric: gpu_hours}\n", "cost.token_budget"),
    ("search: {parallel.ep: [8]}\ncost: {metric: dollars, token_budget: 1.0e9}\n",
     "cost.price_per_gpu_hour"),
    ("search: {parallel.ep: [8]}\ntarget: {tokens_per_s: .inf}\n", "target.tokens_per_s"),
    ("search: {parallel.ep: [8]}\ntarget: {tokens: 5}\n", "target.tokens"),
    ("search: {routing.nope: [1]}\n", "search.routing.nope"),
    ("serach: {parallel.ep: [8]}\n", "serach"),
    ("search: {parallel.ep: [8]}\nconstraints: {topologies: [nosuch]}\n",
     "constraints.topologies[0]"),
    ("search: {parallel.ep: [64]}\ntarget: {ttft_s: 1.0}\n", "target.ttft_s"),
])
def test_bad_plan_files_exit_2_with_one_line(tmp_path, text, needle):
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    result = runner.invoke(app, ["plan", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moesim: error:"), result.output
    assert needle in lines[0] and str(path) in lines[0]
    assert not (tmp_path / "o" / "plan.json").exists()


def test_the_frontier_holds_only_setups_that_meet_the_target(tmp_path, repo):
    plan = yaml.safe_load((repo / "examples/plans/quick.yaml").read_text())
    plan["target"] = {"tokens_per_s": 2.0e6}  # 16 GPUs: reachable by the bound, missed
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    out = tmp_path / "o"
    assert runner.invoke(app, ["plan", str(path), "--out", str(out), "--workers", "1"],
                         catch_exceptions=False).exit_code == 0
    document = json.loads((out / "plan.json").read_text())
    assert document["counts"].get("misses target", 0) > 0
    assert all(r["tokens_per_s"] >= 2.0e6 for r in document["frontier"])


@pytest.mark.parametrize(("text", "needle"), [
    ("cost: {metric: dollars, token_budget: 1.0e+308, price_per_gpu_hour: 1.0e+308}\n",
     "cost.token_budget: input should be less than or equal to"),
    ("cost: {metric: gpu_hours, token_budget: 1.0e+308}\n", "(allowed: >= 1 and <= 1e+18)"),
    ("cost: {metric: dollars, token_budget: 1.0e+9, price_per_gpu_hour: 1.0e+308}\n",
     "cost.price_per_gpu_hour"),
    ("target: {tokens_per_s: 1.0e-300}\n", "target.tokens_per_s: input should be greater"),
    ("target: {step_time_s: 1.0e+300}\n", "target.step_time_s: input should be less"),
    ("constraints: {max_gpus: 1000000000000}\n", "constraints.max_gpus"),
])
def test_plan_costs_and_targets_are_bounded_so_no_figure_sees_inf(tmp_path, text, needle):
    path = tmp_path / "plan.yaml"
    path.write_text("base:\n  model: {preset: deepseek-v2-lite, num_layers: 4}\n"
                    "  parallel: {ep: 8, tokens_per_gpu: 64}\n"
                    "search: {parallel.gpus: [8, 16]}\nseeds: 1\n" + text)
    result = runner.invoke(app, ["plan", str(path), "--out", str(tmp_path / "o"),
                                 "--workers", "1"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"moesim: error: {path}: "), result.output
    assert needle in lines[0]
    assert not (tmp_path / "o").exists()
