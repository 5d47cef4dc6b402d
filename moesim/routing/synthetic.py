"""Synthetic token->expert assignments: uniform or Zipf popularity, optionally limited
to ``M`` placement units (GPUs or nodes) per token.

Each token picks ``K`` distinct experts one after another, each in proportion to its
popularity among the experts it has not picked yet (sequential sampling without
replacement, the same law as Gumbel-top-k on log-popularity). With a device limit
``M`` the draw is a group-limited gate on those scores (:class:`_LimitedDraw`): the
units whose best expert ranks highest are chosen, and the token's top ``K`` among them
are taken, so it never reaches more than ``M`` units and reaches as many as the DeepSeek
gates do on random scores (3.97-3.98 of 4 chosen nodes, 5.3 of 8 when any may be
chosen; a free draw inside ``M`` random units reached 3.63 of 4).

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
    assert max_units <= n_experts // unit_size and max_units * unit_size >= top_k
    return _LimitedDraw(popularity_e, n_tokens=n_tokens, top_k=top_k, rng=rng,
                        unit_size=unit_size, max_units=max_units).draw()


class _LimitedDraw:
    """Group-limited top-K on Gumbel-perturbed log-popularity, drawn lazily.

    A token's experts, ordered by score, are a sequential draw without replacement. A
    group-limited gate that scores a unit by its best expert keeps the first ``M``
    distinct units of that sequence and takes its first ``K`` experts in them. So: draw
    the sequence until ``M`` units have appeared (every expert so far is kept); the
    first expert of an ``M + 1``-th unit is skipped and from then on the draw is
    restricted to the token's ``M`` units.
    """

    def __init__(self, popularity_e, *, n_tokens, top_k, rng, unit_size, max_units):
        self.p_e, self.rng, self.k = popularity_e, rng, top_k
        self.size, self.m, self.t = unit_size, max_units, n_tokens
        n_units = popularity_e.shape[0] // unit_size
        self.mass_u = popularity_e.reshape(n_units, unit_size).sum(axis=1)
        self.uniform = bool(np.all(popularity_e == popularity_e[0]))
        cdf = np.cumsum(popularity_e)
        self.cdf_e = cdf / cdf[-1]
        self.start_e = np.concatenate(([0.0], self.cdf_e[:-1]))
        self.units_tm = np.full((n_tokens, max_units), -1, dtype=np.int32)
        self.seen_t = np.zeros(n_tokens, dtype=np.int32)
        # Up to 63 units a token's units fit one int64 bit mask: a fast membership test.
        self.mask_t = np.zeros(n_tokens, dtype=np.int64) if n_units < 64 else None
        self.out_st = np.empty((top_k, n_tokens), dtype=np.int16)

    def _known(self, rows, unit):
        """Which rows already hold ``unit`` among their units."""
        if self.mask_t is not None:
            return (self.mask_t[rows] >> unit) & 1 == 1
        return (self.units_tm[rows] == unit[:, None]).any(axis=1)

    def _any(self, rows):
        """One expert per row from all experts, by popularity."""
        n = rows.shape[0]
        if self.uniform:
            return self.rng.integers(0, self.p_e.shape[0], n)
        return _draw_categorical(self.cdf_e, np.zeros(n), np.ones(n), self.rng)

    def _within(self, rows):
        """One expert per row from the row's units, by popularity."""
        n = rows.shape[0]
        if self.uniform:
            unit = self.units_tm[rows, self.rng.integers(0, self.m, n)]
            return unit * self.size + self.rng.integers(0, self.size, n, dtype=np.int32)
        units = self.units_tm[rows]
        cum = np.cumsum(self.mass_u[units], axis=1)
        u = self.rng.random(n) * cum[:, -1]
        which = np.minimum((u[:, None] >= cum).sum(axis=1), self.m - 1)
        first = units[np.arange(n), which] * self.size
        return _draw_categorical(self.cdf_e, self.start_e[first],
                                 self.cdf_e[first + self.size - 1], self.rng)

    def _distinct(self, rows, slot, draw, restricted: bool):
        """``draw`` for ``rows``, redrawn where it repeats an earlier slot of the row."""
        cur = draw(rows).astype(np.int64)
        todo = np.flatnonzero(_repeats(self.out_st, slot, cur, rows))
        for _ in range(_MAX_REDRAWS):
            if todo.size == 0:
                return cur
            cur[todo] = draw(rows[todo])
            todo = todo[_repeats(self.out_st, slot, cur[todo], rows[todo])]
        if todo.size:  # extreme skew: pick exactly among the allowed, not-chosen experts
            chosen_rs = self.out_st[:slot, rows[todo]].T
            allowed = _not_chosen(self.p_e.shape[0], chosen_rs)
            if restricted:
                in_unit = np.zeros((todo.size, self.mass_u.shape[0]), dtype=bool)
                np.put_along_axis(in_unit, self.units_tm[rows[todo]], True, axis=1)
                allowed &= np.repeat(in_unit, self.size, axis=1)
            weight = np.broadcast_to(self.p_e, allowed.shape)
            cur[todo] = _gumbel_pick(weight, allowed, self.rng)
        return cur

    def draw(self) -> np.ndarray:
        restricted_t = np.zeros(self.t, dtype=bool)
        all_rows = np.arange(self.t)
        for slot in range(self.k):
            cur = np.empty(self.t, dtype=np.int64)
            free = all_rows[~restricted_t]
            if free.size:
                cand = self._distinct(free, slot, self._any, restricted=False)
                unit = cand // self.size
                known = self._known(free, unit)
                skip = ~known & (self.seen_t[free] == self.m)
                fresh = ~known & ~skip
                new = free[fresh]
                cur[free] = cand  # the skipped rows are overwritten below
                self.units_tm[new, self.seen_t[new]] = unit[fresh]
                self.seen_t[new] += 1
                if self.mask_t is not None:
                    self.mask_t[new] |= np.left_shift(1, unit[fresh]).astype(np.int64)
                restricted_t[free[skip]] = True
            limited = all_rows[restricted_t]  # every row that no longer draws freely
            if limited.size:
                cur[limited] = self._distinct(limited, slot, self._within, restricted=True)
            self.out_st[slot] = cur
        return self.out_st.T
