"""Synthetic token->expert assignments: uniform or Zipf popularity, optionally limited
to ``M`` placement units (GPUs or nodes) per token.

Each token picks ``K`` distinct experts one after another, each in proportion to its
popularity among the experts it has not picked yet (sequential sampling without
replacement, the same law as Gumbel-top-k on log-popularity). With a device limit,
the token first picks ``M`` distinct units in proportion to their summed popularity,
then its experts among those units only, so it never reaches more than ``M`` units:
one expert in each chosen unit first (a group-limited gate chooses a unit for its best
experts, so the unit contributes one: the DeepSeek gates on random scores reach 3.96 to
3.98 of 4 chosen units, the free draw 3.63), then the rest anywhere in the chosen units.

The draws are vectorised over tokens and cost O(tokens x K): each slot is drawn with
replacement and the rows that repeat an earlier expert are redrawn, which is exactly
sampling from the not-yet-chosen experts.
"""

from __future__ import annotations

import numpy as np

_MAX_REDRAWS = 16


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


def _draw_categorical(cdf: np.ndarray, lo: np.ndarray, hi: np.ndarray, rng) -> np.ndarray:
    """One draw per row from the CDF segment [lo, hi) of ``cdf`` (a categorical's CDF)."""
    u = lo + rng.random(lo.shape[0]) * (hi - lo)
    idx = np.searchsorted(cdf, u, side="right")
    return np.minimum(idx, cdf.shape[0] - 1)


def _repeats(out_st: np.ndarray, slot: int, cur: np.ndarray, rows=None) -> np.ndarray:
    """Which ``cur`` values repeat one of the earlier slots of their row."""
    dup = np.zeros(cur.shape[0], dtype=bool)
    for earlier in range(slot):
        dup |= (out_st[earlier] if rows is None else out_st[earlier, rows]) == cur
    return dup


def _distinct_draws(draw, n_rows: int, n_slots: int, exact) -> np.ndarray:
    """[rows, slots] draws, distinct within each row.

    ``draw(rows, slot)`` draws one candidate per listed row; rows that repeat an earlier
    slot are redrawn. After ``_MAX_REDRAWS`` rounds (only under extreme skew) the
    remaining rows are finished by ``exact(rows, chosen_rs, slot)``, vectorised. Slots are
    stored slot-major so that each comparison runs over contiguous memory; the result
    is a transposed view.
    """
    out_st = np.empty((n_slots, n_rows), dtype=np.int16)
    all_rows = np.arange(n_rows)
    for slot in range(n_slots):
        cur = draw(all_rows, slot)
        if slot:
            rows = np.flatnonzero(_repeats(out_st, slot, cur))
            for _ in range(_MAX_REDRAWS):
                if rows.size == 0:
                    break
                cur[rows] = draw(rows, slot)
                rows = rows[_repeats(out_st, slot, cur[rows], rows)]
            if rows.size:
                cur[rows] = exact(rows, out_st[:slot, rows].T, slot)
        out_st[slot] = cur
    return out_st.T


def _gumbel_pick(weight_rx: np.ndarray, allowed_rx: np.ndarray, rng) -> np.ndarray:
    """One draw per row in proportion to ``weight_rx`` over the ``allowed_rx`` entries."""
    with np.errstate(divide="ignore"):
        logw = np.where(allowed_rx, np.log(weight_rx), -np.inf)
    # Rows whose allowed weights all underflowed fall back to a uniform choice.
    dead = ~np.isfinite(logw).any(axis=1)
    logw[dead] = np.where(allowed_rx[dead], 0.0, -np.inf)
    return np.argmax(logw + rng.gumbel(size=logw.shape), axis=1).astype(np.int32)


def _not_chosen(n: int, chosen_rs: np.ndarray) -> np.ndarray:
    allowed_rx = np.ones((chosen_rs.shape[0], n), dtype=bool)
    np.put_along_axis(allowed_rx, chosen_rs, False, axis=1)
    return allowed_rx


def _sample_distinct(
    weight_x: np.ndarray, *, n_rows: int, n_slots: int, rng: np.random.Generator
) -> np.ndarray:
    """[rows, slots] distinct categories per row, drawn in proportion to ``weight_x``
    among those not drawn yet."""
    n = weight_x.shape[0]
    if np.all(weight_x == weight_x[0]):
        def draw(rows, _slot):
            return rng.integers(0, n, rows.shape[0], dtype=np.int16)
    else:
        cdf_x = np.cumsum(weight_x)
        cdf_x /= cdf_x[-1]
        zeros, ones = np.zeros(n_rows), np.ones(n_rows)

        def draw(rows, _slot):
            return _draw_categorical(cdf_x, zeros[rows], ones[rows], rng)

    def exact(rows, chosen_rs, _slot):
        weight = np.broadcast_to(weight_x, (rows.shape[0], n))
        return _gumbel_pick(weight, _not_chosen(n, chosen_rs), rng)

    return _distinct_draws(draw, n_rows, n_slots, exact)


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
    ``max_units`` units.
    """
    n_experts = popularity_e.shape[0]
    assert top_k <= n_experts < 2**15
    if max_units is None:
        return _sample_distinct(popularity_e, n_rows=n_tokens, n_slots=top_k, rng=rng)

    assert unit_size is not None and n_experts % unit_size == 0
    n_units = n_experts // unit_size
    assert max_units <= n_units and max_units * unit_size >= top_k
    mass_u = popularity_e.reshape(n_units, unit_size).sum(axis=1)
    units_tm = _sample_distinct(mass_u, n_rows=n_tokens, n_slots=max_units, rng=rng)

    uniform = bool(np.all(popularity_e == popularity_e[0]))
    cdf_e = np.cumsum(popularity_e)
    cdf_e /= cdf_e[-1]
    start_e = np.concatenate(([0.0], cdf_e[:-1]))
    # Slot k < M takes its expert in the token's k-th unit; later slots in any of them.
    if uniform:
        def draw_expert(rows, slot):
            which = (np.full(rows.shape[0], slot) if slot < max_units
                     else rng.integers(0, max_units, rows.shape[0]))
            unit = units_tm[rows, which]
            return unit * unit_size + rng.integers(0, unit_size, rows.shape[0], dtype=np.int16)
    else:
        # Pick one of the token's units by mass, then an expert inside it by popularity.
        cum_tm = np.cumsum(mass_u[units_tm], axis=1)

        def draw_expert(rows, slot):
            if slot < max_units:
                which = np.full(rows.shape[0], slot)
            else:
                cum = cum_tm[rows]
                u = rng.random(rows.shape[0]) * cum[:, -1]
                which = np.minimum((u[:, None] >= cum).sum(axis=1), max_units - 1)
            first = units_tm[rows, which] * unit_size
            return _draw_categorical(cdf_e, start_e[first], cdf_e[first + unit_size - 1], rng)

    def exact_expert(rows, chosen_rs, slot):
        allowed_rx = np.zeros((rows.shape[0], n_units), dtype=bool)
        units_rm = units_tm[rows, slot:slot + 1] if slot < max_units else units_tm[rows]
        np.put_along_axis(allowed_rx, units_rm, True, axis=1)
        allowed_rx = np.repeat(allowed_rx, unit_size, axis=1) & _not_chosen(n_experts, chosen_rs)
        weight = np.broadcast_to(popularity_e, (rows.shape[0], n_experts))
        return _gumbel_pick(weight, allowed_rx, rng)

    return _distinct_draws(draw_expert, n_tokens, top_k, exact_expert)
