"""The report of a sweep: its best points, curves along every axis, memory, failures."""

from __future__ import annotations

import pandas as pd

from moesim.reports import planning_figures
from moesim.reports.document import Block, Figure, Heading, Paragraph, Table


def _value(v) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "none"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def setup_label(row: pd.Series, axes: list[str]) -> str:
    return ", ".join(f"{a}={_value(row[a])}" for a in axes)


def build_sweep_report(results: pd.DataFrame, spec: dict, *,
                       progress: dict | None = None) -> tuple[list[Block], dict]:
    """Blocks and figures ``{file name: matplotlib Figure}`` of a sweep's results table
    (``results.parquet``), its spec (``sweep.yaml`` as a mapping) and its
    ``progress.json`` (an unfinished sweep says so)."""
    axes = list(spec["axes"])
    ok = results[results["error"].isna()]
    failed = results[results["error"].notna()]
    seeds = int(spec.get("seeds", 1))
    blocks: list[Block] = [
        Heading("moesim sweep report", 1),
        *([Paragraph(f"Incomplete: {progress['points_stored']} of "
                     f"{progress['points_total']} points are stored; `moesim sweep ... "
                     "--resume` runs the rest.")]
          if progress is not None and not progress["complete"] else []),
        Paragraph(f"{len(results)} points over {', '.join(axes)} ({seeds} seed(s) each: "
                  f"values are means, ± the standard deviation over seeds); "
                  f"{len(ok)} with results, {len(failed)} without (listed at the end)."),
    ]
    figs: dict = {}
    if not ok.empty:
        best = ok.sort_values("tokens_per_s_per_gpu", ascending=False).head(10)
        rows = tuple(
            (setup_label(r, axes),
             f"{r['tokens_per_s_per_gpu']:,.0f} ± {r.get('tokens_per_s_per_gpu_std', 0):,.0f}",
             f"{r['step_time_s']:.4g}", f"{r['dropped_token_fraction']:.2%}",
             f"{r['memory_gib_per_gpu']:.1f}" if "memory_gib_per_gpu" in r else "-",
             ("yes" if r["fits_in_memory"] else "NO") if "fits_in_memory" in r else "-")
            for _, r in best.iterrows())
        blocks += [Heading("Best points by tokens/s per GPU"),
                   Table(("setup", "tokens/s per GPU", "step (s)", "dropped",
                          "GiB per GPU", "fits"), rows)]
        if seeds > 1 and len(best) > 1:
            a, b = best.iloc[0], best.iloc[1]
            spread = (a.get("tokens_per_s_per_gpu_std", 0) ** 2
                      + b.get("tokens_per_s_per_gpu_std", 0) ** 2) ** 0.5
            gap = a["tokens_per_s_per_gpu"] - b["tokens_per_s_per_gpu"]
            verdict = "within" if gap <= 2 * spread else "outside"
            blocks.append(Paragraph(
                f"The first two differ by {gap:,.0f} tokens/s per GPU, {verdict} twice "
                f"their combined spread over seeds ({spread:,.0f})."))
        blocks.append(Heading("Throughput along each axis"))
        for axis in axes:
            if ok[axis].nunique(dropna=False) < 2:
                continue
            name = f"curve_{axis.replace('.', '_')}.png"
            others = [a for a in axes if a != axis and ok[a].nunique(dropna=False) > 1]
            figs[name] = planning_figures.sweep_curve(ok, axis, others)
            blocks.append(Figure(f"figures/{name}",
                                 f"Tokens/s per GPU against {axis}, one line per value of "
                                 "the other axes; higher is better, bars are the spread "
                                 "over seeds."))
        if "memory_gib_per_gpu" in ok:
            capacity = ok["memory_capacity_gib"].max() if "memory_capacity_gib" in ok else None
            blocks.append(Heading("Memory per GPU"))
            figs["memory.png"] = planning_figures.memory_by_point(
                ok, [setup_label(r, axes) for _, r in ok.iterrows()], capacity)
            blocks.append(Figure("figures/memory.png",
                                 "Memory per GPU of each point by part; a bar past the "
                                 "dashed line does not fit."))
    if not failed.empty:
        blocks += [Heading("Points without results"),
                   Table(("setup", "why"), tuple((setup_label(r, axes), str(r["error"]))
                                                 for _, r in failed.iterrows()))]
    blocks += [Heading("Files"),
               Paragraph("results.parquet: one row per point (axis values, resolved "
                         "fields, scenario_hash, every summary key; docs/metrics.md); "
                         "sweep.yaml: the sweep file as run.")]
    return blocks, figs
