"""The Pareto frontier of a plan: the setups no other setup beats on both of its axes.

Training, inference and prefill trade cost (lower is better) against tokens/s (higher);
decode trades tokens/s per GPU (the operator's efficiency) against tokens/s per user
(``1 / TPOT``, the user's speed). Both axes are written "higher is better" here, so one
dominance rule serves every mode.
"""

from __future__ import annotations

from collections.abc import Sequence

AXES = {
    "decode": (("output tokens/s per GPU", "tokens_per_s_per_gpu"),
               ("output tokens/s per user", "tokens_per_s_per_user")),
    "other": (("cost", "cost"), ("tokens/s", "tokens_per_s")),
}


def axes_for(mode: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """(label, row key) of the frontier's x and y axes in ``mode``."""
    return AXES["decode" if mode == "decode" else "other"]


def coordinates(mode: str, *, cost: float, tokens_per_s: float, gpus: int,
                step_s: float) -> tuple[float, float]:
    """A setup's place on the frontier's axes, both "higher is better"."""
    if mode == "decode":
        return tokens_per_s / gpus, 1.0 / step_s
    return -cost, tokens_per_s


def dominated(point: tuple[float, float], others: Sequence[tuple[float, float]]) -> bool:
    """Whether some other point is at least as good on both axes and better on one."""
    return any(o[0] >= point[0] and o[1] >= point[1] and o != point for o in others)


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points, in order of the first axis, best first."""
    keep = [i for i, p in enumerate(points) if not dominated(p, points)]
    return sorted(keep, key=lambda i: (-points[i][0], -points[i][1]))
