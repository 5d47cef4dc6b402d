"""What every command shares: error handling and writing results."""

from __future__ import annotations

import functools
from pathlib import Path

import typer

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


def write_trace(path: Path, trace) -> None:
    from moesim.cli.output import write_atomic

    data = trace.to_bytes()
    write_atomic(path, lambda tmp: tmp.write_bytes(data))
