"""The `moesim` command: parses, calls the library, writes files, sets exit codes.

Exit codes: 0 ok, 1 a check failed, 2 bad input (one line naming file, field and what
is allowed; no traceback). Heavy modules load inside the commands so `--help` is fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from moesim.cli import perfdb_fit_cmd
from moesim.cli.calibrate_cmd import calibrate
from moesim.cli.capture_cmd import capture
from moesim.cli.common import guarded
from moesim.cli.perfdb_cmd import perfdb_app
from moesim.cli.record_cmd import record
from moesim.cli.regress_cmd import regress
from moesim.cli.trace_cmds import trace_app
from moesim.errors import InputError

app = typer.Typer(
    name="moesim",
    help="Simulate Mixture-of-Experts training and inference steps on GPU clusters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
topo_app = typer.Typer(help="Cluster topologies (presets in topologies/*.yaml).",
                       no_args_is_help=True)
app.add_typer(topo_app, name="topo")
app.add_typer(trace_app, name="trace")
app.add_typer(perfdb_app, name="perfdb")
perfdb_app.command("fit")(perfdb_fit_cmd.fit)
perfdb_app.command("subset")(perfdb_fit_cmd.subset)


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


SetOption = Annotated[
    list[str],
    typer.Option("--set", "-s", metavar="FIELD=VALUE",
                 help="Override a scenario field, e.g. parallel.ep=64 (repeatable)."),
]


@app.command()
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
    result = run(base)
    variants = [(text, run(sc)) for text, sc in variant_scenarios]

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


@topo_app.command("show")
@guarded
def topo_show(
    name: Annotated[str, typer.Argument(help="Preset name or topology YAML path.")],
    gpus: Annotated[int | None, typer.Option(help="Build it with this many GPUs.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    png: Annotated[Path | None, typer.Option(help="Draw the topology into this PNG file.")]
    = None,
) -> None:
    """Print GPUs, nodes, link classes, per-GPU bandwidth and bisection bandwidth.

    Examples:

      moesim topo show h800-cluster --gpus 256

      moesim topo show gb200-nvl72 --png nvl72.png
    """
    from moesim.topologies import load_topology

    topology = load_topology(name, gpus=gpus)
    summary = topology.summary()
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
    else:
        typer.echo(_format_topology(summary))
    if png is not None:
        from moesim.cli.output import write_figure
        from moesim.topologies.draw import figure

        write_figure(png, figure(topology))
        if not as_json:
            typer.echo(f"wrote {png}")


@topo_app.command("list")
def topo_list() -> None:
    """List the topology presets."""
    from moesim.topologies import load_topology, preset_names

    for name in preset_names():
        t = load_topology(name)
        typer.echo(f"{name:<20} {t.gpu:<9} up to {t.max_gpus} GPUs  {t.description}")


def _format_topology(s: dict) -> str:
    lines = [
        f"{s['name']}: {s['n_gpus']} x {s['gpu']} GPUs in {s['n_domains']} NVLink domain(s) "
        f"of {s['gpus_per_domain']}, fabric {s['fabric_kind']}",
        f"  per-GPU NVLink  {s['nvlink_nominal_GBps']:.0f} GB/s nominal, "
        f"{s['nvlink_achievable_GBps']:.0f} GB/s achievable (per direction)",
    ]
    if s.get("nic_nominal_GBps"):
        lines.append(f"  per-GPU NIC     {s['nic_nominal_GBps']:.0f} GB/s nominal, "
                     f"{s['nic_achievable_GBps']:.0f} GB/s achievable (per direction)")
    if s.get("n_leaves"):
        lines.append(f"  switches        {s['n_leaves']} leaves, {s['n_spines']} spines, "
                     f"{s['rails']} rails, oversubscription {s['oversubscription']}")
    lines.append(f"  bisection       {s['bisection_GBps']:,.0f} GB/s (per direction)")
    lines.append("  link classes:")
    for link in s["links"]:
        lines.append(f"    {link['kind']:<7} {link['count']:>6} directed links  "
                     f"{link['bandwidth_GBps']:>7.1f} GB/s x {link['efficiency']:.2f}  "
                     f"latency {link['latency_us']:.2f} us")
    if s.get("source"):
        lines.append(f"  source: {s['source']}")
    return "\n".join(lines)


# After `simulate`, so that `moesim --help` lists the main command first.
app.command()(capture)
app.command()(regress)
app.command()(calibrate)
app.command()(record)


def main() -> None:
    """Console entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
