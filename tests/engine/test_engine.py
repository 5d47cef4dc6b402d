"""Stories about the SimPy engine on tiny hand-made programs.

Every GPU runs two in-order streams (compute and communication). An op waits for the
previous op of its stream and for its dependencies; a communication op is a
collective of the GPU's EP group that starts when the last member arrives.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.engine.program import COMM, COMPUTE, build_program
from moesim.engine.simpy_engine import run_program


def durations(ops, n_gpus: int, **per_phase: float) -> np.ndarray:
    """[ops, gpus] with the same duration for every op of a phase on every GPU."""
    return np.array([[per_phase[op.phase]] * n_gpus for op in ops], dtype=float)


def index_of(ops, phase, layer, microbatch=0, backward=False) -> int:
    (op,) = [o for o in ops if (o.phase, o.layer, o.microbatch, o.backward)
             == (phase, layer, microbatch, backward)]
    return op.index


PHASES = dict(attention=3.0, shared=0.0, dispatch=2.0, experts=5.0, combine=1.5,
              dense_ffn=4.0, lm_head=0.5)


def test_program_shape_of_one_moe_layer():
    """One MoE layer, one micro-batch, forward only: attention, then the shared expert
    and the dispatch (both need only attention), experts after the dispatch, combine
    after the experts, and the LM head after both the combine and the shared expert."""
    ops = build_program(num_layers=1, first_dense_layers=0, micro_batches=1, train=False)
    assert [(op.phase, op.stream) for op in ops] == [
        ("attention", COMPUTE), ("shared", COMPUTE), ("dispatch", COMM),
        ("experts", COMPUTE), ("combine", COMM), ("lm_head", COMPUTE)]
    assert [op.deps for op in ops] == [(), (0,), (0,), (2,), (3,), (4, 1)]
    assert all(op.collective == (op.stream == COMM) for op in ops)


@pytest.mark.parametrize("train", [False, True])
def test_one_microbatch_without_shared_experts_runs_strictly_in_sequence(train):
    """With one micro-batch and no shared expert (a Mixtral-like layer) nothing can
    overlap: every op waits for the one before, so the step takes the sum of all
    durations -- forward only, or forward plus backward."""
    ops = build_program(num_layers=3, first_dense_layers=1, micro_batches=1, train=train)
    duration = durations(ops, 1, **PHASES)
    timeline = run_program(ops, duration, ep=1)
    assert timeline.end_og.max() == pytest.approx(duration.sum())
    # Each op starts exactly when the previous one in program order ends.
    order = np.lexsort((timeline.end_og[:, 0], timeline.start_og[:, 0]))
    assert np.allclose(timeline.start_og[order[1:], 0], timeline.end_og[order[:-1], 0])


def test_shared_expert_hides_under_the_dispatch():
    """With a shared expert the layer costs attention + max(shared, dispatch) + experts
    + combine: the shared expert runs on the compute stream while the tokens travel."""
    ops = build_program(num_layers=2, first_dense_layers=0, micro_batches=1, train=False)
    for shared, hidden_part in [(1.0, 2.0), (3.5, 3.5)]:  # shorter, then longer than dispatch
        duration = durations(ops, 1, **{**PHASES, "shared": shared})
        layer = PHASES["attention"] + hidden_part + PHASES["experts"] + PHASES["combine"]
        step = run_program(ops, duration, ep=1).end_og.max()
        assert step == pytest.approx(2 * layer + PHASES["lm_head"])


def test_a_collective_starts_when_its_last_member_arrives():
    """Two GPUs in one EP group; GPU 1's attention takes 7 s instead of 3 s. GPU 0
    reaches the dispatch at 3 s but the exchange starts at 7 s for both, and GPU 0's
    4 s of waiting delays everything after it. GPUs 2 and 3 form another EP group and
    are not held up by GPU 1."""
    ops = build_program(num_layers=1, first_dense_layers=0, micro_batches=1, train=False)
    duration = durations(ops, 4, **PHASES)
    attention = index_of(ops, "attention", 0)
    duration[attention, 1] = 7.0
    timeline = run_program(ops, duration, ep=2)

    dispatch = index_of(ops, "dispatch", 0)
    assert timeline.arrive_og[dispatch].tolist() == [3.0, 7.0, 3.0, 3.0]
    assert timeline.start_og[dispatch].tolist() == [7.0, 7.0, 3.0, 3.0]
    assert timeline.end_og[dispatch].tolist() == [9.0, 9.0, 5.0, 5.0]
    # The slow GPU sets the step time of its whole group; the other group is 4 s faster.
    end = timeline.end_og.max(axis=0)
    assert end[0] == end[1] == pytest.approx(end[2] + 4.0)
    assert end[2] == end[3] == pytest.approx(sum(PHASES[p] for p in
                                             ("attention", "dispatch", "experts",
                                              "combine", "lm_head")))


def test_two_microbatches_overlap_compute_with_communication():
    """With two micro-batches the dispatch of one runs while the other computes, so the
    step is shorter than the same work done back to back, yet never shorter than the
    busier stream's total work."""
    ops = build_program(num_layers=4, first_dense_layers=1, micro_batches=2, train=True)
    duration = durations(ops, 2, **{**PHASES, "shared": 1.0})
    timeline = run_program(ops, duration, ep=2)
    step = timeline.end_og.max()
    compute_work = sum(duration[op.index, 0] for op in ops if op.stream == COMPUTE)
    comm_work = sum(duration[op.index, 0] for op in ops if op.stream == COMM)
    assert step < compute_work + comm_work
    assert step >= max(compute_work, comm_work)
    # Concretely: some dispatch runs while some compute op of the other micro-batch runs.
    comm = [op.index for op in ops if op.stream == COMM]
    calc = [op.index for op in ops if op.stream == COMPUTE]
    s, e = timeline.start_og[:, 0], timeline.end_og[:, 0]
    assert any(max(s[a], s[b]) < min(e[a], e[b]) for a in comm for b in calc)


@settings(max_examples=25, deadline=None)
@given(
    num_layers=st.integers(1, 4),
    micro_batches=st.integers(1, 3),
    train=st.booleans(),
    ep=st.sampled_from([1, 2, 4]),
    groups=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_timeline_respects_streams_dependencies_and_collectives(
        num_layers, micro_batches, train, ep, groups, seed):
    """For random programs and random per-GPU durations (collectives equal within an
    EP group, as the engine requires):

    * no span ends before it starts, nor starts before its GPU arrives;
    * every op starts after all its dependencies on the same GPU ended;
    * each stream runs its ops in program order without overlap;
    * a compute op takes exactly its duration;
    * a collective starts, for every member, when the last member arrived.
    """
    rng = np.random.default_rng(seed)
    n_gpus = ep * groups
    ops = build_program(num_layers=num_layers, first_dense_layers=min(1, num_layers - 1),
                        micro_batches=micro_batches, train=train)
    duration = rng.uniform(0.0, 2.0, size=(len(ops), n_gpus))
    for op in ops:
        if op.collective:
            duration[op.index] = np.repeat(rng.uniform(0.0, 2.0, groups), ep)
    t = run_program(ops, duration, ep=ep)

    assert (t.end_og >= t.start_og).all()
    assert (t.start_og >= t.arrive_og).all()
    for op in ops:
        for dep in op.deps:
            assert (t.start_og[op.index] >= t.end_og[dep] - 1e-12).all()
        if op.collective:
            arrive = t.arrive_og[op.index].reshape(groups, ep)
            start = t.start_og[op.index].reshape(groups, ep)
            assert np.allclose(start, arrive.max(axis=1, keepdims=True))
            assert np.allclose(t.end_og[op.index] - t.start_og[op.index], duration[op.index])
        else:
            assert np.allclose(t.start_og[op.index], t.arrive_og[op.index])
            assert np.allclose(t.end_og[op.index] - t.start_og[op.index], duration[op.index])
    for stream in (COMPUTE, COMM):
        in_order = [op.index for op in ops if op.stream == stream]
        assert (t.start_og[in_order[1:]] >= t.end_og[in_order[:-1]] - 1e-12).all()


def test_same_input_same_timeline():
    ops = build_program(num_layers=3, first_dense_layers=1, micro_batches=2, train=True)
    duration = np.random.default_rng(0).uniform(0.1, 1.0, size=(len(ops), 1))
    a, b = run_program(ops, duration, ep=1), run_program(ops, duration, ep=1)
    assert np.array_equal(a.start_og, b.start_og) and np.array_equal(a.end_og, b.end_og)
