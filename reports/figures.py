"""Figures of a simulated step. matplotlib is imported here only, when drawing."""

from __future__ import annotations

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    fig, ax = plt.subplots(figsize=(8, 2.2))
    left = 0.0
    for label, seconds in parts:
        ax.barh([0], [seconds * 1e3], left=left, label=label)
        left += seconds * 1e3
    ax.axvline(summary["step_time_s"] * 1e3, color="k", ls="--", lw=1, label="step time")
    ax.set_yticks([])
    ax.set_xlabel("ms per step (mean GPU)")
    ax.legend(ncol=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.45))
    ax.set_title("Step breakdown")
    return fig


def expert_time_heatmap(spans: pd.DataFrame):
    """Forward expert-GEMM time per GPU and MoE layer (imbalance shows as stripes)."""
    plt = _plt()
    fwd = spans[(spans["phase"] == "experts") & ~spans["backward"]]
    dur = (fwd["end_s"] - fwd["start_s"]) * 1e3
    grid = dur.groupby([fwd["layer"], fwd["gpu"]], observed=True).sum().unstack("gpu")
    fig, ax = plt.subplots(figsize=(8, 3.5))
    image = ax.imshow(grid.to_numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("GPU")
    ax.set_ylabel("MoE layer (row)")
    ax.set_title("Forward expert GEMM time per GPU and layer (ms)")
    fig.colorbar(image, ax=ax)
    return fig


def link_utilization(links: pd.DataFrame):
    """Utilization of every directed link over the step, by class."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3))
    kinds = [k for k in ("nvlink", "nic", "uplink") if (links["kind"] == k).any()]
    data = [links.loc[links["kind"] == k, "utilization"].to_numpy() * 100 for k in kinds]
    ax.boxplot(data, orientation="horizontal")
    ax.set_yticks(range(1, len(kinds) + 1), kinds)
    ax.set_xlabel("busy share of the step (%)")
    ax.set_title("Link utilization (each directed link)")
    return fig


def expert_load(experts: pd.DataFrame):
    """Assignments per expert and MoE layer, relative to the layer's mean."""
    plt = _plt()
    grid = experts.pivot(index="layer", columns="expert", values="tokens").to_numpy(float)
    mean = grid.mean(axis=1, keepdims=True)
    rel = np.divide(grid, mean, out=np.zeros_like(grid), where=mean > 0)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    image = ax.imshow(rel, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer (row)")
    ax.set_title("Expert load / layer mean")
    fig.colorbar(image, ax=ax)
    return fig


def gpu_load(spans: pd.DataFrame, placement: str):
    """Forward expert-GEMM time per GPU over the step, sorted, against the mean: how far
    the busiest GPUs stand above the others under the step's placement."""
    plt = _plt()
    fwd = spans[(spans["phase"] == "experts") & ~spans["backward"]]
    per_gpu = ((fwd["end_s"] - fwd["start_s"]) * 1e3).groupby(fwd["gpu"], observed=True).sum()
    ordered = np.sort(per_gpu.to_numpy())[::-1]
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.bar(np.arange(ordered.size), ordered, width=1.0, color="tab:blue")
    ax.axhline(ordered.mean(), color="k", ls="--", lw=1, label="mean")
    ax.set_xlabel("GPUs, busiest first")
    ax.set_ylabel("forward expert GEMMs (ms)")
    ax.set_title(f"Expert work per GPU, placement {placement} (max/mean "
                 f"{ordered.max() / ordered.mean():.2f})")
    ax.legend(fontsize=8)
    return fig


def balance_series(series: pd.DataFrame):
    """The aux-loss-free bias policy step by step: load max/mean and the step time."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot(series["step"], series["expert_max_over_mean"], label="expert load max/mean")
    if series["gpu_max_over_mean"].notna().any():
        ax.plot(series["step"], series["gpu_max_over_mean"], label="GPU load max/mean")
    ax.set_xlabel("training step (bias updates)")
    ax.set_ylabel("max / mean")
    timed = series.dropna(subset=["step_time_s"])
    right = ax.twinx()
    right.plot(timed["step"], timed["step_time_s"] * 1e3, "o--", color="tab:red",
               label="step time")
    right.set_ylabel("step time (ms)", color="tab:red")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("Auxiliary-loss-free balancing, step after step")
    return fig
