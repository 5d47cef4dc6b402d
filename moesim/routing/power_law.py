"""Power-law expert loads: a heavy-tailed share of ``tokens x top_k`` picks per expert.

The load model behind the ``power_law_<alpha>`` rows of NVIDIA's aiconfigurator MoE
benchmarks, as their documentation describes it (``docs/POWER_LAW_DISTRIBUTION.md`` in
ai-dynamo/aiconfigurator): every expert draws a weight from a power law
``p(x) ~ x^-alpha`` bounded to ``[x_min, x_max]``, the weights are scaled to the number
of picks, and no expert gets more than ``tokens`` picks (a token picks an expert at most
once). ``alpha`` near 0 is uniform; larger ``alpha`` concentrates the load.
"""

from __future__ import annotations

import numpy as np


def bounded_power_law(n: int, alpha: float, lo: float, hi: float,
                      rng: np.random.Generator) -> np.ndarray:
    """``n`` draws from ``p(x) ~ x^-alpha`` on ``[lo, hi]`` by inverting its CDF."""
    u = rng.random(n)
    if abs(alpha - 1.0) < 1e-9:
        return lo * (hi / lo) ** u
    a = 1.0 - alpha
    return ((hi**a - lo**a) * u + lo**a) ** (1.0 / a)


def power_law_loads(experts: int, tokens: int, top_k: int, alpha: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Picks per expert [E] (integers summing to ``tokens x top_k``, each <= ``tokens``).

    Weights span ``[1, 0.8 tokens]`` when there are more picks than experts, else
    ``[0.01, 2]`` (so that few picks still spread over several experts)."""
    picks = tokens * top_k
    assert top_k <= experts
    lo, hi = (1.0, max(0.8 * tokens, 1.0 + 1e-6)) if picks > experts else (0.01, 2.0)
    weight_e = bounded_power_law(experts, alpha, lo, hi, rng)
    loads = np.minimum(np.round(weight_e / weight_e.sum() * picks).astype(np.int64), tokens)
    # Rounding and the cap leave a few picks over or missing: hand them out one at a
    # time to the least (or take them from the most) loaded experts that can take them.
    short = picks - int(loads.sum())
    while short > 0:
        room = np.flatnonzero(loads < tokens)
        give = room[np.argsort(loads[room], kind="stable")[:short]]
        loads[give] += 1
        short -= give.size
    while short < 0:
        take = np.argsort(-loads, kind="stable")[:-short]
        loads[take] -= 1
        short += take.size
    assert loads.sum() == picks and loads.max() <= tokens and loads.min() >= 0
    return loads
