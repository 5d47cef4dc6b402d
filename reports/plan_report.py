"""The report of a plan: the winner and why, runners-up, pruning, the frontier."""

from __future__ import annotations

import pandas as pd

from moesim.reports import planning_figures
from moesim.reports.document import Block, Figure, Heading, Paragraph, Table


def amount(value: float) -> str:
    """A cost or a rate: whole numbers with thousands separators from 100 up."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4g}"


def _row(r: dict, unit: str) -> tuple[str, ...]:
    return (r["setup"], f"{amount(r['cost'])} {unit}", f"{r['tokens_per_s']:,.0f}",
            f"{r['tokens_per_s_per_gpu']:,.0f}", f"{r['step_time_s']:.4g} s",
            f"{r.get('memory_gib_per_gpu') or 0:.1f} GiB")


def frontier_figure(document: dict, points: pd.DataFrame):
    """The frontier figure of a plan (``None`` when nothing was simulated)."""
    simulated = points[points["status"].isin(["simulated", "misses target"])]
    if simulated.empty:
        return None
    axes = document["frontier_axes"]
    unit = document["cost_unit"]
    front = pd.DataFrame(document["frontier"])
    winner = pd.Series(document["winner"]) if document["winner"] else None
    return planning_figures.frontier(
        simulated, front, winner, x=axes["x_key"], y=axes["y_key"],
        x_label=axes["x"] + (f" ({unit})" if axes["x_key"] == "cost" else ""),
        y_label=axes["y"], target=document["target"].get(axes["y_key"]))


def build_plan_report(document: dict, points: pd.DataFrame) -> tuple[list[Block], dict]:
    """Blocks and figures of a plan from ``plan.json`` and ``plan.parquet``."""
    unit = document["cost_unit"]
    header = ("setup", "cost", "tokens/s", "tokens/s per GPU", "step", "memory per GPU")
    target = ", ".join(
        f"{k.replace('_', ' ')} {'at least' if k.startswith('tokens') else 'at most'} "
        f"{amount(v)}" for k, v in document["target"].items()) or "none"
    blocks: list[Block] = [
        Heading("moesim plan report", 1),
        Paragraph(f"Plan {document['plan']} ({document['mode']}): cheapest setup by "
                  f"{document['cost_metric'].replace('_', ' ')}; target: {target}. "
                  f"{document['points_simulated']} of {document['points_total']} setups "
                  f"simulated in {document['wall_time_s']:.1f} s."),
        *(Paragraph(line) for line in document["explanation"]),
    ]
    ranked = ([document["winner"]] if document["winner"] else []) + document["runners_up"]
    if ranked:
        blocks += [Heading("Winner and runners-up"),
                   Table(("rank", *header), tuple(
                       ("winner" if i == 0 else str(i), *_row(r, unit))
                       for i, r in enumerate(ranked)))]
    counts = document["counts"]
    blocks += [Heading("How the search was pruned"),
               Table(("outcome", "setups"), tuple((k, str(v)) for k, v in
                                                  sorted(counts.items()))),
               Paragraph("invalid: not a valid scenario; constraint: outside the plan's "
                         "limits; memory: does not fit in GPU memory; unreachable: misses "
                         "the target even at its step-time lower bound; bound: can neither "
                         "win nor join the frontier; simulated / misses target: run.")]
    figs = {}
    axes = document["frontier_axes"]
    figure = frontier_figure(document, points)
    if figure is not None:
        figs["frontier.png"] = figure
        blocks += [Heading("Pareto frontier"),
                   Figure("figures/frontier.png",
                          f"{axes['y']} against {axes['x']}: setups on the blue line are "
                          "not beaten on both at once; the star is the winner."),
                   Table(header, tuple(_row(r, unit) for r in document["frontier"]))]
    blocks += [Heading("Files"),
               Paragraph("plan.json: winner, runners-up, frontier, counts, explanation; "
                         "plan.parquet: every setup with its status, reason, bounds and, "
                         "when simulated, every summary key; plan.yaml: the plan file.")]
    return blocks, figs
