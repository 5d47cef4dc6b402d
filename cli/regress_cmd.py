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
        help="Recorded-run YAML files or folders (default: the shipped traces/recorded).")]
    = None,
    include_known_gaps: Annotated[bool, typer.Option(
        "--include-known-gaps", help="Also run the measured cases the model misses today.")]
    = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
) -> None:
    """Compare the simulator with recorded GPU runs; exit 1 if any is out of tolerance.

    Prints measured vs simulated per run and metric, the relative error, its tolerance
    and the MAPE. `--include-known-gaps` adds the measurements the model misses today
    (traces/recorded/known_gaps.yaml), so it exits 1 by design.

    Examples:

      moesim regress

      moesim regress traces/recorded/deepgemm_grouped_h800.yaml --json
    """
    from moesim.recorded import recorded_dir
    from moesim.regress import format_report
    from moesim.regress import regress as run_regress

    report = run_regress(runs or [recorded_dir()], include_known_gaps=include_known_gaps)
    if as_json:
        typer.echo(json.dumps({
            "passed": report.passed, "mape": report.mape, "mape_by_op": report.mape_by_op,
            "rows": [row.__dict__ for row in report.rows],
        }, indent=1, default=str))
    else:
        typer.echo(format_report(report))
    if not report.passed:
        raise typer.Exit(1)
