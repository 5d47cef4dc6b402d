"""A layered picture of a topology: spines on top, then leaves, GPUs and NVSwitches.

matplotlib is imported inside :func:`figure` only, so importing moesim stays light. The
figure is drawn on an Agg canvas without pyplot, so no global backend state is touched;
the caller (the CLI) saves it.

Big clusters are sampled so the picture stays readable: the first few domains under each
of the first few leaf blocks, and the first GPUs of big domains. The title says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .analysis import bisection_bandwidth, summarize

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .build import Topology

_COLORS = {"nvlink": "#2a9d8f", "nic": "#457b9d", "uplink": "#e76f51"}
_Y = {"spine": 3.0, "leaf": 2.0, "gpu": 1.0, "nvswitch": 0.0}
_LAYER_NAMES = {"nvswitch": "NVSwitch", "gpu": "GPU", "leaf": "leaf", "spine": "spine"}
_STYLE = {  # marker, size, face colour per node kind
    "spine": ("s", 90, "#e9c46a"),
    "leaf": ("s", 60, "#f4a261"),
    "gpu": ("o", 22, "#264653"),
    "nvswitch": ("D", 70, "#8ab17d"),
}


def figure(
    topology: Topology, *, blocks: int = 4, domains: int = 8, gpus_per_domain: int = 16
) -> Figure:
    """A matplotlib Figure of ``topology``.

    About ``domains`` domains are drawn, spread over the first ``blocks`` leaf blocks (a
    block is the domains that share leaves), and at most ``gpus_per_domain`` GPUs of each.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    t = topology
    block_size = t.domains_per_leaf or t.n_domains
    n_blocks = min(blocks, -(-t.n_domains // block_size))
    per_block = max(1, domains // n_blocks)
    shown = [
        d for d in range(t.n_domains) if d // block_size < n_blocks and d % block_size < per_block
    ]
    shown_gpus: list[int] = []
    hidden: dict[int, int] = {}
    for d in shown:
        members = np.flatnonzero(t.domain_of == d)
        shown_gpus.extend(int(g) for g in members[:gpus_per_domain])
        if len(members) > gpus_per_domain:
            hidden[d] = len(members) - gpus_per_domain

    pos: dict[str, tuple[float, float]] = {}
    x = 0.0
    for d in shown:
        first = x
        for g in shown_gpus:
            if t.domain_of[g] == d:
                pos[f"gpu{g}"] = (x, _Y["gpu"])
                x += 1.0
        pos[f"nvswitch{d}"] = ((first + x - 1.0) / 2, _Y["nvswitch"])
        x += 1.5  # gap between domains
    width = max(x - 2.5, 1.0)

    leaves = sorted({int(t.leaf_of[g]) for g in shown_gpus if t.leaf_of[g] >= 0})
    spines = sorted(
        {
            int(n[len("spine") :])
            for leaf in leaves
            for n in t.graph.successors(f"leaf{leaf}")
            if n.startswith("spine")
        }
    )
    for kind, indices in (("leaf", leaves), ("spine", spines)):
        for i, index in enumerate(indices):
            spread = width * (i + 0.5) / len(indices)
            pos[f"{kind}{index}"] = (spread, _Y[kind])

    fig = Figure(figsize=(min(max(6.0 + 0.12 * width, 9.0), 24.0), 6.5), layout="tight")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    segments: dict[str, list] = {kind: [] for kind in _COLORS}
    for u, v, data in t.graph.edges(data=True):
        # Both directions share one line; draw each physical link once.
        if u < v and u in pos and v in pos:
            segments[data["kind"]].append((pos[u], pos[v]))
    for kind, lines in segments.items():
        if lines:
            ax.add_collection(
                LineCollection(lines, colors=_COLORS[kind], linewidths=0.6, alpha=0.55, zorder=1)
            )
    for kind, (marker, size, color) in _STYLE.items():
        points = [xy for node, xy in pos.items() if t.graph.nodes[node]["kind"] == kind]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.scatter(
                xs,
                ys,
                marker=marker,
                s=size,
                c=color,
                edgecolors="black",
                linewidths=0.4,
                zorder=2,
                label=kind,
            )
    _labels(ax, t, pos, leaves, spines, shown_gpus, shown, hidden)

    handles = [
        Line2D([], [], color=_COLORS[c["kind"]], label=_link_label(c))
        for c in _unique_kinds(summarize(t)["links"])
    ]
    if handles:
        ax.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.9)
    ax.set_title(_title(t, shown, shown_gpus), fontsize=9)
    ax.set_xlim(-1.0, width + 1.0)
    layers = ("nvswitch", "gpu", "leaf", "spine")[: 4 if spines else 3 if leaves else 2]
    ax.set_ylim(-0.6, _Y[layers[-1]] + 0.6)
    ax.set_yticks([_Y[k] for k in layers], [_LAYER_NAMES[k] for k in layers])
    ax.set_xticks([])
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    return fig


def _labels(ax, t: Topology, pos, leaves, spines, shown_gpus, domains, hidden) -> None:
    if len(shown_gpus) <= 64:
        for g in shown_gpus:
            gx, gy = pos[f"gpu{g}"]
            ax.annotate(
                str(g), (gx, gy), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=5
            )
    for d in domains:
        sx, sy = pos[f"nvswitch{d}"]
        text = f"domain {d}" + (f" (+{hidden[d]} GPUs)" if d in hidden else "")
        ax.annotate(
            text, (sx, sy), textcoords="offset points", xytext=(0, -12), ha="center", fontsize=6
        )
    for kind, indices in (("leaf", leaves), ("spine", spines)):
        if len(indices) <= 40:
            for index in indices:
                nx_, ny = pos[f"{kind}{index}"]
                name = f"L{index}" if kind == "leaf" else f"S{index}"
                if kind == "leaf" and t.rails:
                    name += f"\nr{int(t.leaf_rail[index])}"
                ax.annotate(
                    name,
                    (nx_, ny),
                    textcoords="offset points",
                    xytext=(0, 6),
                    ha="center",
                    fontsize=5,
                )


def _title(t: Topology, domains: list[int], shown_gpus: list[int]) -> str:
    plural = "s" if t.n_domains > 1 else ""
    head = (
        f"{t.name}: {t.n_gpus} GPUs in {t.n_domains} NVLink domain{plural} of "
        f"{t.gpus_per_domain}, fabric {t.fabric_kind}"
    )
    if t.rails:
        head += f", {t.rails} rails, {t.n_leaves} leaves, {t.n_spines} spines"
    head += f"; bisection {bisection_bandwidth(t) / 1e9:,.0f} GB/s"
    if len(domains) < t.n_domains or len(shown_gpus) < t.n_gpus:
        head += (
            f"\nshowing {len(domains)} of {t.n_domains} domains and "
            f"{len(shown_gpus)} of {t.n_gpus} GPUs, with their leaves and spines"
        )
    return head


def _unique_kinds(classes: list[dict]) -> list[dict]:
    seen: dict[str, dict] = {}
    for c in classes:
        seen.setdefault(c["kind"], c)
    return list(seen.values())


def _link_label(c: dict) -> str:
    return (
        f"{c['kind']}: {c['achievable_GBps']:g} GB/s achievable per direction "
        f"({c['bandwidth_GBps']:g} nominal), {c['latency_us']:g} us"
    )
