"""The `moesim` command: parses, calls the library, writes files, sets exit codes.

One module per command or command group; this one only assembles them. Exit codes: 0
ok, 1 a check failed, 2 bad input (one line naming file, field and what is allowed; no
traceback). Heavy modules load inside the commands so `--help` is fast.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from moesim.cli.calibrate import calibrate
from moesim.cli.capture import capture
from moesim.cli.common import OneLineErrors
from moesim.cli.perfdb import perfdb_app
from moesim.cli.placement import placement
from moesim.cli.plan import plan
from moesim.cli.record import record
from moesim.cli.regress import regress
from moesim.cli.report import report
from moesim.cli.simulate import simulate
from moesim.cli.sweep import sweep
from moesim.cli.topo import topo_app
from moesim.cli.trace import trace_app

app = typer.Typer(
    cls=OneLineErrors,
    name="moesim",
    help="Simulate Mixture-of-Experts training and inference steps on GPU clusters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from moesim import __version__

        typer.echo(f"moesim {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Simulate Mixture-of-Experts training and inference steps on GPU clusters."""


# `simulate` first, so that `moesim --help` lists the main command first.
app.command()(simulate)
app.add_typer(topo_app, name="topo")
app.add_typer(trace_app, name="trace")
app.add_typer(perfdb_app, name="perfdb")
app.command()(capture)
app.command()(regress)
app.command()(calibrate)
app.command()(record)
app.command()(placement)
app.command()(sweep)
app.command()(plan)
app.command()(report)


def main() -> None:
    """Console entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
