"""Compiled per-token loops (numba): the synthetic top-K draw and the counts by source.

Both are single passes over the tokens with no per-slot temporaries, which is what
numpy cannot do here: a vectorised draw needs a redraw pass per slot over every earlier
slot, and counting the destinations a token reaches once needs a repeat mask per slot.

Randomness is counter-based: token ``t`` of a draw with seed ``s`` uses its own
SplitMix64 stream started at ``mix(s ^ mix(t))``, so the result is the same for any
number of threads and any split of the tokens. Compiled code is cached beside the
module (numba's ``cache=True``), so a process pays the compilation once per machine.

The loops release the GIL and run on Python threads, each over its own range of tokens
or source ranks (:func:`in_parallel`; ``MOESIM_THREADS`` sets how many, default the
cores this process may use), so any number of threads may call them at once and a
forked child may too; numba's own thread pools are not used. They allocate nothing:
the caller hands them their outputs and scratch arrays, and they are compiled without
numba's reference counting (``_nrt=False``), which made the draw 2.6 times slower.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

from moesim.cores import threads

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_TO_UNIT = 1.0 / 9007199254740992.0  # 2^-53
_BELOW_ONE = 1.0 - 2.0**-53
# Rejections before a slot is drawn exactly over the experts still allowed: only a
# popularity where a few experts hold nearly all the mass gets there.
_MAX_REJECTIONS = 64
_MIN_PER_THREAD = 1 << 16  # assignments: below this a call stays on one thread


def in_parallel(work: Callable[[int, int], None], n_items: int, *, cost: int) -> None:
    """``work(start, stop)`` over consecutive ranges of ``n_items`` items (``cost``
    assignments each) on up to :func:`threads` threads: the calling thread takes the
    first range and this process's helper threads the others. ``work`` must not call
    this function itself (a helper thread that does runs every range alone)."""
    n = max(1, min(threads(), n_items, n_items * cost // _MIN_PER_THREAD))
    if n == 1 or threading.current_thread().name.startswith(_HELPER):
        work(0, n_items)
        return
    bounds = [n_items * i // n for i in range(n + 1)]
    pool = _helpers(n - 1)
    others = [pool.submit(work, a, b) for a, b in zip(bounds[1:-1], bounds[2:], strict=True)]
    try:
        work(bounds[0], bounds[1])
    finally:
        for other in others:
            other.result()


_HELPER = "moesim-routing"
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _helpers(n: int) -> ThreadPoolExecutor:
    """This process's pool of at least ``n`` helper threads, kept between calls: starting
    two threads on every call cost 0.1 s of a 58-layer run (2.53 against 2.43 s)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < n:
            if _pool is not None:
                _pool.shutdown(wait=False)  # its queued ranges still run
            _pool, _pool_size = ThreadPoolExecutor(n, thread_name_prefix=_HELPER), n
        return _pool


def _forget_pool() -> None:
    """In a forked child: the parent's helper threads are not there, and its lock may
    have been held by one of them."""
    global _pool, _pool_lock, _pool_size
    _pool, _pool_lock, _pool_size = None, threading.Lock(), 0


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_pool)


@njit(inline="always")
def _mix(z):
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(inline="always")
def _uniform(state):
    """The next state and a uniform float in [0, 1) (53 bits) from it."""
    state = state + _GAMMA
    return state, float(_mix(state) >> _S11) * _TO_UNIT


@njit(inline="always")
def _alias(prob, alias, u):
    """One category of an alias table from one uniform (both loads made, so that the
    choice compiles to a select rather than a branch the CPU mispredicts)."""
    j = u * prob.shape[0]
    i = min(int(j), prob.shape[0] - 1)
    other = alias[i]
    return i if j - i < prob[i] else other


def alias_tables(weight_rx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker's alias table of each row of ``weight_rx`` [R, X] (non-negative; a row
    summing to zero is taken as uniform): ``prob_rx`` float64 and ``alias_rx`` int64, so
    that row ``r`` draws category ``i`` with chance ``prob_rx[r, i]``, else
    ``alias_rx[r, i]``, after a uniform pick of ``i``."""
    weight_rx = np.asarray(weight_rx, dtype=np.float64)
    n_rows, n = weight_rx.shape
    total_r = weight_rx.sum(axis=1, keepdims=True)
    # n / sum overflows for a subnormal sum, so divide first
    scaled_rx = np.where(total_r > 0, weight_rx / np.where(total_r > 0, total_r, 1.0), 1.0 / n)
    scaled_rx = np.ascontiguousarray(scaled_rx * n)
    prob_rx = np.ones((n_rows, n))
    alias_rx = np.empty((n_rows, n), dtype=np.int64)
    _fill_alias(scaled_rx, prob_rx, alias_rx, np.empty(n, dtype=np.int64),
                np.empty(n, dtype=np.int64))
    return prob_rx, alias_rx


@njit(nogil=True, cache=True, _nrt=False)
def _fill_alias(scaled_rx, prob_rx, alias_rx, small, large):
    """Vose's pairing of each row (``prob_rx`` all ones on entry; ``small`` and
    ``large`` are stacks of category indices, scratch): a category under its share is
    topped up by one over it, which becomes its alias."""
    n = scaled_rx.shape[1]
    for r in range(scaled_rx.shape[0]):
        scaled = scaled_rx[r]
        n_small = n_large = 0
        for i in range(n):
            alias_rx[r, i] = i
            n_small, n_large = _push(i, scaled[i], small, large, n_small, n_large)
        while n_small and n_large:
            n_small -= 1
            n_large -= 1
            s, g = small[n_small], large[n_large]
            prob_rx[r, s], alias_rx[r, s] = scaled[s], g
            scaled[g] -= 1.0 - scaled[s]
            n_small, n_large = _push(g, scaled[g], small, large, n_small, n_large)
        # leftovers keep prob 1: only rounding put them in either stack


@njit(inline="always")
def _push(i, share, small, large, n_small, n_large):
    """Category ``i`` onto the stack of those under (``small``) or over their share."""
    if share < 1.0:
        small[n_small] = i
        return n_small + 1, n_large
    large[n_large] = i
    return n_small, n_large + 1


@njit(_nrt=False)
def _exact_pick(p_e, taken_e, units_m, n_units, size, u):
    """One expert in proportion to ``p_e`` among those not ``taken_e`` in the units
    ``units_m[:n_units]`` of ``size`` experts; uniform when their popularity underflowed
    to zero."""
    total, count = 0.0, 0
    for b in range(n_units):
        for e in range(units_m[b] * size, (units_m[b] + 1) * size):
            if not taken_e[e]:
                total += p_e[e]
                count += 1
    target = u * total if total > 0 else u * count
    last = -1
    for b in range(n_units):
        for e in range(units_m[b] * size, (units_m[b] + 1) * size):
            if not taken_e[e]:
                last = e
                target -= p_e[e] if total > 0 else 1.0
                if target < 0:
                    return e
    return last  # rounding left the target at the end


@njit(inline="always")
def _free_pick(p_e, prob_e, alias_e, taken_e, every_unit, state):
    """The next expert of the token's sequence: by popularity among those not taken."""
    for _ in range(_MAX_REJECTIONS):
        state, u = _uniform(state)
        cand = _alias(prob_e, alias_e, u)
        if not taken_e[cand]:
            return state, cand
    state, u = _uniform(state)
    return state, _exact_pick(p_e, taken_e, every_unit, 1, p_e.shape[0], u)


@njit(inline="always")
def _unit_pick(p_e, prob_ux, alias_ux, cum_m, taken_e, units_m, limit, state):
    """The next expert in the token's ``limit`` units (cumulative masses ``cum_m``), by
    popularity among those not taken: one uniform picks the unit and, rescaled, the
    expert in it."""
    size = prob_ux.shape[1]
    for _ in range(_MAX_REJECTIONS):
        state, u = _uniform(state)
        target, j = u * cum_m[limit - 1], 0
        for i in range(limit - 1):  # a count, not a search: no branch to mispredict
            j += target >= cum_m[i]
        lo = cum_m[j - 1] if j else 0.0
        width = cum_m[j] - lo
        v = min((target - lo) / width, _BELOW_ONE) if width > 0 else 0.0
        unit = units_m[j]
        cand = unit * size + _alias(prob_ux[unit], alias_ux[unit], v)
        if not taken_e[cand]:
            return state, cand
    state, u = _uniform(state)
    return state, _exact_pick(p_e, taken_e, units_m, limit, size, u)


def draw_topk(p_e, prob_e, alias_e, prob_ux, alias_ux, mass_u, *, n_tokens: int,
              top_k: int, max_units: int, seed: int) -> np.ndarray:
    """``ids_tk`` [n_tokens, top_k] int16: per token, the experts of a group-limited
    top-K on Gumbel-perturbed log-popularity (see ``moesim.routing.synthetic``).

    ``p_e`` [E] is the popularity, ``(prob_e, alias_e)`` its alias table and
    ``(prob_ux, alias_ux)`` [U, E/U] those of each unit's experts, ``mass_u`` [U] the
    units' popularity. A token reaches at most ``max_units`` units (``max_units >= U``:
    no limit).
    """
    n_experts, (n_units, size) = p_e.shape[0], prob_ux.shape
    limit = min(max_units, n_units)
    unit_e = np.arange(n_experts) // size  # a table: integer division is slow
    ids_tk = np.empty((n_tokens, top_k), dtype=np.int16)

    def work(start: int, stop: int) -> None:
        _draw_into(ids_tk, start, stop, p_e, prob_e, alias_e, prob_ux, alias_ux, mass_u,
                   unit_e, limit, seed, np.zeros(n_experts, dtype=np.bool_),
                   np.zeros(n_units, dtype=np.bool_), np.zeros(limit + 1, dtype=np.int64),
                   np.zeros(limit), np.zeros(1, dtype=np.int64))

    in_parallel(work, n_tokens, cost=top_k)
    return ids_tk


@njit(nogil=True, cache=True, _nrt=False)
def _draw_into(ids_tk, start, stop, p_e, prob_e, alias_e, prob_ux, alias_ux, mass_u, unit_e,
               limit, seed, taken_e, seen_u, units_m, cum_m, every_unit):
    """Tokens ``start:stop`` of :func:`draw_topk` into ``ids_tk``; ``taken_e``,
    ``seen_u`` (all False), ``units_m`` [limit + 1], ``cum_m`` [limit] and
    ``every_unit`` ([0]) are this call's scratch."""
    n_units, top_k = prob_ux.shape[0], ids_tk.shape[1]
    for t in range(start, stop):
        state = _mix(np.uint64(seed) ^ _mix(np.uint64(t)))
        slot = n_seen = 0
        while slot < top_k:
            state, e = _free_pick(p_e, prob_e, alias_e, taken_e, every_unit, state)
            if limit < n_units:
                # Whether the unit is new is a coin flip a branch would mispredict: the
                # place after the units seen is written every time and kept only by a
                # new unit (so ``units_m`` has one spare place).
                unit = unit_e[e]
                new = np.int64(not seen_u[unit])
                if new & np.int64(n_seen == limit):
                    break  # an (M+1)-th unit: skipped, the rest stays in the M units
                seen_u[unit] = True
                units_m[n_seen] = unit
                n_seen += new
            taken_e[e] = True
            ids_tk[t, slot] = e
            slot += 1
        if slot < top_k:
            mass = 0.0
            for j in range(limit):
                mass += mass_u[units_m[j]]
                cum_m[j] = mass
        while slot < top_k:
            state, e = _unit_pick(p_e, prob_ux, alias_ux, cum_m, taken_e, units_m, limit, state)
            taken_e[e] = True
            ids_tk[t, slot] = e
            slot += 1
        for k in range(top_k):
            taken_e[ids_tk[t, k]] = False
        for j in range(n_seen):
            seen_u[units_m[j]] = False


def count_by_source(ids_tk: np.ndarray, kept_tk: np.ndarray, tokens_per_rank: int,
                    gpu_s: np.ndarray, node_g: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per source rank ``s`` of an EP group (token ``t`` on rank ``t // tokens_per_rank``),
    with slot ``x`` on GPU ``gpu_s[x]`` and GPU ``g`` in node ``node_g[g]``:

    * ``kept_ss``/``dropped_ss`` [ep, slots]: its assignments kept and dropped per slot,
    * ``pairs_sg`` [ep, ep]: its kept assignments to each GPU,
    * ``reach_gpu_sg`` [ep, ep] and ``reach_node_sn`` [ep, nodes]: its tokens with at
      least one kept assignment on each GPU and node,
    * ``unknown_s`` [ep]: its slots of id ``-1`` (dropped before a trace was recorded).

    ``kept_tk`` [T, K] bool, or shape [0, 0] when every assignment is kept.
    """
    ep, n_slots, n_nodes = node_g.shape[0], gpu_s.shape[0], int(node_g.max()) + 1
    counts = tuple(np.zeros(shape, dtype=np.int64) for shape in (
        (ep, n_slots), (ep, n_slots), (ep, ep), (ep, ep), (ep, n_nodes), (ep,)))

    def work(start: int, stop: int) -> None:
        _count_into(*counts, start, stop, ids_tk, kept_tk, tokens_per_rank, gpu_s, node_g,
                    np.empty(ep, dtype=np.int64), np.empty(n_nodes, dtype=np.int64))

    in_parallel(work, ep, cost=tokens_per_rank * ids_tk.shape[1])
    return counts


@njit(nogil=True, cache=True, _nrt=False)
def _count_into(kept_ss, dropped_ss, pairs_sg, reach_gpu_sg, reach_node_sn, unknown_s,
                start, stop, ids_tk, kept_tk, tokens_per_rank, gpu_s, node_g, gpu_last,
                node_last):
    """Source ranks ``start:stop`` of :func:`count_by_source` into its outputs;
    ``gpu_last`` and ``node_last`` are this call's scratch."""
    all_kept = kept_tk.shape[0] == 0
    gpu_last[:] = -1  # the last token counted on each GPU and node
    node_last[:] = -1
    for s in range(start, stop):
        for t in range(s * tokens_per_rank, (s + 1) * tokens_per_rank):
            for k in range(ids_tk.shape[1]):
                x = np.int64(ids_tk[t, k])
                if x < 0:
                    unknown_s[s] += 1
                elif not all_kept and not kept_tk[t, k]:
                    dropped_ss[s, x] += 1
                else:
                    kept_ss[s, x] += 1
                    g = gpu_s[x]
                    pairs_sg[s, g] += 1
                    reach_gpu_sg[s, g] += gpu_last[g] != t
                    gpu_last[g] = t
                    n = node_g[g]
                    reach_node_sn[s, n] += node_last[n] != t
                    node_last[n] = t
