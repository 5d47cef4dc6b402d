"""`moesim sweep`: many scenarios from one base and axes, one Parquet row per point."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from moesim.cli.common import guarded, out_folder
from moesim.errors import InputError

SchedulerOption = Annotated[str | None, typer.Option(
    "--scheduler", metavar="ADDRESS",
    help="Run the points on this Dask distributed scheduler (e.g. tcp://host:8786) "
         "instead of local worker processes.")]
ReportOption = Annotated[bool, typer.Option(
    "--report", help="Also write report.html (self-contained) and report.md.")]
WorkersOption = Annotated[int | None, typer.Option(
    "--workers", min=1, help="Local worker processes (default: one per core).")]


def results_path(out: Path) -> Path:
    return out / "results.parquet"


def read_stored(out: Path, spec_text: str, points, *, resume: bool,
                marker: str) -> list[dict]:
    """The rows a previous run of the same sweep stored in ``out`` (with ``--resume``);
    refuses to write over another run's results, or to mix them with this one's."""
    from moesim.cli.folders import read_parquet
    from moesim.inputs import read_text
    from moesim.output.tables import plain_records

    done = results_path(out)
    if not done.exists():
        return []
    if not resume:
        raise InputError(f"{out} already holds results; pass --resume to continue that "
                         "run, or choose another --out", field="--out")
    stored_spec = out / marker
    if not stored_spec.exists() or read_text(stored_spec, what=marker) != spec_text:
        raise InputError(f"{out} holds the results of a different {marker}; --resume "
                         "continues the same one", field="--resume")
    # A damaged results.parquet is one line naming it, not pyarrow's traceback.
    frame = read_parquet(done, columns=("scenario_hash",))
    stray = set(frame["scenario_hash"]) - {p.key for p in points}
    if stray:
        raise InputError(f"{len(stray)} of the {len(frame)} points stored in {out} are not "
                         "points of this sweep any more (its base scenario or a file it "
                         "names changed); --resume continues the same sweep",
                         field="--resume", allowed="another --out for the changed sweep")
    return plain_records(frame)


def run_points(points, *, out: Path, spec_text: str, stored: list[dict], pool, label: str,
               write_every_s: float = 1.0) -> list[dict]:
    """Simulate the points not in ``stored``. ``out`` gets ``sweep.yaml`` (``spec_text``),
    ``results.parquet`` (all rows so far) and ``progress.json`` with the first point,
    then at most every ``write_every_s`` seconds, and at the end, also when interrupted."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from moesim.cli.output import mark_results_folder, write_json, write_parquet, write_text
    from moesim.sweep.run import results_frame, simulate_point

    written = len(stored)

    def store(rows: list[dict]) -> None:
        """The sweep file, the rows so far, then how many of the points they are."""
        nonlocal written
        mark_results_folder(out)
        write_text(out / "sweep.yaml", spec_text)
        write_parquet(results_path(out), results_frame(rows))
        write_json(out / "progress.json", {"points_total": len(points),
                                           "points_stored": len(rows),
                                           "complete": len(rows) == len(points)})
        written = len(rows)

    have = {row["scenario_hash"] for row in stored}
    todo = [p for p in points if p.key not in have]
    rows = list(stored)
    results = pool.results(simulate_point, todo)
    console = Console(stderr=True)
    last = -math.inf
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console, disable=not sys.stderr.isatty()) as bar:
            task = bar.add_task(label, total=len(todo))
            for _, row in results:
                rows.append(row)
                bar.advance(task)
                if time.monotonic() - last >= write_every_s:
                    store(rows)
                    last = time.monotonic()
    finally:
        if len(rows) != written or not rows:
            store(rows)
    return rows


@guarded
def sweep(
    spec_file: Annotated[Path, typer.Argument(
        metavar="SWEEP.yaml", help="Sweep file: base scenario, axes, zip, seeds.")],
    out: Annotated[Path, typer.Option(
        parser=out_folder, help="Write results.parquet and sweep.yaml here.")],
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue a sweep in --out: points already stored are not run "
                         "again (failed ones neither).")] = False,
    scheduler: SchedulerOption = None,
    workers: WorkersOption = None,
    report: ReportOption = False,
) -> None:
    """Run a grid of scenarios; one Parquet row per point with its summary (mean over seeds).

    A stopped sweep continues with --resume (nothing stored is simulated again);
    --scheduler tcp://host:8786 runs the points on a Dask distributed cluster.

    Examples:

      moesim sweep examples/sweeps/quick.yaml --out runs/quick --report

      moesim sweep examples/sweeps/quick.yaml --out runs/quick --workers 1
    """
    from moesim.cli.output import check_out_target
    from moesim.inputs import load_yaml, read_text
    from moesim.sweep.executors import executor
    from moesim.sweep.spec import expand, parse_sweep

    source = str(spec_file)
    text = read_text(spec_file, what="sweep file")
    spec = parse_sweep(load_yaml(text, source=source), source=source)
    points = expand(spec, source=source)
    check_out_target(out)
    stored = read_stored(out, text, points, resume=resume, marker="sweep.yaml")
    started = time.monotonic()
    with executor(scheduler=scheduler, workers=workers) as pool:
        rows = run_points(points, out=out, spec_text=text, stored=stored, pool=pool,
                          label="sweep")
    seconds = time.monotonic() - started
    new = rows[len(stored):]
    invalid = sum(1 for p in points if p.scenario is None and p.key in
                  {r["scenario_hash"] for r in new})
    failed = sum(1 for row in new if row.get("error")) - invalid
    simulated = len(new) - invalid
    rate = simulated / seconds * 60 if seconds > 0 else 0.0
    typer.echo(f"{len(points)} points: {simulated} simulated ({failed} failed), {invalid} "
               f"not valid scenarios, {len(stored)} already stored (see the error column); "
               f"{seconds:.1f} s ({rate:.0f} points/min)")
    typer.echo(f"wrote {results_path(out)}")
    if report:
        from moesim.cli.report import report_folder

        report_folder(out)
