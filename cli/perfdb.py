"""`moesim perfdb ...`: NVIDIA's measured kernel latencies as recorded-run tables
(`import`), GPU specs fitted to them (`fit`) and the regression subset (`subset`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moesim.cli.common import guarded
from moesim.cli.output import write_bytes
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
    write_bytes(out, data)
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


SYSTEM_HELP = "aiconfigurator system: h100_sxm, h200_sxm, b200_sxm or gb200."


def _representative(table_path: Path, systems: list[str] | None):
    from moesim.errors import InputError
    from moesim.fidelity.perfdb.predict import SYSTEMS
    from moesim.fidelity.perfdb.subset import representative
    from moesim.fidelity.perfdb.table import read_table

    df, provenance = read_table(table_path)
    for system in systems or []:
        if system not in SYSTEMS:
            raise InputError(f"unknown system {system!r}", field="--system",
                             allowed=", ".join(SYSTEMS))
    if systems:
        df = df[df["system"].isin(systems)]
    df = df[representative(df)]
    if df.empty:
        raise InputError("no rows moesim models in this table", source=str(table_path),
                         allowed=f"rows of {', '.join(SYSTEMS)} (see `moesim perfdb import`)")
    return df, provenance


@perfdb_app.command("fit")
@guarded
def fit(
    table: Annotated[Path, typer.Argument(help="Recorded-run table (moesim perfdb import).")],
    system: Annotated[str, typer.Option(help=SYSTEM_HELP)],
    out: Annotated[Path, typer.Option(help="Write the fitted spec here (YAML).")],
    max_rows: Annotated[int, typer.Option(
        min=10, help="Rows per fit stage (a seeded sample of larger stages).")] = 1500,
) -> None:
    """Fit one system's GPU spec to its measured kernels; write it as YAML.

    Stages in order: dense GEMMs, context attention and MLA, decode attention and MLA,
    balanced MoE, NCCL (with the NVLink efficiency), DeepEP normal and low-latency on
    one node. Power-law MoE and multi-node DeepEP rows are never fitted (out-of-sample).
    Copy the result to moesim/config/presets/gpus/<gpu>.yaml and its
    nvlink_efficiency into the system's topology presets to ship it.

    Examples:

      moesim perfdb fit moesim/fidelity/gpu_runs/perfdb_subset.parquet --system h100_sxm \
        --out h100.yaml
    """
    import yaml

    from moesim.fidelity.perfdb.fit import fit_system, fitted_document
    from moesim.fidelity.perfdb.predict import base_model
    from moesim.reports.terminal import render_table

    _check_out(out, suffix=".yaml")
    df, provenance = _representative(table, [system])
    model, results = fit_system(df, base_model(system), max_rows=max_rows)
    doc = fitted_document(model, results, provenance=provenance)
    typer.echo(f"{system}: fitted on {sum(r.rows for r in results)} rows")
    typer.echo(render_table(("stage", "rows", "MAPE before", "after"), [
        (r.stage, f"{r.rows:,}", f"{r.mape_before:.1%}", f"{r.mape_after:.1%}")
        for r in results], indent=2))
    write_bytes(out, yaml.safe_dump(doc, sort_keys=False).encode())
    typer.echo(f"wrote {out}")


@perfdb_app.command("subset")
@guarded
def subset(
    table: Annotated[Path, typer.Argument(help="Recorded-run table (moesim perfdb import).")],
    out: Annotated[Path, typer.Option(help="Write the subset here (Parquet table).")],
    per_group: Annotated[int, typer.Option(
        min=1, help="Rows per (system, op, phase, dtype, distribution, nodes), spread over sizes.")]
    = 30,
    system: Annotated[list[str] | None, typer.Option(help=SYSTEM_HELP + " Repeatable.")]
    = None,
) -> None:
    """Pick a regression subset covering every system, op class and size range, and
    give each (system, op) the tolerance its measured error needs with the shipped specs.

    Examples:

      moesim perfdb subset moesim/fidelity/gpu_runs/perfdb_subset.parquet --per-group 3 \
        --out small.parquet
    """
    import json

    from moesim.cli.regress import format_table
    from moesim.fidelity.perfdb.predict import base_model, predict
    from moesim.fidelity.perfdb.regress import regress_table
    from moesim.fidelity.perfdb.subset import stratified, with_tolerances
    from moesim.fidelity.perfdb.table import table_to_parquet_bytes

    _check_out(out)
    df, provenance = _representative(table, system)
    picked = stratified(df, per_group=per_group)
    models = {s: base_model(s) for s in picked["system"].unique()}
    picked = with_tolerances(picked, predict(picked, models))
    provenance = {**provenance, "subset": {
        "from": str(table), "per_group": per_group,
        "selection": "moesim.fidelity.perfdb.subset.representative + stratified",
        "tolerance": "per (system, op): measured max |error| with the shipped specs, "
                     "rounded up to 5%"}}
    data = table_to_parquet_bytes(picked, provenance)
    typer.echo(format_table(regress_table(picked, file=str(out))))
    typer.echo(json.dumps({"rows": len(picked), "bytes": len(data)}))
    write_bytes(out, data)
