"""Figures of sweeps and plans. matplotlib is imported here only, when drawing.

Every figure has a title, axis labels with units and starts its throughput axis at 0,
so a 1 % difference looks like one.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(value) -> str:
    return "none" if value is None or (isinstance(value, float) and np.isnan(value)) \
        else str(value)


def sweep_curve(results: pd.DataFrame, axis: str, others: list[str], *,
                metric: str = "tokens_per_s_per_gpu", unit: str = "tokens/s per GPU"):
    """``metric`` against one axis, a line per combination of the other axes (at most
    eight), with the spread over seeds as error bars."""
    plt = _plt()
    ok = results[results["error"].isna()]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    groups = ok.groupby([ok[o].map(_label) for o in others], sort=False) if others \
        else [((), ok)]
    for n, (key, part) in enumerate(groups):
        if n == 8:
            break
        key = key if isinstance(key, tuple) else (key,)
        part = part.sort_values(axis)
        x = [_label(v) for v in part[axis]]
        std = part.get(f"{metric}_std")
        ax.errorbar(x, part[metric], yerr=None if std is None else std, marker="o",
                    capsize=3, label=", ".join(f"{o}={k}" for o, k in zip(others, key, strict=True))
                    or None)
    ax.set_ylim(bottom=0)
    ax.set_xlabel(axis)
    ax.set_ylabel(unit)
    ax.set_title(f"{unit} against {axis}")
    if others:
        ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def memory_by_point(results: pd.DataFrame, labels: list[str], capacity_gib: float | None):
    """Memory per GPU of every point, stacked by part, against the GPU's capacity."""
    plt = _plt()
    parts = [c for c in results.columns if c.startswith("memory_") and c.endswith("_gib")
             and c not in ("memory_gib_per_gpu", "memory_capacity_gib")]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(results) + 1.4))
    left = np.zeros(len(results))
    y = np.arange(len(results))
    for part in parts:
        values = results[part].fillna(0).to_numpy(float)
        if values.any():
            ax.barh(y, values, left=left, label=part.removeprefix("memory_")
                    .removesuffix("_gib").replace("_", " "))
            left += values
    if capacity_gib:
        ax.axvline(capacity_gib, color="k", ls="--", lw=1, label="GPU memory")
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(left=0)
    ax.set_xlabel("GiB per GPU")
    ax.set_title("Memory per GPU by point")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 1.5 /
                                                                        max(len(results), 4)))
    return fig


def frontier(points: pd.DataFrame, front: pd.DataFrame, winner: pd.Series | None, *,
             x: str, y: str, x_label: str, y_label: str, target: float | None = None):
    """Every simulated setup, the Pareto frontier through the best ones and the winner.

    Setups whose coordinates are not finite (an overflowing cost) are left out: matplotlib
    refuses infinite axis limits, and no scale shows them."""
    plt = _plt()
    points, front = _finite(points, x, y), _finite(front, x, y)
    if winner is not None and not np.isfinite([winner[x], winner[y]]).all():
        winner = None
    if target is not None and not np.isfinite(target):
        target = None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(points[x], points[y], color="0.65", s=18, label="simulated setups")
    ordered = front.sort_values(x)
    ax.plot(ordered[x], ordered[y], "o-", color="tab:blue", label="Pareto frontier")
    if winner is not None:
        ax.scatter([winner[x]], [winner[y]], marker="*", s=220, color="tab:red", zorder=3,
                   label="winner")
    if target is not None:
        ax.axhline(target, color="tab:green", ls="--", lw=1, label="target")
    ax.set_ylim(bottom=0)
    if len(points) and (points[x] >= 0).all() and np.isfinite(points[x].max() * 1.1):
        ax.set_xlim(left=0, right=points[x].max() * 1.1 or None)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title("Plan: simulated setups and their frontier")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _finite(frame: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The rows of ``frame`` with finite ``x`` and ``y`` (an empty frontier has no columns)."""
    if x not in frame or y not in frame:
        return pd.DataFrame(columns=[x, y], dtype=float)
    values = frame[[x, y]].to_numpy(dtype=float, na_value=np.nan)
    return frame[np.isfinite(values).all(axis=1)]
