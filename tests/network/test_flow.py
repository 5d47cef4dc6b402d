"""Stories about the flow-level network model: max-min fair sharing of every link,
re-solved as flows finish, against hand-solved rates and the analytical model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.comm.traffic import (
    Paths,
    bytes_per_copy,
    concat_flows,
    dispatch_flows,
    dispatch_loads,
    link_capacity,
)
from moesim.config.kernels import KERNEL_NAMES
from moesim.network.analytical import exchange_time
from moesim.network.flow import complete, group_exchange_times, max_min_rates
from moesim.routing.batch import RoutedBatch, count_batch
from moesim.routing.synthetic import sample_topk
from moesim.topologies import load_topology

LINK_FIELDS = ("nvl_out", "nvl_in", "nic_out", "nic_in", "up", "down")


def routed_counts(*, ep: int, n_experts: int = 64, top_k: int = 6, tokens: int = 512,
                  seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = sample_topk(np.full(n_experts, 1 / n_experts), n_tokens=ep * tokens, top_k=top_k,
                      rng=rng)
    batch = RoutedBatch(ids_tk=ids, kept_tk=np.ones(ids.shape, dtype=bool),
                        tokens_per_rank=tokens)
    return count_batch(batch, n_experts=n_experts, ep=ep, gpus_per_node=min(ep, 8))


# ---------------------------------------------------------------- max-min rates


def test_two_flows_on_one_link_get_half_each():
    rates = max_min_rates(np.array([10.0]), Paths.from_lists([[0], [0]]))
    assert rates.tolist() == [5.0, 5.0]


def test_a_flow_held_back_elsewhere_leaves_the_rest_of_a_shared_link():
    """Link 0 (10 B/s) carries A, B and C; A also crosses link 1 (2 B/s), C link 2
    (3 B/s). A is held to 2 and C to 3 by their own narrow links, so B takes the
    10 - 2 - 3 = 5 left on link 0, not a third of it; every link is then full."""
    paths = Paths.from_lists([[0, 1], [0], [0, 2]])
    rates = max_min_rates(np.array([10.0, 2.0, 3.0]), paths)
    assert rates == pytest.approx([2.0, 5.0, 3.0], rel=1e-12)
    # Inactive flows get nothing and leave their share to the others.
    rates = max_min_rates(np.array([10.0, 2.0, 3.0]), paths, np.array([True, True, False]))
    assert rates == pytest.approx([2.0, 8.0, 0.0], rel=1e-12)


def test_a_short_flow_finishing_speeds_up_the_long_one():
    """10 B and 30 B share one 10 B/s link: both run at 5 B/s until the short one is
    done at t = 2 s; the long one then has 20 B left at 10 B/s and ends at t = 4 s
    (analytical: 40 B / 10 B/s = 4 s too). Latency delays both by the same second."""
    paths = Paths.from_lists([[0], [0]])
    done = complete(np.array([10.0, 30.0]), paths, np.array([10.0]))
    assert done.finish_f == pytest.approx([2.0, 4.0], rel=1e-12)
    assert done.makespan == pytest.approx(4.0, rel=1e-12)
    done = complete(np.array([10.0, 30.0]), paths, np.array([10.0]), latency_s=1.0)
    assert done.finish_f == pytest.approx([3.0, 5.0], rel=1e-12)
    assert done.makespan == pytest.approx(5.0)


def test_a_finished_flow_frees_a_link_the_next_bottleneck_then_fills():
    """A (link 0), B (links 0, 1), C (link 1); links 10 and 4 B/s; 6, 20, 20 B.
    Start: link 1 gives B and C 2 each, A takes the 8 left on link 0: A is done at
    0.75 s. Then B and C stay at 2 (link 1 still binds) until... nothing else moves:
    B and C each have 20 - 1.5 = 18.5 B left at 2 B/s, done at 0.75 + 9.25 = 10 s,
    which is also link 1's 40 B / 4 B/s."""
    paths = Paths.from_lists([[0], [0, 1], [1]])
    done = complete(np.array([6.0, 20.0, 20.0]), paths, np.array([10.0, 4.0]))
    assert done.finish_f == pytest.approx([0.75, 10.0, 10.0], rel=1e-12)
    assert done.makespan == pytest.approx(10.0, rel=1e-12)


# ---------------------------------------------------------------- invariants


@st.composite
def networks(draw):
    n_links = draw(st.integers(1, 6))
    n_flows = draw(st.integers(1, 10))
    paths = [sorted(draw(st.sets(st.integers(0, n_links - 1), min_size=1, max_size=n_links)))
             for _ in range(n_flows)]
    capacity = np.array(draw(st.lists(st.floats(0.5, 100.0), min_size=n_links,
                                      max_size=n_links)))
    nbytes = np.array(draw(st.lists(st.floats(0.0, 50.0), min_size=n_flows,
                                    max_size=n_flows)))
    return Paths.from_lists(paths), capacity, nbytes


def link_load(paths: Paths, per_flow: np.ndarray, n_links: int) -> np.ndarray:
    """Independent of the model: add each flow's value onto each link of its path."""
    out = np.zeros(n_links)
    for f in range(paths.n_flows):
        for link in paths.link_ids[paths.indptr[f]:paths.indptr[f + 1]]:
            out[link] += per_flow[f]
    return out


@settings(max_examples=200, deadline=None)
@given(networks())
def test_max_min_rates_are_feasible_and_every_flow_is_bottlenecked(net):
    """No link carries more than its capacity, and every flow crosses a bottleneck: a
    saturated link on which no flow is faster than it (the definition of max-min)."""
    paths, capacity, _ = net
    rates = max_min_rates(capacity, paths)
    load = link_load(paths, rates, len(capacity))
    assert (load <= capacity * (1 + 1e-9)).all()
    assert (rates > 0).all()
    fastest = np.zeros(len(capacity))
    for f in range(paths.n_flows):
        for link in paths.link_ids[paths.indptr[f]:paths.indptr[f + 1]]:
            fastest[link] = max(fastest[link], rates[f])
    for f in range(paths.n_flows):
        path = paths.link_ids[paths.indptr[f]:paths.indptr[f + 1]]
        assert any(load[link] >= capacity[link] * (1 - 1e-9)
                   and rates[f] >= fastest[link] * (1 - 1e-9) for link in path), f


def reference_completion(nbytes, paths, capacity):
    """Cold re-solve at every finish, one flow at a time: the slow obvious way."""
    left, finish, now = nbytes.astype(float).copy(), np.zeros(len(nbytes)), 0.0
    active = left > 0
    while active.any():
        rates = max_min_rates(capacity, paths, active)
        to_go = np.where(active, left / np.where(active, rates, 1.0), np.inf)
        step = to_go.min()
        now += step
        left -= rates * step
        done = active & (to_go <= step * (1 + 1e-9))
        finish[done], active = now, active & ~done
    return finish


@settings(max_examples=200, deadline=None)
@given(networks())
def test_completion_matches_a_cold_re_solve_and_the_analytical_bound(net):
    """The warm-started completion finishes every flow when re-solving from scratch
    does; the makespan is never below the busiest link's bytes / capacity, with
    ``rtol`` merging near finishes too (every byte still moves at feasible rates)."""
    paths, capacity, nbytes = net
    done = complete(nbytes, paths, capacity)
    assert done.finish_f == pytest.approx(reference_completion(nbytes, paths, capacity),
                                          rel=1e-6, abs=1e-12)
    bound = (link_load(paths, nbytes, len(capacity)) / capacity).max()
    assert done.makespan >= bound * (1 - 1e-9)
    assert complete(nbytes, paths, capacity, rtol=0.05).makespan >= bound * (1 - 1e-9)


# ---------------------------------------------------------------- flows of real kernels


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize(("topology", "gpus", "first_gpu"),
                         [("h800-node", 8, 0), ("h800-cluster", 32, 0),
                          ("h800-cluster", 32, 16), ("dgx-h100-superpod", 16, 0)])
def test_flows_reproduce_dispatch_loads_exactly(kernel, topology, gpus, first_gpu):
    """Adding each flow's copies onto each link of its path gives dispatch_loads's
    arrays exactly, in both directions, for every kernel and fabric kind (NVLink only,
    multi-plane, rail-optimized); on a group starting mid-cluster too."""
    topo = load_topology(topology, gpus=gpus)
    ep = gpus - first_gpu
    counts = routed_counts(ep=ep, n_experts=ep * 4, tokens=128, seed=7)
    args = dict(kernel=kernel, topology=topo, first_gpu=first_gpu, gpus_per_node=min(ep, 8))
    flows, loads = dispatch_flows(counts, **args), dispatch_loads(counts, **args)
    assert flows.n_links == len(link_capacity(topo))
    per_link = link_load(flows.paths, flows.copies_f, flows.n_links)
    back = link_load(flows.reversed().paths, flows.copies_f, flows.n_links)
    n, leaves = topo.n_gpus, max(topo.n_leaves, 0)
    bounds = np.cumsum([0, n, n, n, n, leaves, leaves])
    for name, lo, hi in zip(LINK_FIELDS, bounds[:-1], bounds[1:], strict=True):
        assert np.array_equal(per_link[lo:hi], getattr(loads, name)), name
        assert np.array_equal(back[lo:hi], getattr(loads.reversed(), name)), name
    assert (flows.copies_f > 0).all() and (flows.src_f != flows.dst_f).all()


def test_pxn_hop_and_nic_transfer_are_one_flow():
    """GPU 0 -> GPU 9 on the 8-plane cluster (the story in test_traffic): one flow over
    NVLink 0 -> 1 and NIC 1 -> 9, i.e. nvl_out[0], nvl_in[1], nic_out[1], nic_in[9]."""
    topo = load_topology("h800-cluster", gpus=16)
    ids = np.arange(16)[:, None].copy()
    ids[0, 0] = 9
    counts = count_batch(RoutedBatch(ids_tk=ids, kept_tk=np.ones(ids.shape, dtype=bool),
                                     tokens_per_rank=1), n_experts=16, ep=16, gpus_per_node=8)
    flows = dispatch_flows(counts, kernel="nccl-alltoall", topology=topo, first_gpu=0,
                           gpus_per_node=8)
    n = 16
    assert flows.copies_f.tolist() == [1.0]
    assert sorted(flows.paths.link_ids.tolist()) == [0, n + 1, 2 * n + 1, 3 * n + 9]


# ---------------------------------------------------------------- against analytical


def test_symmetric_exchange_takes_the_analytical_time():
    """Every rank of 16 sends one token to each other rank (one expert per GPU): every
    flow alike per class, so the busiest link runs full from start to end and the flow
    model gives the analytical time exactly, bottleneck included, both directions."""
    topo = load_topology("h800-cluster", gpus=16)
    ranks = np.arange(16)
    ids = ((ranks[:, None] + 1 + np.arange(15)[None, :]) % 16).reshape(-1, 1)
    counts = count_batch(RoutedBatch(ids_tk=ids, kept_tk=np.ones(ids.shape, dtype=bool),
                                     tokens_per_rank=15), n_experts=16, ep=16, gpus_per_node=8)
    for kernel in KERNEL_NAMES:
        args = dict(kernel=kernel, topology=topo, first_gpu=0, gpus_per_node=8)
        nbytes = bytes_per_copy(kernel, hidden=7168, dtype="fp8", dispatch=True) * 1000
        flows = dispatch_flows(counts, **args).scaled(nbytes)
        loads = dispatch_loads(counts, **args).scaled(nbytes)
        for f, a in [(flows, loads), (flows.reversed(), loads.reversed())]:
            want = exchange_time(a, topo, overhead_s=5e-6)
            (got,) = group_exchange_times([f], topo, overhead_s=5e-6, rtol=0.0)
            assert got.seconds == pytest.approx(want.seconds, rel=1e-9), kernel
            assert got.latency_s == want.latency_s and got.bottleneck == want.bottleneck


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("gpus", [16, 32])
def test_routed_all_to_all_agrees_with_analytical_within_two_percent(kernel, gpus):
    """A uniformly routed batch (E = 64, K = 6, 512 tokens per rank) on the H800
    cluster: max-min sharing keeps the busiest link nearly always busy, so the flow
    model lands within 2% above the analytical time (never below: that is the busiest
    link's bytes at full rate), and names the same bottleneck class."""
    topo = load_topology("h800-cluster", gpus=gpus)
    counts = routed_counts(ep=gpus, seed=gpus)
    args = dict(kernel=kernel, topology=topo, first_gpu=0, gpus_per_node=8)
    nbytes = bytes_per_copy(kernel, hidden=7168, dtype="fp8", dispatch=True)
    want = exchange_time(dispatch_loads(counts, **args).scaled(nbytes), topo, overhead_s=0.0)
    for rtol in (0.0, 1e-3):
        (got,) = group_exchange_times([dispatch_flows(counts, **args).scaled(nbytes)], topo,
                                      overhead_s=0.0, rtol=rtol)
        assert want.seconds * (1 - 1e-9) <= got.seconds <= want.seconds * 1.02
        assert got.bottleneck == want.bottleneck


def test_a_scenario_selects_the_flow_level_network_and_it_agrees_on_one_group():
    """`network: flow` solves every exchange with max-min fair sharing; one EP group's
    uniform all-to-all takes what the analytical model says (within 2%)."""
    import moesim

    small = ["model.num_layers=4", "parallel.tokens_per_gpu=256", "routing.layer_samples=2"]
    analytical = moesim.simulate(moesim.load_scenario(overrides=small)).summary
    flow = moesim.simulate(moesim.load_scenario(overrides=[*small, "network=flow"])).summary
    for key in ("dispatch_time_s", "combine_time_s", "step_time_s"):
        assert flow[key] == pytest.approx(analytical[key], rel=0.02)
    assert flow["rdma_bytes"] == analytical["rdma_bytes"]


def test_flow_level_groups_finish_on_their_own_flows():
    """Two EP groups on one fabric: each group's exchange ends with its own last flow,
    and none ends before the busiest link it uses could drain."""
    from moesim.network.flow import group_exchange_times

    topo = load_topology("h800-cluster", gpus=32)
    flows = []
    for group in range(2):
        counts = routed_counts(ep=16, seed=group)
        flows.append(dispatch_flows(counts, kernel="deepep-normal", topology=topo,
                                    first_gpu=16 * group, gpus_per_node=8).scaled(7392.0))
    times = group_exchange_times(flows, topo, overhead_s=0.0, rtol=0.0)
    both = concat_flows(flows)
    for group, t in enumerate(times):
        own = exchange_time(flows[group].loads(), topo, overhead_s=0.0)
        assert t.seconds >= own.seconds * (1 - 1e-9)
    assert max(t.seconds for t in times) == pytest.approx(
        exchange_time(both.loads(), topo, overhead_s=0.0).seconds, rel=0.02)
