"""`moesim plan`: the cheapest setup that meets a target, by branch and bound."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from moesim.cli.common import guarded, out_folder
from moesim.cli.sweep import ReportOption, SchedulerOption, WorkersOption


def _jsonable(value):
    """numpy and NaN values -> plain JSON (NaN as null)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def candidate_record(plan, c) -> dict:
    """One candidate as plan.json and plan.parquet hold it."""
    from moesim.planning.search import describe

    record = {"point": c.point.index, "setup": describe(c.point.values), **c.point.values,
              "status": c.status, "reason": c.reason, "gpus": c.gpus or None,
              "memory_gib_per_gpu_estimate": c.memory_gib,
              "step_time_lower_bound_s": c.step_lb_s,
              "tokens_per_s_upper_bound": c.tokens_per_s_ub, "cost_lower_bound": c.cost_lb}
    if c.ok:
        row = c.row
        record |= {k: v for k, v in row.items() if k not in record}
        record["cost"] = plan.cost.of(row["gpus"], row["tokens_per_s"])
    return record


def read_plan_document(path: Path) -> dict:
    """``plan.json`` read back (for a report): the document :func:`plan_document` wrote,
    checked field by field; anything else is one InputError naming the field."""
    from pydantic import BaseModel, ConfigDict, Field, ValidationError

    from moesim.cli.folders import RERUN, read_json
    from moesim.errors import InputError
    from moesim.validation import STRICT, input_error

    class Record(BaseModel):  # a candidate's row: these fields and any summary key
        model_config = ConfigDict(**(STRICT | {"extra": "allow"}))
        setup: str
        cost: float
        tokens_per_s: float
        tokens_per_s_per_gpu: float
        step_time_s: float
        memory_gib_per_gpu: float | None = None

    class Axes(BaseModel):
        model_config = STRICT
        x: str
        x_key: str
        y: str
        y_key: str

    class PlanDocument(BaseModel):
        model_config = STRICT
        schema_: str = Field(alias="schema", pattern="^moesim.plan-result/1$")
        plan: str
        mode: str
        cost_metric: str
        cost_unit: str
        target: dict[str, float]
        points_total: int
        points_simulated: int
        counts: dict[str, int]
        wall_time_s: float
        winner: Record | None
        runners_up: list[Record]
        frontier_axes: Axes
        frontier: list[Record]
        explanation: list[str]

    document = read_json(path)
    try:
        checked = PlanDocument.model_validate(document, strict=True)
    except ValidationError as err:
        raise input_error(err, schema=PlanDocument, source=str(path)) from None
    axes = checked.frontier_axes
    for i, record in enumerate(checked.frontier):
        for key in (axes.x_key, axes.y_key):
            value = getattr(record, key, None)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise InputError("not the plan moesim wrote", field=f"frontier.{i}.{key}",
                                 source=str(path), allowed=f"a number; {RERUN}")
    return document


def plan_document(result, *, seconds: float, source: str) -> dict:
    """plan.json: the winner, runners-up, frontier, counts and the reasons."""
    plan = result.plan

    def records(cs):
        return [_jsonable(candidate_record(plan, c)) for c in cs]

    from moesim.planning.frontier import axes_for

    (x_label, x_key), (y_label, y_key) = axes_for(result.mode)
    return {
        "schema": "moesim.plan-result/1",
        "plan": source,
        "mode": result.mode,
        "cost_metric": plan.cost.metric,
        "cost_unit": plan.cost.unit,
        "target": plan.target.given(),
        "points_total": len(result.candidates),
        "points_simulated": result.simulated,
        "counts": result.counts(),
        "wall_time_s": seconds,
        "winner": records([result.winner])[0] if result.winner else None,
        "runners_up": records(result.runners_up),
        "frontier_axes": {"x": x_label, "x_key": x_key, "y": y_label, "y_key": y_key},
        "frontier": records(result.frontier),
        "explanation": result.explanation,
    }


@guarded
def plan(
    plan_file: Annotated[Path, typer.Argument(
        metavar="PLAN.yaml", help="Plan file: base, search space, target, constraints, cost.")],
    out: Annotated[Path, typer.Option(
        parser=out_folder,
        help="Write plan.json, plan.parquet (every point), figures/frontier.png and "
             "plan.yaml here.")],
    scheduler: SchedulerOption = None,
    workers: WorkersOption = None,
    report: ReportOption = False,
) -> None:
    """Find the cheapest setup that meets a target; print why it wins and the frontier.

    Examples:

      moesim plan examples/plans/quick.yaml --out runs/plan-quick --report

      moesim plan examples/plans/v3-256-h800.yaml --out runs/plan-v3
    """
    import pandas as pd

    from moesim.cli.output import check_out_target, write_json, write_parquet, write_text
    from moesim.errors import InputError
    from moesim.inputs import load_yaml, read_text
    from moesim.planning.search import search
    from moesim.planning.spec import parse_plan
    from moesim.sweep.executors import executor
    from moesim.sweep.run import simulate_point

    source = str(plan_file)
    text = read_text(plan_file, what="plan file")
    spec = parse_plan(load_yaml(text, source=source), source=source)
    check_out_target(out)
    if (out / "plan.json").exists():
        raise InputError(f"{out} already holds a plan; choose another --out", field="--out")
    started = time.monotonic()

    def progress(simulated: int, still_open: int) -> None:
        if sys.stderr.isatty():
            typer.echo(f"\rsimulated {simulated}, {still_open} still open", err=True, nl=False)

    with executor(scheduler=scheduler, workers=workers) as pool:
        result = search(spec, source=source,
                        run_batch=lambda points: pool.results(simulate_point, points),
                        batch_size=max(getattr(pool, "workers", 4), 1), progress=progress)
    seconds = time.monotonic() - started
    if sys.stderr.isatty():
        typer.echo("", err=True)
    document = plan_document(result, seconds=seconds, source=source)
    table = pd.DataFrame([candidate_record(spec, c) for c in result.candidates])
    from moesim.cli.output import staged_folder, write_bytes
    from moesim.sweep.run import results_frame

    with staged_folder(out) as stage:
        write_text(stage / "plan.yaml", text)
        write_parquet(stage / "plan.parquet", results_frame(table.to_dict(orient="records")))
        if result.simulated:
            from moesim.reports.document import figure_png
            from moesim.reports.plan_report import frontier_figure

            write_bytes(stage / "figures" / "frontier.png",
                        figure_png(frontier_figure(document, table)))
        write_json(stage / "plan.json", document)
    _print(result, document)
    typer.echo(f"{document['points_simulated']} of {document['points_total']} setups "
               f"simulated in {seconds:.1f} s; wrote {out}/plan.json, plan.parquet")
    if report:
        from moesim.cli.report import report_folder

        report_folder(out)


def _print(result, document: dict) -> None:
    from moesim.reports.terminal import render_table

    for line in result.explanation:
        typer.echo(line)
    from moesim.reports.plan_report import amount

    rows = [(("winner" if i == 0 else str(i)), r["setup"], amount(r["cost"]),
             f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s_per_gpu']:,.0f}",
             f"{r['step_time_s']:.4g}", f"{r.get('memory_gib_per_gpu', float('nan')):.1f}")
            for i, r in enumerate(([document["winner"]] if document["winner"] else [])
                                  + document["runners_up"])]
    header = ("rank", "setup", document["cost_unit"], "tokens/s", "per GPU", "step s",
              "GiB/GPU")
    if rows:
        typer.echo(render_table(header, rows, title="Best setups"))
    front = document["frontier_axes"]
    frows = [(r["setup"], amount(r[front["x_key"]]), amount(r[front["y_key"]]))
             for r in document["frontier"]]
    if frows:
        typer.echo(render_table(("setup", front["x"], front["y"]), frows,
                                title="Pareto frontier"))
