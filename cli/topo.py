"""`moesim topo ...`: the cluster topology presets and files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from moesim.cli.common import guarded

topo_app = typer.Typer(help="Cluster topologies (presets in topologies/*.yaml).",
                       no_args_is_help=True)


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
    from moesim.topologies.analysis import summarize

    topology = load_topology(name, gpus=gpus)
    summary = summarize(topology)
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
    from moesim.reports.terminal import render_table
    from moesim.topologies import load_topology, preset_names

    rows = []
    for name in preset_names():
        t = load_topology(name)
        rows.append((name, t.gpu, f"{t.max_gpus:,}", t.description))
    typer.echo(render_table(("preset", "GPU", "max GPUs", "description"), rows))


def _format_topology(s: dict) -> str:
    from moesim.reports.terminal import render_table

    facts = [("per-GPU NVLink", f"{s['nvlink_nominal_GBps']:.0f} GB/s nominal, "
                                f"{s['nvlink_achievable_GBps']:.0f} GB/s achievable "
                                "(per direction)")]
    if s.get("nic_nominal_GBps"):
        facts.append(("per-GPU NIC", f"{s['nic_nominal_GBps']:.0f} GB/s nominal, "
                                     f"{s['nic_achievable_GBps']:.0f} GB/s achievable "
                                     "(per direction)"))
    if s.get("n_leaves"):
        facts.append(("switches", f"{s['n_leaves']} leaves, {s['n_spines']} spines, "
                                  f"{s['rails']} rails, oversubscription "
                                  f"{s['oversubscription']}"))
    facts.append(("bisection", f"{s['bisection_GBps']:,.0f} GB/s (per direction)"))
    if s.get("source"):
        facts.append(("source", s["source"]))
    links = [(link["kind"], f"{link['count']:,}", f"{link['bandwidth_GBps']:.1f}",
              f"{link['efficiency']:.2f}", f"{link['latency_us']:.2f}") for link in s["links"]]
    return "\n".join([
        f"{s['name']}: {s['n_gpus']} x {s['gpu']} GPUs in {s['n_domains']} NVLink domain(s) "
        f"of {s['gpus_per_domain']}, fabric {s['fabric_kind']}",
        render_table(None, facts, indent=2, justify="ll"),
        "  link classes:",
        render_table(("kind", "directed links", "GB/s", "efficiency", "latency (us)"), links,
                     indent=4),
    ])
