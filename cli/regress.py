"""`moesim regress`: simulate recorded GPU runs and compare with what was measured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from moesim.cli.common import guarded


@guarded
def regress(
    runs: Annotated[list[Path] | None, typer.Argument(
        help="Recorded-run YAML or Parquet-table files, or folders of them (default: the "
             "shipped moesim/fidelity/gpu_runs).")]
    = None,
    include_known_gaps: Annotated[bool, typer.Option(
        "--include-known-gaps", help="Also run the measured cases the model misses today.")]
    = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
) -> None:
    """Compare the simulator with recorded GPU runs; exit 1 if any is out of tolerance.

    Prints measured vs simulated per run and metric, the relative error, its tolerance
    and the MAPE. Recorded-run tables (.parquet, e.g. the shipped perfdb_subset.parquet
    of aiconfigurator-core's measured kernels) print their MAPE per system and op class,
    in and out of sample, and the rows out of tolerance. `--include-known-gaps` adds the
    measurements the model misses today (moesim/fidelity/gpu_runs/known_gaps.yaml), so it exits 1
    by design.

    Examples:

      moesim regress

      moesim regress moesim/fidelity/gpu_runs/deepgemm_grouped_h800.yaml --json
    """
    from moesim.fidelity.regress import regress as run_regress
    from moesim.fidelity.regress import regress_tables
    from moesim.fidelity.runs import gpu_runs_dir

    paths = runs or [gpu_runs_dir()]
    report = run_regress(paths, include_known_gaps=include_known_gaps)
    tables = regress_tables(paths, include_known_gaps=include_known_gaps)
    if as_json:
        typer.echo(json.dumps({
            "passed": report.passed and all(t.passed for t in tables),
            "mape": report.mape if report.rows else None, "mape_by_op": report.mape_by_op,
            "rows": [row.__dict__ for row in report.rows],
            "tables": [{"file": t.file, "passed": t.passed, "rows": len(t.rows),
                        "mape": t.mape, "mape_by": t.mape_by().to_dict(orient="records"),
                        "failed": t.failed.to_dict(orient="records")} for t in tables],
        }, indent=1, default=str))
    else:
        if report.rows:
            typer.echo(format_runs(report))
        for table in tables:
            typer.echo("\n" + format_table(table))
    if not report.passed or not all(t.passed for t in tables):
        raise typer.Exit(1)


def format_runs(report) -> str:
    """A :class:`~moesim.fidelity.regress.RegressReport` as a table, one row per (run,
    metric), then the MAPE overall and per op class and the verdict."""
    from moesim.reports.terminal import render_table

    rows = [(Path(r.file).name, r.run, r.metric, f"{r.measured:.4g}", f"{r.simulated:.4g}",
             f"{r.rel_error:+.1%}", f"{r.tolerance:.0%}", "ok" if r.passed else "FAIL")
            for r in report.rows]
    lines = [render_table(("file", "run", "metric", "measured", "simulated", "error", "tol",
                           ""), rows, justify="lllrrrrl", width=None), ""]
    lines.append(f"MAPE {report.mape:.1%} over {len(report.rows)} metric(s)")
    lines += [f"  {op}: {value:.1%}" for op, value in report.mape_by_op.items()]
    lines.append("PASSED" if report.passed else f"FAILED: {len(report.failed)} of "
                 f"{len(report.rows)} metric(s) out of tolerance")
    return "\n".join(lines)


def format_table(report) -> str:
    """A :class:`~moesim.fidelity.perfdb.regress.TableReport`: MAPE per system x op class
    (in / out of sample), then the rows out of tolerance."""
    from moesim.reports.terminal import render_table

    by = report.mape_by()
    lines = [f"{report.file}: {len(report.rows)} rows, MAPE {report.mape:.1%}", "",
             render_table(("system", "op", "sample", "rows", "MAPE"), [
                 (r.system, r.op, r.sample, f"{r.rows:,}", f"{r.mape:.1%}")
                 for r in by.itertuples()], width=None)]
    failed = report.failed
    if len(failed):
        lines += ["", f"FAILED: {len(failed)} of {len(report.rows)} rows out of tolerance"]
        lines.append(render_table(("id", "measured (us)", "simulated (us)", "error",
                                   "tolerance"), [
            (r.id, f"{r.measured_us:.4g}", f"{r.simulated_us:.4g}", f"{r.rel_error:+.1%}",
             f"{r.tolerance:.0%}") for r in failed.head(20).itertuples()], indent=2,
            width=None))
    else:
        lines += ["", "PASSED"]
    return "\n".join(lines)
