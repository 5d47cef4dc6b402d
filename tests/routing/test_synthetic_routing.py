"""Stories about synthetic routing: who picks which experts, and who gets dropped.

``sample_topk`` draws K distinct experts per token from a popularity law (uniform or
Zipf), optionally confined to ``max_units`` placement units (GPUs or nodes) per token,
as DeepSeek's device- and node-limited gates do. capacity dropping then lets every
GPU keep at most ``ceil(cf * A / D)`` of the ``A`` assignments of its EP group and
drops the lowest-priority surplus (docs/routing.md section 2.5).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.routing.batch import RoutedBatch, count_batch
from moesim.routing.dropping import Capacity, keep_within_capacity
from moesim.routing.synthetic import expert_popularity, sample_topk
from moesim.traces.capacity import device_budget as _budget


def uniform(n_experts: int) -> np.ndarray:
    return expert_popularity(n_experts, assignment="uniform", zipf_exponent=0.0,
                             rng=np.random.default_rng(0))


def zipf(n_experts: int, exponent: float, seed: int = 0) -> np.ndarray:
    return expert_popularity(n_experts, assignment="zipf", zipf_exponent=exponent,
                             rng=np.random.default_rng(seed))


def units_per_token(ids_tk: np.ndarray, unit_size: int) -> np.ndarray:
    """How many distinct units (contiguous blocks of ``unit_size`` experts) each token uses."""
    units_tk = np.sort(ids_tk // unit_size, axis=1)
    return 1 + (np.diff(units_tk, axis=1) != 0).sum(axis=1)


def assert_distinct_rows(ids_tk: np.ndarray) -> None:
    ordered = np.sort(ids_tk, axis=1)
    assert (np.diff(ordered, axis=1) > 0).all(), "a token picked the same expert twice"


# ---------------------------------------------------------------- sample_topk


def test_every_token_gets_k_distinct_experts_in_range():
    """Top-K picks K *different* experts: 6 of 64, for 5000 tokens."""
    ids = sample_topk(uniform(64), n_tokens=5000, top_k=6, rng=np.random.default_rng(1))
    assert ids.shape == (5000, 6)
    assert ids.min() >= 0 and ids.max() < 64
    assert_distinct_rows(ids)


def test_k_equal_to_e_picks_every_expert():
    """With K = E every token must take all experts: the redraw loop may not give up."""
    ids = sample_topk(zipf(8, 2.0), n_tokens=300, top_k=8, rng=np.random.default_rng(2))
    assert (np.sort(ids, axis=1) == np.arange(8)).all()


def test_uniform_loads_are_near_t_k_over_e():
    """Under uniform routing every expert receives about T*K/E assignments.

    Each expert's load is a sum of T independent indicators with p = K/E, so its
    standard deviation is below sqrt(T*K/E) ~ 43 here; five of them (~11%) is generous
    for 64 experts yet far tighter than any real skew.
    """
    n_tokens, top_k, n_experts = 20_000, 6, 64
    ids = sample_topk(uniform(n_experts), n_tokens=n_tokens, top_k=top_k,
                      rng=np.random.default_rng(3))
    load = np.bincount(ids.ravel(), minlength=n_experts)
    mean = n_tokens * top_k / n_experts
    assert load.sum() == n_tokens * top_k
    assert np.abs(load - mean).max() < 5 * math.sqrt(mean)


def test_zipf_makes_the_hottest_expert_carry_clearly_more_than_uniform():
    """Zipf popularity (exponent 1) puts a hot expert far above the uniform share,
    while exponent 0 stays uniform."""
    n_tokens, top_k, n_experts = 20_000, 6, 64
    mean = n_tokens * top_k / n_experts
    rng = np.random.default_rng(4)
    skewed = sample_topk(zipf(n_experts, 1.0), n_tokens=n_tokens, top_k=top_k, rng=rng)
    hot = np.bincount(skewed.ravel(), minlength=n_experts).max()
    assert hot > 4 * mean

    flat = expert_popularity(n_experts, assignment="zipf", zipf_exponent=0.0, rng=rng)
    assert np.allclose(flat, 1 / n_experts)


@pytest.mark.parametrize("exponent", [0.0, 1.0])
@pytest.mark.parametrize("max_units", [1, 2, 4])
def test_device_limit_holds_for_every_token(max_units, exponent):
    """With 64 experts on 8 units of 8 (e.g. GPUs), each token's 6 experts lie in at
    most ``max_units`` units -- checked token by token, including M = 1."""
    popularity = zipf(64, exponent) if exponent else uniform(64)
    ids = sample_topk(popularity, n_tokens=4000, top_k=6, rng=np.random.default_rng(5),
                      unit_size=8, max_units=max_units)
    assert_distinct_rows(ids)
    assert units_per_token(ids, 8).max() <= max_units
    if max_units == 1:
        assert (units_per_token(ids, 8) == 1).all()


def test_m_equal_1_with_k_equal_to_unit_size_takes_a_whole_unit():
    """M = 1 and K = experts per unit: every token takes all experts of one unit."""
    ids = sample_topk(uniform(16), n_tokens=500, top_k=4, rng=np.random.default_rng(6),
                      unit_size=4, max_units=1)
    ordered = np.sort(ids, axis=1)
    first = ordered[:, :1]
    assert (first % 4 == 0).all()
    assert (ordered == first + np.arange(4)).all()


@pytest.mark.parametrize(("n_experts", "unit_size", "max_units", "top_k"),
                         [(64, 8, 2, 6), (16, 4, 2, 8), (256, 32, 4, 8)])
def test_extreme_skew_with_a_device_limit_still_gives_distinct_experts(
        n_experts, unit_size, max_units, top_k):
    """Zipf exponent 4 makes one expert take almost all mass; rejection sampling then
    keeps redrawing the hot expert and must fall back to exact sampling. The result is
    still K distinct experts within M units per token (even when K = M x unit size)."""
    ids = sample_topk(zipf(n_experts, 4.0), n_tokens=3000, top_k=top_k,
                      rng=np.random.default_rng(7), unit_size=unit_size, max_units=max_units)
    assert ids.shape == (3000, top_k)
    assert ids.min() >= 0 and ids.max() < n_experts
    assert_distinct_rows(ids)
    assert units_per_token(ids, unit_size).max() <= max_units


def test_extreme_skew_without_a_limit_still_gives_distinct_experts():
    ids = sample_topk(zipf(32, 4.0), n_tokens=3000, top_k=8, rng=np.random.default_rng(8))
    assert_distinct_rows(ids)


def test_same_seed_same_routing_other_seed_other_routing():
    """Routing is a pure function of the seed."""
    def draw(seed):
        rng = np.random.default_rng(seed)
        popularity = expert_popularity(64, assignment="zipf", zipf_exponent=1.2, rng=rng)
        return sample_topk(popularity, n_tokens=1000, top_k=6, rng=rng,
                           unit_size=16, max_units=2)

    assert np.array_equal(draw(11), draw(11))
    assert not np.array_equal(draw(11), draw(12))


@settings(max_examples=40, deadline=None)
@given(
    n_units=st.integers(1, 8),
    unit_size=st.integers(1, 8),
    data=st.data(),
)
def test_sampling_property_over_small_shapes(n_units, unit_size, data):
    """For any small E = units x unit size, K <= E and feasible M: rows are K distinct
    in-range experts within M units."""
    n_experts = n_units * unit_size
    top_k = data.draw(st.integers(1, n_experts), label="top_k")
    min_units = -(-top_k // unit_size)
    max_units = data.draw(st.one_of(st.none(), st.integers(min_units, n_units)),
                          label="max_units")
    exponent = data.draw(st.sampled_from([0.0, 1.0, 4.0]), label="zipf")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    rng = np.random.default_rng(seed)
    popularity = zipf(n_experts, exponent, seed) if exponent else uniform(n_experts)
    ids = sample_topk(popularity, n_tokens=64, top_k=top_k, rng=rng,
                      unit_size=unit_size if max_units else None, max_units=max_units)
    assert ids.shape == (64, top_k)
    assert ids.min() >= 0 and ids.max() < n_experts
    assert_distinct_rows(ids)
    if max_units:
        assert units_per_token(ids, unit_size).max() <= max_units


def gate_law(popularity_e: np.ndarray, *, top_k: int, unit_size: int, max_units: int
             ) -> dict[tuple[int, ...], float]:
    """The exact law of the expert set a group-limited gate picks on Gumbel-perturbed
    log-popularity, by enumeration: the scores' order is a Plackett-Luce permutation
    (each next expert in proportion to its popularity among the rest); the gate keeps
    the ``max_units`` units whose best expert ranks highest and their ``top_k`` best."""
    law: dict[tuple[int, ...], float] = {}
    for order in itertools.permutations(range(popularity_e.shape[0])):
        chance = 1.0
        for i, e in enumerate(order):
            left = popularity_e[list(order[i:])].sum()
            # Experts of no popularity come last, in a uniformly random order.
            chance *= popularity_e[e] / left if left > 0 else 1 / len(order[i:])
        units = list(dict.fromkeys(e // unit_size for e in order))[:max_units]
        picked = tuple(sorted([e for e in order if e // unit_size in units][:top_k]))
        law[picked] = law.get(picked, 0.0) + chance
    return law


@pytest.mark.parametrize(("n_experts", "unit_size", "max_units", "top_k", "popularity"), [
    (6, 2, 2, 3, 1.0),   # 3 units of 2, at most 2 of them: the limit binds
    (6, 2, 3, 3, 1.5),   # no limit in effect
    (6, 3, 1, 2, 0.0),   # one unit of 3, uniform
    (7, 7, 1, 3, 2.0),   # no units: plain sequential sampling, strong skew
    (6, 2, 2, 4, 1.0),   # K = M x unit size: the token takes both units whole
    (5, 1, 3, 2, 1.0),   # one expert per unit (a GPU per expert)
    (6, 2, 2, 3, 12.0),  # a few experts hold nearly all the mass: the exact fallbacks
    (6, 2, 2, 3, [0.6, 0.0, 0.4, 0.0, 0.0, 0.0]),  # some experts never chosen by score
])
def test_draws_follow_the_gates_exact_law(n_experts, unit_size, max_units, top_k, popularity):
    """Over 200,000 tokens the picked sets match the gate's enumerated law: a
    chi-square test (fixed seed) with p > 0.001, and every set's frequency within 5
    standard deviations of its chance."""
    from scipy.stats import chisquare

    if isinstance(popularity, list):
        popularity = np.array(popularity)
    else:
        popularity = (zipf(n_experts, popularity, seed=3) if popularity
                      else uniform(n_experts))
    law = gate_law(popularity, top_k=top_k, unit_size=unit_size, max_units=max_units)
    n_tokens = 200_000
    ids = sample_topk(popularity, n_tokens=n_tokens, top_k=top_k,
                      rng=np.random.default_rng(17), unit_size=unit_size,
                      max_units=max_units)
    sets, seen = np.unique(np.sort(ids, axis=1), axis=0, return_counts=True)
    observed = dict(zip(map(tuple, sets.tolist()), seen.tolist(), strict=True))
    assert set(observed) <= set(law), "a set the gate can never pick"
    keys = sorted(k for k in law if law[k] > 0)
    assert set(observed) <= set(keys), "a set of no chance"
    expected = np.array([law[k] for k in keys]) * n_tokens
    counts = np.array([observed.get(k, 0) for k in keys])
    assert abs(expected.sum() - n_tokens) < 1e-6 * n_tokens
    assert chisquare(counts, expected).pvalue > 1e-3
    assert (np.abs(counts - expected) <= 5 * np.sqrt(expected) + 1).all()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0.0, 1e-300, 1e-9, 0.3, 1.0, 7.0]), min_size=5,
                         max_size=5), min_size=1, max_size=4))
def test_alias_tables_give_each_category_its_share(rows):
    """Every row's table gives category ``i`` (kept by its own pick, or reached as the
    alias of others) exactly its share of the row's weight; a row without weight is
    uniform."""
    from moesim.routing.kernels import alias_tables

    weight_rx = np.array(rows)
    prob_rx, alias_rx = alias_tables(weight_rx)
    n = weight_rx.shape[1]
    for weight, prob, alias in zip(weight_rx, prob_rx, alias_rx, strict=True):
        assert ((prob >= 0) & (prob <= 1)).all() and ((alias >= 0) & (alias < n)).all()
        share = prob + np.bincount(alias, weights=1.0 - prob, minlength=n)
        wanted = weight / weight.sum() if weight.sum() > 0 else np.full(n, 1.0 / n)
        assert np.allclose(share / n, wanted, atol=1e-12)


def test_draws_do_not_depend_on_the_number_of_threads(monkeypatch):
    """Every token has its own random stream: one thread or three give the same ids."""
    popularity = zipf(64, 1.0)
    draws = []
    for threads in ("1", "3"):
        monkeypatch.setenv("MOESIM_THREADS", threads)
        draws.append(sample_topk(popularity, n_tokens=100_000, top_k=6,
                                 rng=np.random.default_rng(9), unit_size=8, max_units=2))
    assert np.array_equal(*draws)


def test_draws_run_from_many_threads_at_once():
    """The compiled draw may be entered by several Python threads together (a threaded
    Dask worker): each gets what it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    def draw(seed):
        return sample_topk(zipf(64, 1.0), n_tokens=50_000, top_k=6,
                           rng=np.random.default_rng(seed), unit_size=8, max_units=2)

    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(draw, range(4)))
    assert all(np.array_equal(draw(seed), ids) for seed, ids in enumerate(together))


# ---------------------------------------------------------------- capacity dropping
# The simulator drops through the torch layers (one implementation of dropping);
# these stories drive it through the numpy wrapper the simulator uses.


def device_budget(n_assignments, n_devices, capacity_factor):
    return _budget(n_assignments, n_devices=n_devices, capacity_factor=capacity_factor)


def apply_capacity(ids, *, experts_per_device, n_devices, capacity_factor, priority_tk):
    """Drop by ``priority_tk`` as gate weights (the ``probs`` policy)."""
    capacity = Capacity(factor=capacity_factor, drop_policy="probs", scope="device")
    return keep_within_capacity(ids, priority_tk, capacity=capacity,
                                pos_t=np.arange(ids.shape[0]), bins=n_devices,
                                per_bin=experts_per_device, tokens_per_rank=ids.shape[0])


def test_budget_is_ceil_of_cf_times_assignments_over_devices():
    """1000 assignments, 8 GPUs, cf 1.0 -> 125 each; cf 1.1 -> ceil(137.5) = 138."""
    assert device_budget(1000, 8, 1.0) == 125
    assert device_budget(1000, 8, 1.1) == 138
    assert device_budget(1, 8, 0.5) == 1


def test_hand_made_capacity_drop_keeps_the_highest_priorities():
    """4 tokens x K=2 = 8 assignments on 2 GPUs (experts 0,1 on GPU 0; 2,3 on GPU 1)
    with cf 1: each GPU keeps ceil(8/2) = 4. GPU 0 receives 6, so its two lowest
    priorities (0.1 at token 1 and 0.2 at token 3) are dropped; GPU 1 gets 2 and keeps them."""
    ids = np.array([[0, 1], [0, 2], [1, 0], [1, 3]])
    priority = np.array([[0.9, 0.8], [0.1, 0.5], [0.7, 0.6], [0.2, 0.4]])
    kept = apply_capacity(ids, experts_per_device=2, n_devices=2, capacity_factor=1.0,
                          priority_tk=priority)
    assert kept.tolist() == [[True, True], [False, True], [True, True], [False, True]]


def test_equal_priorities_drop_later_tokens_first():
    """Ties go to the lower token index (docs/routing.md section 8.7)."""
    ids = np.array([[0], [0], [0], [1]])
    kept = apply_capacity(ids, experts_per_device=1, n_devices=2, capacity_factor=1.0,
                          priority_tk=np.zeros((4, 1)))
    assert kept[:, 0].tolist() == [True, True, False, True]


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_capacity_property(data):
    """For any small routing and any capacity factor:

    * no GPU keeps more than ``ceil(cf*A/D)``, and none drops while under budget;
    * kept + dropped = all assignments (also as counted by ``count_batch``);
    * on each GPU every kept assignment has priority >= every dropped one;
    * with cf = D (budget = all assignments) nothing is dropped.
    """
    n_devices = data.draw(st.sampled_from([1, 2, 4, 8]), label="D")
    per_device = data.draw(st.integers(1, 4), label="E/D")
    n_experts = n_devices * per_device
    top_k = data.draw(st.integers(1, n_experts), label="K")
    tokens_per_rank = data.draw(st.integers(1, 12), label="tokens per rank")
    n_tokens = tokens_per_rank * n_devices
    cf = data.draw(st.floats(0.05, 3.0), label="cf")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    rng = np.random.default_rng(seed)
    popularity = zipf(n_experts, 1.5, seed)
    ids = sample_topk(popularity, n_tokens=n_tokens, top_k=top_k, rng=rng)
    # Coarse priorities so that ties happen too.
    priority = rng.integers(0, 4, size=ids.shape).astype(float)

    kept = apply_capacity(ids, experts_per_device=per_device, n_devices=n_devices,
                          capacity_factor=cf, priority_tk=priority)
    assert kept.shape == ids.shape and kept.dtype == bool
    budget = math.ceil(cf * ids.size / n_devices)
    device = ids // per_device
    for d in range(n_devices):
        here = device == d
        assert kept[here].sum() == min(here.sum(), budget)
        if (here & ~kept).any():
            assert priority[here & kept].min() >= priority[here & ~kept].max()

    counts = count_batch(RoutedBatch(ids_tk=ids, kept_tk=kept, tokens_per_rank=tokens_per_rank),
                         n_experts=n_experts, ep=n_devices, gpus_per_node=1)
    assert counts.routed == ids.size
    assert counts.kept_e.sum() + counts.dropped_e.sum() == ids.size
    assert counts.kept_e.sum() == kept.sum()
    assert np.array_equal(counts.kept_e + counts.dropped_e,
                          np.bincount(ids.ravel(), minlength=n_experts))

    everything = apply_capacity(ids, experts_per_device=per_device, n_devices=n_devices,
                                capacity_factor=float(n_devices), priority_tk=priority)
    assert everything.all()


@pytest.mark.parametrize("gate, scores", [("group-limited-sigmoid", "sigmoid"),
                                          ("device-limited", "softmax"),
                                          ("softmax-topk", "softmax")])
@pytest.mark.parametrize("units, max_units", [(8, 1), (8, 2), (8, 4), (8, 6), (8, 8),
                                              (32, 3), (32, 16)])
def test_synthetic_device_limited_draws_spread_like_the_real_gates(gate, scores, units,
                                                                    max_units):
    """On random scores the torch gates (the simulator's own re-routing) reach the units
    and 4-expert GPUs that uniform synthetic draws under the same limit reach, at every
    M from a binding limit (every chosen unit used) to none: within 1.5% and 3% for the
    gates that rank a unit by its best expert, within 2.5% for DeepSeek-V3's, which ranks
    it by its best two (the draw ranks by the best one)."""
    import torch

    from moesim.routing.source import units_reached
    from moesim.traces.gates import route, score

    n, experts, top_k = 8000, 256, 8
    torch.manual_seed(units * 10 + max_units)
    real = route(score(torch.randn(n, experts), scores), kind=gate, top_k=top_k,
                 group_size=experts // units, max_groups=max_units).ids_tk.numpy()
    synthetic = sample_topk(uniform(experts), n_tokens=n, top_k=top_k,
                            rng=np.random.default_rng(units), unit_size=experts // units,
                            max_units=max_units).astype(np.int64)
    unit_rel = 0.025 if gate == "group-limited-sigmoid" else 0.015
    for per_unit, rel in ((experts // units, unit_rel), (4, 0.03)):
        assert units_reached(synthetic, per_unit).mean() == pytest.approx(
            units_reached(real, per_unit).mean(), rel=rel)


def test_a_child_forked_while_a_thread_draws_can_draw():
    """A fork while another thread of the parent is inside the compiled draw: the child
    draws too (a lock or thread pool inherited mid-call would leave it waiting)."""
    import multiprocessing
    import threading

    def child(queue):
        ids = sample_topk(uniform(16), n_tokens=100_000, top_k=2,
                          rng=np.random.default_rng(0))
        queue.put(ids.shape)

    stop = threading.Event()

    def keep_drawing():
        while not stop.is_set():
            sample_topk(uniform(64), n_tokens=200_000, top_k=6, rng=np.random.default_rng(1),
                        unit_size=8, max_units=2)

    drawer = threading.Thread(target=keep_drawing)
    drawer.start()
    try:
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        process = context.Process(target=child, args=(queue,))
        process.start()
        process.join(60)
        finished = process.exitcode == 0
        if process.is_alive():
            process.kill()
    finally:
        stop.set()
        drawer.join()
    assert finished and queue.get(timeout=5) == (100_000, 2)
