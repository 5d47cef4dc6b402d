"""`moesim simulate`: one step, its time breakdown, tables, trace and report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from moesim.cli.common import guarded
from moesim.errors import InputError

SetOption = Annotated[
    list[str],
    typer.Option("--set", "-s", metavar="FIELD=VALUE",
                 help="Override a scenario field, e.g. parallel.ep=64 (repeatable)."),
]


@guarded
def simulate(
    scenario: Annotated[Path | None, typer.Argument(
        help="Scenario YAML; without it the embedded default runs "
             "(DeepSeek-V3 training, EP64 on the H800 cluster).")] = None,
    set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    out: Annotated[Path | None, typer.Option(
        help="Write summary, resolved scenario, tables (Parquet) and a Chrome trace here.")]
    = None,
    report: Annotated[bool, typer.Option(
        "--report", help="Also write report.md / report.html with figures (needs --out).")]
    = False,
    what_if: Annotated[list[str], typer.Option(
        "--what-if", metavar="FIELD=VALUE",
        help="Also run a variant with this override and compare it in the report "
             "(repeatable; needs --report).")] = None,
    trace_gpus: Annotated[int, typer.Option(
        min=0, help="GPUs in the Chrome trace (0 = all).")] = 16,
) -> None:
    """Simulate one step and print its time breakdown.

    Examples:

      moesim simulate

      moesim simulate --set parallel.ep=32 --set routing.max_devices=2 --json

      moesim simulate examples/v2-device-limited.yaml --out runs/v2 --report

      moesim simulate --out runs/m8 --report --what-if routing.max_devices=8
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
    base = load_scenario(scenario, overrides=overrides)
    # Load every variant before running anything: a bad one must not cost a long run.
    variant_scenarios = [(text, load_scenario(scenario, overrides=[*overrides, text]))
                         for text in variants_wanted]

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
    variants = [(text, simulated(sc, [text])) for text, sc in variant_scenarios]
    for res in (result, *(r for _, r in variants)):
        for warning in res.warnings:
            typer.echo(f"moesim: warning: {warning}", err=True)

    if as_json:
        typer.echo(json.dumps(result.summary, indent=1))
    else:
        from moesim.reports.text import format_summary

        typer.echo(format_summary(result.summary, base.topology))
        for text, res in variants:
            s, b = res.summary, result.summary
            typer.echo(f"  what if {text}: step {s['step_time_s']:.4g} s "
                       f"({s['step_time_s'] / b['step_time_s'] - 1:+.1%}), "
                       f"RDMA {s['rdma_bytes'] / max(b['rdma_bytes'], 1) - 1:+.1%}")
    if out is not None:
        _write_outputs(out, result, variants, report=report, trace_gpus=trace_gpus)
        if not as_json:
            typer.echo(f"wrote {out}/")


def _write_outputs(out: Path, result, variants, *, report: bool, trace_gpus: int) -> None:
    import yaml

    from moesim.cli.output import write_figure, write_json, write_parquet, write_text
    from moesim.output.timeline import chrome_trace

    write_json(out / "summary.json", result.summary)
    write_text(out / "scenario.yaml", yaml.safe_dump(result.scenario.to_dict(), sort_keys=False))
    write_parquet(out / "spans.parquet", result.spans)
    write_parquet(out / "links.parquet", result.links)
    write_parquet(out / "experts.parquet", result.experts)
    if result.balance is not None:
        write_parquet(out / "balance.parquet", result.balance)
    write_json(out / "timeline.json",
               chrome_trace(result.spans, max_gpus=trace_gpus or None))
    if report:
        from moesim.reports.document import to_html, to_markdown
        from moesim.reports.simulation_report import build_report

        blocks, figures = build_report(result, variants)
        for name, figure in figures.items():
            write_figure(out / "figures" / name, figure)
        write_text(out / "report.md", to_markdown(blocks))
        write_text(out / "report.html", to_html(blocks, title=result.scenario.name))
