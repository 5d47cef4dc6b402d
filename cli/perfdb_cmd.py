"""`moesim perfdb ...`: measured kernel latencies as recorded-run tables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moesim.cli.common import guarded
from moesim.errors import InputError

perfdb_app = typer.Typer(
    help="Measured kernel latencies from aiconfigurator-core "
         "(schema moesim.recorded-table/1).",
    no_args_is_help=True)


@perfdb_app.command("import")
@guarded
def import_(
    out: Annotated[Path, typer.Option(
        help="Write the table here (Parquet, schema moesim.recorded-table/1).")],
    root: Annotated[Path | None, typer.Option(
        help="aiconfigurator-core's systems/data folder (default: the installed "
             "package's).")] = None,
    system: Annotated[list[str] | None, typer.Option(
        help="Only this system folder, e.g. h100_sxm (repeatable).")] = None,
    op: Annotated[list[str] | None, typer.Option(
        help="Only this op: gemm, moe, attention_context, attention_generation, "
             "mla_context, mla_generation, nccl, deepep_normal, deepep_ll (repeatable).")]
    = None,
    framework: Annotated[list[str] | None, typer.Option(
        help="Only this framework folder: trtllm, sglang, vllm, nccl (repeatable).")]
    = None,
) -> None:
    """Import aiconfigurator-core's measured GPU kernel latencies into one table.

    Reads the GEMM, MoE, attention, MLA, NCCL and DeepEP tables of the installed
    aiconfigurator-core (moesim's `perfdb` extra) or of --root, converts them to one
    row per measured latency in microseconds, prints the rows per op and system and
    writes the Parquet file. See docs/perfdb.md.

    Examples:

      moesim perfdb import --root aic/systems/data --system h100_sxm --out h100.parquet

      moesim perfdb import --root aic/systems/data --op gemm --op moe --out kernels.parquet
    """
    from moesim.fidelity.perfdb.importer import import_perfdb
    from moesim.fidelity.perfdb.table import table_to_parquet_bytes

    _check_out(out)
    frame, provenance = import_perfdb(root, systems=system or None, ops=op or None,
                                      frameworks=framework or None)
    data = table_to_parquet_bytes(frame, provenance)
    _write_bytes(out, data)
    typer.echo(format_counts(frame))
    typer.echo(f"{len(frame):,} rows from {len(provenance['files'])} files of "
               f"{provenance['package']} {provenance['package_version']} "
               f"({provenance['root']}); {provenance['dropped_rows']:,} measurements "
               "dropped for a latency that is not a finite number > 0")
    typer.echo(f"wrote {out} ({len(data) / 1e6:.1f} MB)")


def _check_out(out: Path, suffix: str = ".parquet") -> None:
    """Fail before the work starts if ``out`` cannot be a file."""
    allowed = f"a file name ending in {suffix}"
    if out.is_dir():
        raise InputError("is a folder", field="--out", source=str(out), allowed=allowed)
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise InputError(f"{parent} is not a folder", field="--out", source=str(out),
                         allowed=allowed)


def format_counts(frame) -> str:
    """Rows per op (lines) and system (columns), with totals."""
    from moesim.fidelity.perfdb.table import OPS

    counts = frame.groupby(["op", "system"], observed=True).size().unstack(fill_value=0)
    counts = counts.reindex([op for op in OPS if op in counts.index])
    counts["total"] = counts.sum(axis=1)
    counts.loc["total"] = counts.sum(axis=0)
    counts.index.name = "rows"
    counts.columns.name = None
    return counts.to_string()


def _write_bytes(path: Path, data: bytes) -> None:
    from moesim.cli.output import write_atomic

    try:
        write_atomic(path, lambda tmp: tmp.write_bytes(data))
    except OSError as err:
        raise InputError(f"cannot write ({err.strerror or err})", field="--out",
                         source=str(path)) from None
