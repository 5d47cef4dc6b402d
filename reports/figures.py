"""Figures of a simulated step. matplotlib is imported here only, when drawing.

Every figure has a title, axis labels with units and a one-line reading aid, drawn under
the title and kept in ``READING`` (the report's captions repeat it). Colour scales and
axes are anchored (heat maps at zero or around the mean, utilization from 0 to 100 %) so
that noise never looks like structure.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# One line per figure: how to read it. Keys are the functions' names.
READING = {
    "step_breakdown": "Longer segment = more time; the dashed line is the whole step, so "
                      "the gap before it is time spent waiting.",
    "expert_time_heatmap": "Brighter = more expert time; colour starts at 0 ms, so a "
                           "uniform colour means balanced GPUs.",
    "link_utilization": "Further right = busier link (0-100 % of the step); boxes span the "
                        "middle half of the links of a class.",
    "expert_load": "Red = more load than the layer mean, blue = less, white = the mean; "
                   "an even pale map means balanced experts.",
    "gpu_load": "Bars above the dashed mean are the GPUs the others wait for; a flat "
                "profile means balanced.",
    "balance_series": "Lines falling toward 1 mean the bias updates even out the load; "
                      "red: the step time.",
    "pipeline_schedule": "One row per stage; white gaps are the pipeline bubble, time a "
                         "stage waits for activations or gradients.",
}

# Schedule items by kind: forward, backward (input and weight gradients), overlapped.
_KIND_COLOURS = {"F": "tab:blue", "B": "tab:orange", "W": "tab:green", "BW": "tab:red",
                 "FB": "tab:purple"}

# Expert load heat map: the colour range around the layer mean (1.0) never narrows
# below 0..2, so a few percent of noise stays pale.
LOAD_RANGE = 2.0
# Expert-time heat map: the colour range always starts at 0 ms.


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(ax, title: str, xlabel: str, ylabel: str, reading: str) -> None:
    """Title, axis labels and the reading aid (a smaller line under the title)."""
    ax.set_title(title, pad=16)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.text(0.5, 1.01, reading, transform=ax.transAxes, ha="center", va="bottom",
            fontsize=7.5, color="0.3", style="italic")


def _layer_ticks(ax, layers) -> None:
    """Row ticks at the model's layer numbers, at most about 12 of them."""
    layers = list(layers)
    step = max(1, -(-len(layers) // 12))
    rows = list(range(0, len(layers), step))
    ax.set_yticks(rows, [str(layers[r]) for r in rows])


def step_breakdown(summary: dict):
    """Where one GPU's step goes: compute phases, then exposed communication."""
    plt = _plt()
    parts = [
        ("attention", summary["attention_time_s"]),
        ("expert GEMMs", summary["expert_compute_time_s"]),
        ("shared experts", summary["shared_expert_time_s"]),
        ("dense FFN", summary["dense_ffn_time_s"]),
        ("LM head", summary["lm_head_time_s"]),
        ("exposed comm", summary["comm_exposed_time_s"]),
    ]
    fig, ax = plt.subplots(figsize=(8, 2.4))
    left = 0.0
    for label, seconds in parts:
        ax.barh([0], [seconds * 1e3], left=left, label=label)
        left += seconds * 1e3
    ax.axvline(summary["step_time_s"] * 1e3, color="k", ls="--", lw=1, label="step time")
    ax.set_yticks([])
    ax.set_xlim(0, max(left, summary["step_time_s"] * 1e3) * 1.02)
    _label(ax, "Step breakdown of the mean GPU", "time per step (ms)", "mean GPU",
           READING["step_breakdown"])
    ax.legend(ncol=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.45))
    return fig


def expert_time_heatmap(spans: pd.DataFrame):
    """Forward expert-GEMM time per GPU and MoE layer (imbalance shows as stripes).

    The colour scale runs from 0 ms to the largest cell: a GPU twice as busy as the
    others stands out, one 3 % busier does not."""
    plt = _plt()
    fwd = spans[(spans["phase"] == "experts") & ~spans["backward"]]
    dur = (fwd["end_s"] - fwd["start_s"]) * 1e3
    grid = dur.groupby([fwd["layer"], fwd["gpu"]], observed=True).sum().unstack("gpu")
    values = grid.to_numpy(float)
    top = float(np.nanmax(values)) if values.size and np.isfinite(values).any() else 0.0
    fig, ax = plt.subplots(figsize=(8, 3.6))
    image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest",
                      vmin=0.0, vmax=top if top > 0 else 1.0)
    _layer_ticks(ax, grid.index)
    _label(ax, "Forward expert GEMM time per GPU and MoE layer", "GPU (rank)",
           "MoE layer (model layer number)", READING["expert_time_heatmap"])
    fig.colorbar(image, ax=ax).set_label("forward expert GEMMs (ms)")
    return fig


def link_utilization(links: pd.DataFrame):
    """Utilization of every directed link over the step, by class, on a 0-100 % axis."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    kinds = [k for k in ("nvlink", "nic", "uplink") if (links["kind"] == k).any()]
    data = [links.loc[links["kind"] == k, "utilization"].to_numpy() * 100 for k in kinds]
    if kinds:
        ax.boxplot(data, orientation="horizontal")
        ax.set_yticks(range(1, len(kinds) + 1), kinds)
    top = max([100.0, *(float(d.max()) * 1.02 for d in data if d.size)])
    ax.set_xlim(0, top)
    _label(ax, "Link utilization, each directed link", "busy share of the step (%)",
           "link class", READING["link_utilization"])
    return fig


def expert_load(experts: pd.DataFrame):
    """Assignments per expert and MoE layer, relative to the layer's mean.

    A diverging colour map centred on the mean (1.0), from 0 to at least 2: a layer whose
    experts sit within a few percent of the mean stays white."""
    plt = _plt()
    from matplotlib.colors import TwoSlopeNorm

    table = experts.pivot(index="layer", columns="expert", values="tokens")
    grid = table.to_numpy(float)
    mean = grid.mean(axis=1, keepdims=True)
    rel = np.divide(grid, mean, out=np.zeros_like(grid), where=mean > 0)
    top = max(LOAD_RANGE, float(rel.max()) if rel.size else 0.0)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    image = ax.imshow(rel, aspect="auto", cmap="RdBu_r", interpolation="nearest",
                      norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top))
    _layer_ticks(ax, table.index)
    _label(ax, "Expert load relative to the layer mean", "routed expert (id)",
           "MoE layer (model layer number)", READING["expert_load"])
    fig.colorbar(image, ax=ax).set_label("assignments / layer mean (1 = mean)")
    return fig


def gpu_load(spans: pd.DataFrame, placement: str):
    """Forward expert-GEMM time per GPU over the step, sorted, against the mean: how far
    the busiest GPUs stand above the others under the step's placement."""
    plt = _plt()
    fwd = spans[(spans["phase"] == "experts") & ~spans["backward"]]
    per_gpu = ((fwd["end_s"] - fwd["start_s"]) * 1e3).groupby(fwd["gpu"], observed=True).sum()
    ordered = np.sort(per_gpu.to_numpy())[::-1]
    mean = float(ordered.mean()) if ordered.size else 0.0
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.bar(np.arange(ordered.size), ordered, width=1.0, color="tab:blue")
    ax.axhline(mean, color="k", ls="--", lw=1, label="mean")
    ax.set_ylim(bottom=0)
    ratio = f"{ordered.max() / mean:.2f}" if mean > 0 else "-"
    _label(ax, f"Expert work per GPU, placement {placement} (max/mean {ratio})",
           "GPUs, busiest first (count)", "forward expert GEMMs (ms)", READING["gpu_load"])
    ax.legend(fontsize=8)
    return fig


def balance_series(series: pd.DataFrame):
    """The aux-loss-free bias policy step by step: load max/mean and the step time."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.plot(series["step"], series["expert_max_over_mean"], label="expert load max/mean")
    if series["gpu_max_over_mean"].notna().any():
        ax.plot(series["step"], series["gpu_max_over_mean"], label="GPU load max/mean")
    ax.set_ylim(bottom=1.0)  # max/mean is at least 1: perfect balance
    timed = series.dropna(subset=["step_time_s"])
    right = ax.twinx()
    right.plot(timed["step"], timed["step_time_s"] * 1e3, "o--", color="tab:red",
               label="step time")
    right.set_ylim(bottom=0)
    right.set_ylabel("step time (ms)", color="tab:red")
    ax.legend(fontsize=8, loc="upper right")
    _label(ax, "Auxiliary-loss-free balancing, step after step",
           "training step (bias updates, count)", "load max / mean (1 = balanced)",
           READING["balance_series"])
    return fig


def pipeline_schedule(items: pd.DataFrame):
    """The whole training step's schedule: each stage's items over time."""
    plt = _plt()
    stages = int(items["stage"].max()) + 1
    fig, ax = plt.subplots(figsize=(9, 0.35 * stages + 1.6))
    for kind, colour in _KIND_COLOURS.items():
        rows = items[items["kind"] == kind]
        if rows.empty:
            continue
        ax.barh(rows["stage"], (rows["end_s"] - rows["start_s"]) * 1e3,
                left=rows["start_s"] * 1e3, height=0.8, color=colour, label=kind,
                edgecolor="white", linewidth=0.2)
    ax.set_xlim(left=0)
    ax.set_ylim(stages - 0.5, -0.5)  # stage 0 on top
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14),
              ncol=len(_KIND_COLOURS), frameon=False)
    _label(ax, "Pipeline schedule of one step", "time (ms)", "pipeline stage (index)",
           READING["pipeline_schedule"])
    return fig
