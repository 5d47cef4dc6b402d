"""Synthetic token->expert assignments: uniform or Zipf popularity, optionally limited
to ``M`` placement units (GPUs or nodes) per token.

Each token picks ``K`` distinct experts one after another, each in proportion to its
popularity among the experts it has not picked yet (sequential sampling without
replacement, the same law as Gumbel-top-k on log-popularity). With a device limit
``M`` the draw is a group-limited gate on those scores: the units whose best expert
ranks highest are chosen, and the token's top ``K`` among them are taken, so it never
reaches more than ``M`` units and reaches as many as the DeepSeek gates do on random
scores (3.97-3.98 of 4 chosen nodes, 5.3 of 8 when any may be chosen; a free draw
inside ``M`` random units reached 3.63 of 4).

How it is drawn (:func:`moesim.routing.kernels.draw_topk`, one compiled pass per token):
a token's experts ordered by score are a sequential draw without replacement, and a
gate that ranks a unit by its best expert keeps the first ``M`` distinct units of that
sequence and their first ``K`` experts. So the sequence is drawn until ``M`` units have
appeared (every expert so far is kept); the first expert of an ``M + 1``-th unit is
skipped and from then on the draw is restricted to the token's ``M`` units. Each draw
is an alias-table pick with repeats rejected, which is exactly sampling from the
experts not chosen yet; after 64 rejections (only when a few experts hold nearly all
the mass) the slot is drawn exactly over the allowed experts. A test holds the result
to the gate's exact law, enumerated over every score order of small cases.
"""

from __future__ import annotations

import numpy as np


def expert_popularity(
    n_experts: int, *, assignment: str, zipf_exponent: float, rng: np.random.Generator,
    power_law_alpha: float = 1.2, tokens: int = 0, top_k: int = 1,
) -> np.ndarray:
    """Popularity ``p_e`` [E], summing to 1; Zipf ranks go to experts in random order.

    ``power-law``: each expert's share of ``tokens x top_k`` picks from
    :func:`moesim.routing.power_law.power_law_loads` (already in random order); every
    expert keeps a sliver of popularity so that any top-k set stays drawable."""
    if assignment == "power-law":
        from moesim.routing.power_law import power_law_loads

        loads_e = power_law_loads(n_experts, max(tokens, 1), top_k, power_law_alpha, rng)
        weight_e = np.maximum(loads_e, 1e-6)
        return weight_e / weight_e.sum()
    if assignment == "uniform" or zipf_exponent == 0:
        return np.full(n_experts, 1.0 / n_experts)
    assert assignment == "zipf", assignment
    weight_e = np.arange(1, n_experts + 1, dtype=np.float64) ** -zipf_exponent
    weight_e = weight_e[rng.permutation(n_experts)]
    return weight_e / weight_e.sum()


def sample_topk(
    popularity_e: np.ndarray,
    *,
    n_tokens: int,
    top_k: int,
    rng: np.random.Generator,
    unit_size: int | None = None,
    max_units: int | None = None,
) -> np.ndarray:
    """Expert ids ``ids_tk`` [n_tokens, top_k] (int16, distinct per row).

    With ``max_units`` set, experts are grouped into contiguous units of ``unit_size``
    (the experts of one GPU or one node) and each token's experts lie in at most
    ``max_units`` units. One seed is taken from ``rng``; the draw itself is the compiled
    :func:`moesim.routing.kernels.draw_topk`.
    """
    from moesim.routing.kernels import alias_tables, draw_topk

    popularity_e = np.ascontiguousarray(popularity_e, dtype=np.float64)
    n_experts = popularity_e.shape[0]
    assert top_k <= n_experts < 2**15
    if max_units is None:
        unit_size, max_units = n_experts, 1
    assert n_experts % unit_size == 0
    assert max_units <= n_experts // unit_size and max_units * unit_size >= top_k
    weight_ux = popularity_e.reshape(-1, unit_size)
    mass_u = weight_ux.sum(axis=1)
    prob_ux, alias_ux = alias_tables(weight_ux)  # a unit without mass: uniform
    (prob_e,), (alias_e,) = alias_tables(popularity_e[None])
    seed = int(rng.integers(2**63))
    return draw_topk(popularity_e, prob_e, alias_e, prob_ux, alias_ux, mass_u,
                     n_tokens=n_tokens, top_k=top_k, max_units=max_units, seed=seed)
