"""Stories about the pipeline simulation: the bubbles the papers derive, by the numbers.

Costs are per micro-batch and chunk. ``uniform`` gives every (stage, chunk) the same
forward ``f``, input-gradient ``b`` and weight-gradient ``w`` seconds; a full backward
takes ``b + w``. The README of deepseek-ai/DualPipe writes B for the full backward and
W for its weight part, so its B is our ``b + w``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.pipeline import ChunkCosts, PipelineSpec, chunk_path, item_seconds, simulate_pipeline
from moesim.pipeline.schedules import Work


def uniform(pp, vp=1, *, f=1.0, b=1.0, w=1.0, f_comm=0.0, b_comm=0.0, send=0.0) -> ChunkCosts:
    def full(x):
        return np.full((pp, vp), x)
    return ChunkCosts(forward_s=full(f), backward_input_s=full(b), backward_weight_s=full(w),
                      forward_comm_s=full(f_comm), backward_comm_s=full(b_comm), send_s=send)


# -- 1F1B ---------------------------------------------------------------------------


@pytest.mark.parametrize("p,m", [(1, 4), (2, 2), (4, 8), (4, 3), (8, 16), (16, 64)])
def test_1f1b_bubble_fraction_is_textbook(p, m):
    """1F1B with F = 1 and a full backward of 2: the step is (m + p - 1) * 3, every stage
    waits (p - 1) * (F + B), and the bubble fraction is (p - 1) / (m + p - 1) exactly."""
    t = simulate_pipeline(uniform(p), schedule="1f1b", pp=p, micro_batches=m)
    assert t.step_s == (m + p - 1) * 3
    assert np.all(t.idle_s == (p - 1) * 3)
    assert t.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)


# -- interleaved 1F1B ----------------------------------------------------------------


@pytest.mark.parametrize("p,v,m", [(2, 2, 4), (4, 2, 4), (4, 2, 8), (4, 3, 12), (8, 4, 16)])
def test_interleaved_divides_the_bubble_by_v(p, v, m):
    """Narayanan et al. 2021, sec. 2.2.1: with v chunks per stage, each 1/v of the stage's
    layers, the bubble time is (p - 1) * (t_f + t_b) / v, and the bubble fraction
    (p - 1) / (v * m + p - 1). A stage's whole forward is t_f = 1, its whole backward
    t_b = 2."""
    costs = uniform(p, v, f=1 / v, b=1 / v, w=1 / v)
    t = simulate_pipeline(costs, schedule="interleaved", pp=p, vp=v, micro_batches=m)
    plain = simulate_pipeline(uniform(p), schedule="1f1b", pp=p, micro_batches=m)
    assert t.idle_s == pytest.approx(np.full(p, (p - 1) * 3 / v))
    assert t.idle_s == pytest.approx(plain.idle_s / v)
    assert t.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1))


# -- the README table of deepseek-ai/DualPipe ------------------------------------------


@pytest.mark.parametrize("p", [2, 4, 8, 16])
def test_bubbles_of_the_dualpipe_readme_table(p):
    """The table "Pipeline Bubbles and Memory Usage Comparison", with the README figure's
    costs: F = 1, B (full backward) = 2 of which W = 1, and no communication to hide, so
    an overlapped pair takes F&B = F + B = 3.

        1F1B      (PP - 1)(F + B)            = 3 (p - 1)
        ZB1P      (PP - 1)(F + B - 2W)       =   (p - 1)
        DualPipe  (PP/2 - 1)(F&B + B - 3W)   = 2 (p/2 - 1)

    Every stage waits exactly that long."""
    m = 4 * p
    f, b, w = 1.0, 1.0, 1.0
    big_b = b + w
    one_f_one_b = simulate_pipeline(uniform(p), schedule="1f1b", pp=p, micro_batches=m)
    zb = simulate_pipeline(uniform(p), schedule="zero-bubble", pp=p, micro_batches=m)
    dual = simulate_pipeline(uniform(p, 2), schedule="dualpipe", pp=p, micro_batches=m)
    assert np.all(one_f_one_b.idle_s == (p - 1) * (f + big_b))
    assert np.all(zb.idle_s == (p - 1) * (f + big_b - 2 * w))
    assert np.all(dual.idle_s == (p / 2 - 1) * ((f + big_b) + big_b - 3 * w))


@pytest.mark.parametrize("p,m", [(4, 8), (8, 16), (8, 24), (16, 64)])
@pytest.mark.parametrize("f,w,f_comm,b_comm", [
    (2.0, 1.0, 1.0, 1.0),  # F&B = 3 < F + B = 5: the pair hides 2 s of all-to-all
    (2.0, 2.0, 0.0, 0.0),
    (1.0, 0.5, 0.5, 1.0),
    (3.0, 2.0, 1.0, 2.0),
])
def test_dualpipe_bubble_formula_with_overlapped_communication(p, m, f, w, f_comm, b_comm):
    """With communication to hide, F&B = max(F_compute + B_compute, F_comm + B_comm) is
    shorter than F + B. Stages then differ in how much overlapped work they run (the
    middle ones the most), and the formula gives the wait of the middle stages, the
    longest. It holds exactly where the README figure's proportions hold: the input-
    gradient pass as long as the forward, W <= F, and F&B >= F + W."""
    b = f
    fb = max(f - f_comm + b + w - b_comm, f_comm + b_comm)
    assert w <= f and fb >= f + w
    costs = uniform(p, 2, f=f, b=b, w=w, f_comm=f_comm, b_comm=b_comm)
    t = simulate_pipeline(costs, schedule="dualpipe", pp=p, micro_batches=m)
    formula = (p / 2 - 1) * (fb + (b + w) - 3 * w)
    assert t.idle_s.max() == pytest.approx(formula)
    assert t.idle_s[p // 2 - 1] == t.idle_s[p // 2] == t.idle_s.max()


def test_dualpipe_bubble_formula_is_a_model_not_a_law():
    """Outside those proportions the simulated wait and the formula part ways, in both
    directions: a weight pass longer than the gaps it should fill cannot fill them, and a
    slow input-gradient pass leaves less to wait for than the formula counts."""
    p, m = 8, 16
    long_w = simulate_pipeline(uniform(p, 2, f=1, b=1, w=2), schedule="dualpipe", pp=p,
                               micro_batches=m)
    assert long_w.idle_s.max() == 6 > (p / 2 - 1) * (4 + 3 - 3 * 2)
    slow_b = simulate_pipeline(uniform(p, 2, f=1, b=2, w=1), schedule="dualpipe", pp=p,
                               micro_batches=m)
    assert slow_b.idle_s.max() == 11 < (p / 2 - 1) * (4 + 3 - 3 * 1)


def render(timeline, until: int) -> list[str]:
    """Each stage's first ``until`` unit-time cells as in the README figure: F/B/W, the
    micro-batch number for the first direction only ('f', 'b', 'w' for the other), '.'
    idle. A full backward fills two cells, an F&B pair its forward cell then two."""
    n = timeline.spec.micro_batches // 2
    rows = []
    for s in range(timeline.spec.pp):
        cells = ["."] * until
        for r in timeline.items[timeline.items.stage == s].itertuples():
            start, end = int(r.start_s), int(r.end_s)
            for t in range(start, min(end, until)):
                if r.kind == "FB":
                    kind, mb = ("F", r.microbatch) if t == start else ("B", r.bwd_microbatch)
                else:
                    kind, mb = ("B" if r.kind == "BW" else r.kind), r.microbatch
                cells[t] = f"{kind}{mb}" if mb < n else kind.lower()
        rows.append(" ".join(cells))
    return rows


def test_dualpipe_reproduces_the_readme_figure():
    """The README's figure: 8 ranks, 20 micro-batches, F = B = W = 1 cell, F&B 3 cells.
    Its first 25 time steps, transcribed cell by cell (the figure numbers only the
    micro-batches entering at device 0)."""
    t = simulate_pipeline(uniform(8, 2), schedule="dualpipe", pp=8, micro_batches=20)
    assert render(t, 25) == [
        "F0 F1 F2 F3 F4 F5 F6 f b w f b w f b w f F7 b b . . . f B0",
        ". F0 F1 F2 F3 F4 f F5 f b w f b w f F6 b b . . f B0 B0 F7 b",
        ". . F0 F1 F2 f F3 f F4 f b w f F5 b b . f B0 B0 F6 b b f B1",
        ". . . F0 f F1 f F2 f F3 f F4 b b f B0 B0 F5 b b f B1 B1 F6 b",
        ". . . f F0 f F1 f F2 f F3 f B0 B0 F4 b b f B1 B1 F5 b b f B2",
        ". . f f f F0 f F1 f F2 B0 W0 F3 f B1 B1 . F4 b b f B2 B2 F5 b",
        ". f f f f f F0 f F1 B0 W0 F2 B1 W1 F3 f B2 B2 . . F4 b b f B3",
        "f f f f f f f F0 B0 W0 F1 B1 W1 F2 B2 W2 F3 f B3 B3 . . . F4 b",
    ]
    assert t.step_s == 66 and np.all(t.idle_s == 6)


# -- dependencies, for any shape and any costs ----------------------------------------


@st.composite
def pipelines(draw):
    schedule = draw(st.sampled_from(["1f1b", "zero-bubble", "interleaved", "dualpipe"]))
    if schedule == "dualpipe":
        pp = draw(st.sampled_from([2, 4, 6]))
        vp, m = 1, 2 * pp + 2 * draw(st.integers(0, 3))
    elif schedule == "interleaved":
        pp, vp = draw(st.integers(1, 4)), draw(st.integers(2, 3))
        m = pp * draw(st.integers(1, 3))
    else:
        pp, vp, m = draw(st.integers(1, 6)), 1, draw(st.integers(1, 10))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    spec = PipelineSpec(schedule=schedule, pp=pp, vp=vp, micro_batches=m)
    shape = (pp, spec.chunks)
    f, b, w = (rng.uniform(0.1, 2.0, shape) for _ in range(3))
    costs = ChunkCosts(forward_s=f, backward_input_s=b, backward_weight_s=w,
                       forward_comm_s=f * rng.uniform(0, 1, shape),
                       backward_comm_s=(b + w) * rng.uniform(0, 1, shape),
                       send_s=rng.uniform(0, 0.5, pp) if draw(st.booleans()) else 0.3)
    return costs, spec


@settings(max_examples=150, deadline=None)
@given(pipelines())
def test_every_item_waits_for_its_inputs(case):
    """For any schedule, shape and positive costs: each stage runs its list in order, one
    item at a time, for the item's time; a forward starts after the previous chunk's
    forward ended and its activation travelled; a backward after the next chunk's
    backward and the gradient's trip (the last chunk's after its own forward); a weight
    pass after its input-gradient pass; and on every stage each micro-batch's forward
    precedes its backward."""
    costs, spec = case
    t = simulate_pipeline(costs, schedule=spec.schedule, pp=spec.pp, vp=spec.vp,
                          micro_batches=spec.micro_batches)
    send = np.broadcast_to(costs.send_s, (spec.pp,))
    eps = 1e-9

    def hop(a, b):
        if a == b:
            return 0.0
        return send[spec.pp - 1] if abs(a - b) > 1 else send[min(a, b)]

    fwd, bwd, wgt = {}, {}, {}
    for stage, rows in t.items.groupby("stage"):
        rows = rows.sort_values("order")
        assert list(rows.order) == list(range(len(rows)))
        assert np.all(rows.start_s.to_numpy()[1:] >= rows.end_s.to_numpy()[:-1] - eps)
        for r in rows.itertuples():
            work = Work(kind=r.kind, microbatch=r.microbatch, chunk=r.chunk,
                        bwd_microbatch=None if r.bwd_microbatch < 0 else r.bwd_microbatch,
                        bwd_chunk=None if r.bwd_chunk < 0 else r.bwd_chunk)
            assert r.end_s - r.start_s == pytest.approx(item_seconds(costs, stage, work))
            span = (r.start_s, r.end_s)
            me = (r.microbatch, stage, r.chunk)
            if r.kind in ("F", "FB"):
                fwd[me] = span
            if r.kind in ("B", "BW"):
                bwd[me] = span
            if r.kind in ("W", "BW"):
                wgt[me] = span
            if r.kind == "FB":
                bwd[r.bwd_microbatch, stage, r.bwd_chunk] = span
                wgt[r.bwd_microbatch, stage, r.bwd_chunk] = span

    for mb in range(spec.micro_batches):
        path = chunk_path(spec, mb)
        for k, (s, c) in enumerate(path):
            assert fwd[mb, s, c][1] <= bwd[mb, s, c][0] + eps
            assert bwd[mb, s, c][1] <= wgt[mb, s, c][1] + eps
            if wgt[mb, s, c] != bwd[mb, s, c]:
                assert wgt[mb, s, c][0] >= bwd[mb, s, c][1] - eps
            if k > 0:
                ps, pc = path[k - 1]
                assert fwd[mb, s, c][0] >= fwd[mb, ps, pc][1] + hop(ps, s) - eps
            if k + 1 < len(path):
                ns, nc = path[k + 1]
                assert bwd[mb, s, c][0] >= bwd[mb, ns, nc][1] + hop(ns, s) - eps
    assert t.step_s == t.items.end_s.max()
    assert 0 <= t.bubble_fraction < 1


# -- sends ------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2, 5])
def test_one_micro_batch_pays_each_hop_twice(p):
    """One micro-batch walks down the pipeline and back: the step is every stage's
    forward and backward plus 2 (p - 1) sends. ZB-H1 sends the gradient on after the
    input-gradient pass alone, so only stage 0's weight pass is on the path."""
    send, f, b, w = 0.25, 1.0, 2.0, 0.5
    costs = uniform(p, f=f, b=b, w=w, send=send)
    one_f_one_b = simulate_pipeline(costs, schedule="1f1b", pp=p, micro_batches=1)
    assert one_f_one_b.step_s == pytest.approx(p * (f + b + w) + 2 * (p - 1) * send)
    zb = simulate_pipeline(costs, schedule="zero-bubble", pp=p, micro_batches=1)
    assert zb.step_s == pytest.approx(p * (f + b) + w + 2 * (p - 1) * send)


def test_per_pair_send_times_add_up_along_the_path():
    send = np.array([0.1, 0.2, 0.4, 99.0])  # the last entry is the unused wrap-around
    t = simulate_pipeline(uniform(4, send=send), schedule="1f1b", pp=4, micro_batches=1)
    assert t.step_s == pytest.approx(4 * 3 + 2 * 0.7)


def test_two_sends_on_one_link_queue():
    """Stage 0's two forwards end at 1 and 2; each activation takes 3 s to send. The
    second send waits for the link until the first is through (at 4), so stage 1 gets
    micro-batch 1 at 7, not 5."""
    t = simulate_pipeline(uniform(2, f=1.0, b=0.0, w=0.0, send=3.0), schedule="1f1b", pp=2,
                          micro_batches=2)
    rows = t.items.set_index(["stage", "kind", "microbatch"])
    assert rows.loc[(1, "F", 0), "start_s"] == 4.0
    assert rows.loc[(1, "F", 1), "start_s"] == 7.0


# -- bookkeeping --------------------------------------------------------------------------


def test_same_inputs_give_the_same_timeline():
    costs = uniform(4, 2, f=1.0, b=1.5, w=0.5, f_comm=0.3, b_comm=0.6, send=0.1)
    a = simulate_pipeline(costs, schedule="dualpipe", pp=4, micro_batches=12)
    b = simulate_pipeline(costs, schedule="dualpipe", pp=4, micro_batches=12)
    assert a.items.equals(b.items)
    assert a.step_s == b.step_s


def test_timeline_table_lists_every_item_with_its_span():
    t = simulate_pipeline(uniform(2), schedule="1f1b", pp=2, micro_batches=2)
    assert list(t.items.columns) == ["stage", "order", "kind", "microbatch", "chunk",
                                     "bwd_microbatch", "bwd_chunk", "start_s", "end_s"]
    assert t.items[t.items.stage == 0][["kind", "microbatch", "start_s", "end_s"]].values.tolist() \
        == [["F", 0, 0.0, 1.0], ["F", 1, 1.0, 2.0], ["BW", 0, 4.0, 6.0], ["BW", 1, 7.0, 9.0]]
    assert t.busy_s.tolist() == [6.0, 6.0]
    assert t.end_s.tolist() == [9.0, 7.0]


@pytest.mark.parametrize("change,field", [
    (dict(forward_s=np.ones((4, 2))), "costs.forward_s"),
    (dict(backward_weight_s=-np.ones((4, 1))), "costs.backward_weight_s"),
    (dict(forward_s=np.full((4, 1), np.nan)), "costs.forward_s"),
    (dict(forward_comm_s=np.full((4, 1), 2.0)), "costs.forward_comm_s"),
    (dict(backward_comm_s=np.full((4, 1), 2.5)), "costs.backward_comm_s"),
    (dict(send_s=np.ones(3)), "costs.send_s"),
])
def test_costs_that_do_not_fit_are_a_value_error_naming_the_field(change, field):
    base = dict(forward_s=np.ones((4, 1)), backward_input_s=np.ones((4, 1)),
                backward_weight_s=np.ones((4, 1)), forward_comm_s=np.zeros((4, 1)),
                backward_comm_s=np.zeros((4, 1)), send_s=0.0)
    with pytest.raises(ValueError, match=rf"^{field}: "):
        simulate_pipeline(ChunkCosts(**(base | change)), schedule="1f1b", pp=4, micro_batches=4)


def test_a_schedule_the_shape_cannot_run_is_a_value_error_naming_the_field():
    with pytest.raises(ValueError, match=r"^micro_batches: .*multiples of pp=4"):
        simulate_pipeline(uniform(4, 2), schedule="interleaved", pp=4, vp=2, micro_batches=6)
    with pytest.raises(ValueError, match=r"^micro_batches: .*>= 2\*pp=8"):
        simulate_pipeline(uniform(4, 2), schedule="dualpipe", pp=4, micro_batches=6)


@pytest.mark.parametrize("f,b,w", [(1.0, 1.0, 0.5), (2.0, 2.0, 1.0), (3.0, 3.0, 3.0)])
@pytest.mark.parametrize("p,m", [(2, 2), (4, 9), (8, 16)])
def test_1f1b_and_zb_h1_formulas_beyond_equal_passes(f, b, w, p, m):
    """1F1B waits (p - 1)(F + B) for any costs; ZB-H1's (p - 1)(F + B - 2W) holds
    whenever the input-gradient pass is as long as the forward and W <= F (the ZB
    paper's handcrafted schedules assume T_F = T_B = T_W)."""
    costs = uniform(p, f=f, b=b, w=w)
    one_f_one_b = simulate_pipeline(costs, schedule="1f1b", pp=p, micro_batches=m)
    zb = simulate_pipeline(costs, schedule="zero-bubble", pp=p, micro_batches=m)
    assert one_f_one_b.idle_s == pytest.approx(np.full(p, (p - 1) * (f + b + w)))
    assert zb.idle_s == pytest.approx(np.full(p, (p - 1) * (f + (b + w) - 2 * w)))


def test_interleaved_bubble_with_unequal_passes():
    """A stage's whole forward and backward, t_f + t_b = v (f + b + w), over v."""
    p, v, m, f, b, w = 4, 3, 8, 0.5, 0.75, 0.25
    t = simulate_pipeline(uniform(p, v, f=f, b=b, w=w), schedule="interleaved", pp=p, vp=v,
                          micro_batches=m)
    t_f_plus_t_b = v * (f + b + w)
    assert t.idle_s == pytest.approx(np.full(p, (p - 1) * t_f_plus_t_b / v))
