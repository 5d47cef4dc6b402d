"""`moesim simulate`: one step, its time breakdown, tables, trace and report."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

import typer

from moesim.cli.common import guarded, out_folder
from moesim.errors import InputError

SetOption = Annotated[
    list[str],
    typer.Option("--set", "-s", metavar="FIELD=VALUE",
                 help="Override a scenario field, e.g. parallel.ep=64 (repeatable)."),
]


# A comma that starts the next FIELD= of a what-if (not one inside a YAML value).
_NEXT_FIELD = re.compile(r"\s*[A-Za-z_][\w.-]*\s*=")


def split_what_if(text: str) -> list[str]:
    """The ``FIELD=VALUE`` overrides of one ``--what-if``: split on the commas outside
    brackets, braces and quotes that start a new ``FIELD=``, so a YAML value may hold
    commas (``parallel.x=[1,2]``, ``routing={a: 1, b: 2}``)."""
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth = max(depth - 1, 0)
        elif char == "," and depth == 0 and _NEXT_FIELD.match(text, i + 1):
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    for part in parts:
        if "=" not in part:
            raise InputError(f"{text!r}: {part!r} is not FIELD=VALUE", field="--what-if",
                             allowed="FIELD=VALUE[,FIELD=VALUE...], e.g. "
                                     "routing.max_devices=8,parallel.ep=32")
    return parts


@guarded
def simulate(
    scenario: Annotated[Path | None, typer.Argument(
        help="Scenario YAML; without it the embedded default runs "
             "(DeepSeek-V3 training, EP64 on the H800 cluster).")] = None,
    set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    out: Annotated[Path | None, typer.Option(
        parser=out_folder,
        help="Write summary, resolved scenario, tables (Parquet) and a Chrome trace here.")]
    = None,
    report: Annotated[bool, typer.Option(
        "--report", help="Also write report.md / report.html with figures (needs --out).")]
    = False,
    what_if: Annotated[list[str], typer.Option(
        "--what-if", metavar="FIELD=VALUE[,...]",
        help="Also run a variant with these overrides (comma-separated) and compare it "
             "with the baseline (repeatable: one variant each; needs --report).")] = None,
    trace_gpus: Annotated[int, typer.Option(
        min=0, help="GPUs in the Chrome trace (0 = all).")] = 16,
) -> None:
    """Simulate one step and print its time breakdown.

    Examples:

      moesim simulate

      moesim simulate --set parallel.ep=32 --set routing.max_devices=2 --json

      moesim simulate examples/v2-device-limited.yaml --out runs/v2 --report

      moesim simulate --out runs/m8 --report --what-if routing.max_devices=8

      moesim simulate --out runs/w --report --what-if routing.max_devices=8,parallel.micro_batches=1
    """
    from moesim import load_scenario
    from moesim.config.loading import DEFAULT_SCENARIO, attribute
    from moesim.simulation import simulate as run

    overrides = list(set_ or [])
    variants_wanted = list(what_if or [])
    if report and out is None:
        raise InputError("--report writes files and needs --out DIR", field="--report")
    if variants_wanted and not report:
        raise InputError("--what-if results appear in the report; add --report --out DIR",
                         field="--what-if")
    if out is not None:
        from moesim.cli.output import check_out_target

        check_out_target(out)
    base = load_scenario(scenario, overrides=overrides)
    # Load every variant before running anything: a bad one must not cost a long run.
    variant_fields = [split_what_if(text) for text in variants_wanted]
    variant_scenarios = [(fields, load_scenario(scenario, overrides=[*overrides, *fields]))
                         for fields in variant_fields]

    def simulated(sc, extra=()):
        """A run whose mistakes (e.g. a trace that cannot drive it) name the scenario's
        file or ``--set`` as loading does."""
        try:
            return run(sc)
        except InputError as err:
            source = f"<default scenario {DEFAULT_SCENARIO}>" if scenario is None \
                else str(scenario)
            raise attribute(err, source, [*overrides, *extra]) from None

    result = simulated(base)
    runs = [(fields, simulated(sc, fields)) for fields, sc in variant_scenarios]
    # A variant's label: its overrides, ", " between them (one per line in the terminal).
    variants = [(", ".join(fields), res) for fields, res in runs]
    said = set()  # a variant that shares the baseline's warning need not repeat it
    for label, res in (("", result), *((f" (what if {name})", r) for name, r in variants)):
        for warning in res.warnings:
            if warning not in said:
                said.add(warning)
                typer.echo(f"moesim: warning{label}: {warning}", err=True)

    if as_json:
        typer.echo(json.dumps(result.summary, indent=1))
    else:
        from moesim.reports.text import format_summary

        typer.echo(format_summary(result.summary, base.topology))
        if variants:
            from moesim.reports.text import format_what_if

            typer.echo(format_what_if(result.summary, [
                ("\n".join(fields), res.summary) for fields, res in runs]))
    if out is not None:
        from moesim.cli.output import staged_folder

        with staged_folder(out) as stage:
            _write_outputs(stage, result, variants, report=report, trace_gpus=trace_gpus)
        if not as_json:
            typer.echo(f"wrote {out}/")


def _write_outputs(out: Path, result, variants, *, report: bool, trace_gpus: int) -> None:
    import yaml

    from moesim.cli.output import write_json, write_parquet, write_text
    from moesim.output.timeline import chrome_trace, pipeline_trace

    write_json(out / "summary.json", result.summary)
    write_text(out / "scenario.yaml", yaml.safe_dump(result.scenario.to_dict(), sort_keys=False))
    write_parquet(out / "spans.parquet", result.spans)
    write_parquet(out / "links.parquet", result.links)
    write_parquet(out / "experts.parquet", result.experts)
    if result.balance is not None:
        write_parquet(out / "balance.parquet", result.balance)
    write_json(out / "timeline.json",
               chrome_trace(result.spans, max_gpus=trace_gpus or None))
    if result.pipeline is not None:  # the whole training step (docs/training.md)
        write_parquet(out / "pipeline.parquet", result.pipeline)
        write_json(out / "pipeline_timeline.json", pipeline_trace(result.pipeline))
    write_json(out / "warnings.json", list(result.warnings))
    if report:
        from moesim.cli.report import write_report
        from moesim.reports.simulation_report import build_report

        blocks, figures = build_report(result, variants)
        write_report(out, blocks, figures, title=result.scenario.name)
