"""What every command shares: error handling and writing results."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from moesim.errors import InputError


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"moesim: error: {message}", err=True)
    return typer.Exit(code)


def guarded(command):
    """Turn user mistakes into one clear line and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except InputError as err:
            raise fail(str(err)) from None

    return wrapper


def out_folder(text: str) -> Path:
    """The ``--out`` folder: an empty text is a mistake, not the current folder."""
    if not text.strip():
        raise typer.BadParameter("an empty path (give a folder, e.g. runs/x)")
    return Path(text)


def write_trace(path: Path, trace) -> None:
    from moesim.cli.output import write_bytes

    write_bytes(path, trace.to_bytes())


class OneLineErrors(TyperGroup):
    """The `moesim` command group: a usage mistake (an unknown option, a missing argument,
    a value of the wrong type) reads like every other mistake, one line and exit code 2,
    instead of click's usage box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        _name_a_command(self)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False,
                                **extra)
        except TyperException as err:  # typer's usage errors (its own copy of click's)
            if not hasattr(err, "format_message"):
                raise
            ctx = getattr(err, "ctx", None)
            where = f"{ctx.command_path}: " if ctx else ""
            message = " ".join(err.format_message().split())
            if message == "Missing command." and ctx and hasattr(ctx.command, "commands"):
                message = (f"missing command (allowed: {', '.join(ctx.command.commands)}; "
                           f"see {ctx.command_path} --help)")
            typer.echo(f"moesim: error: {where}{message}", err=True)
            sys.exit(err.exit_code)
        except typer.Abort:
            typer.echo("moesim: error: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _name_a_command(group) -> None:
    """A group called without a command fails with "Missing command." (one line, exit 2),
    not with typer's no-args help: that help printed itself and left click an empty
    error message to show."""
    group.no_args_is_help = False
    for command in getattr(group, "commands", {}).values():
        if hasattr(command, "commands"):
            _name_a_command(command)
