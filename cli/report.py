"""`moesim report`: one self-contained HTML file (and Markdown) for a simulate, sweep or
plan output folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moesim.cli.common import guarded, out_folder
from moesim.errors import InputError


def write_report(out: Path, blocks, figures: dict, *, title: str) -> None:
    """``report.html`` (figures embedded), ``report.md`` and its ``figures/*.png``."""
    from moesim.cli.output import write_bytes, write_text
    from moesim.reports.document import figure_png, to_html, to_markdown

    images = {f"figures/{name}": figure_png(figure) for name, figure in figures.items()}
    for path, data in images.items():
        write_bytes(out / path, data)
    write_text(out / "report.md", to_markdown(blocks))
    write_text(out / "report.html", to_html(blocks, title=title, images=images))


def _simulation(folder: Path):
    """The SimResult a `moesim simulate --out` folder holds."""
    from moesim.cli.folders import RERUN, read_json, read_parquet
    from moesim.config.loading import scenario_from_dict
    from moesim.inputs import MAX_RESULT_MAGNITUDE, read_yaml
    from moesim.output.result import SimResult
    from moesim.output.summary import summary_problem
    from moesim.output.tables import TABLE_COLUMNS

    scenario = scenario_from_dict(read_yaml(folder / "scenario.yaml"),
                                  source=str(folder / "scenario.yaml"))
    summary = read_json(folder / "summary.json")
    problem = summary_problem(summary, most=MAX_RESULT_MAGNITUDE)
    if problem is not None:
        raise InputError("not the summary moesim wrote", field=problem[0],
                         source=str(folder / "summary.json"),
                         allowed=f"{problem[1]}; run `moesim simulate --out` again")
    warnings_file = folder / "warnings.json"
    warnings = tuple(read_json(warnings_file, kind=list)) if warnings_file.exists() else ()
    balance = folder / "balance.parquet"
    tables = {name: read_parquet(folder / f"{name}.parquet", columns=columns)
              for name, columns in TABLE_COLUMNS.items()}
    for name in ("spans", "experts"):  # every step has ops and every MoE layer experts
        if tables[name].empty:
            raise InputError("no rows", source=str(folder / f"{name}.parquet"),
                             allowed=RERUN)
    if tables["experts"].duplicated(["layer", "expert"]).any():
        raise InputError("an expert twice in one layer", field="expert",
                         source=str(folder / "experts.parquet"), allowed=RERUN)
    return SimResult(scenario=scenario, summary=summary, **tables,
                     balance=read_parquet(balance) if balance.exists() else None,
                     warnings=warnings)


# The columns of a sweep's results table that its report reads, and their kinds
# (moesim.cli.folders.check_columns); memory columns and spreads are numbers where present.
SWEEP_COLUMNS = {"error": "t", "step_time_s": "n", "tokens_per_s_per_gpu": "n",
                 "dropped_token_fraction": "n"}


def read_progress(path: Path) -> dict:
    """A sweep's ``progress.json``: whether it completed, and its points stored of all."""
    from moesim.cli.folders import RERUN, read_json

    progress = read_json(path)
    for key, kind in (("complete", bool), ("points_stored", int), ("points_total", int)):
        if not isinstance(progress.get(key), kind):
            raise InputError("not the progress moesim wrote", field=key, source=str(path),
                             allowed=f"{'true or false' if kind is bool else 'an integer'}; "
                                     f"{RERUN}")
    return progress


def build(folder: Path):
    """(blocks, figures, title) of whatever ``folder`` holds."""
    from moesim.cli.folders import check_columns, read_parquet
    from moesim.inputs import read_yaml

    if (folder / "plan.json").exists():
        from moesim.cli.plan import read_plan_document
        from moesim.reports.plan_report import build_plan_report

        document = read_plan_document(folder / "plan.json")
        axes = document["frontier_axes"]
        points = read_parquet(folder / "plan.parquet", columns={
            "setup": "t", "status": "t", axes["x_key"]: "n", axes["y_key"]: "n"})
        blocks, figures = build_plan_report(document, points)
        return blocks, figures, "moesim plan"
    if (folder / "results.parquet").exists():
        from moesim.reports.sweep_report import build_sweep_report
        from moesim.sweep.spec import parse_sweep

        spec = read_yaml(folder / "sweep.yaml", what="sweep file")
        parse_sweep(spec, source=str(folder / "sweep.yaml"))  # the sweep file as run
        progress = folder / "progress.json"
        progress = read_progress(progress) if progress.exists() else None
        results = read_parquet(folder / "results.parquet",
                               columns=dict.fromkeys(map(str, spec["axes"]), "") | SWEEP_COLUMNS)
        check_columns(results, {name: "p" for name in results.columns
                                if name.startswith("memory_") or name.endswith("_std")}
                      | {"fits_in_memory": "B"}, source=folder / "results.parquet")
        blocks, figures = build_sweep_report(results, spec, progress=progress)
        return blocks, figures, "moesim sweep"
    if (folder / "summary.json").exists():
        from moesim.reports.simulation_report import build_report

        result = _simulation(folder)
        blocks, figures = build_report(result)
        return blocks, figures, result.scenario.name
    raise InputError("holds no moesim results", source=str(folder),
                     allowed="a folder written by `moesim simulate --out`, `moesim sweep "
                             "--out` or `moesim plan --out`")


@guarded
def report(
    folder: Annotated[Path, typer.Argument(
        metavar="RESULT_DIR", help="A folder written by simulate, sweep or plan --out.")],
    out: Annotated[Path | None, typer.Option(
        parser=out_folder,
        help="Write the report here (default: into RESULT_DIR).")] = None,
) -> None:
    """Write report.html (self-contained) and report.md for a result, sweep or plan folder.

    Examples:

      moesim report reports/examples/sweep-quick --out runs/sweep-report
    """
    if not folder.is_dir():
        raise InputError("no such folder", source=str(folder),
                         allowed="a folder written by simulate, sweep or plan --out")
    report_folder(folder, out)


def report_folder(folder: Path, out: Path | None = None) -> None:
    """Build the report of ``folder`` and write it into ``out`` (default: ``folder``)."""
    from moesim.cli.output import staged_folder

    blocks, figures, title = build(folder)
    target = out or folder
    with staged_folder(target, adding=out is None or out.resolve() == folder.resolve()) as stage:
        write_report(stage, blocks, figures, title=title)
    typer.echo(f"wrote {target}/report.html, report.md")
