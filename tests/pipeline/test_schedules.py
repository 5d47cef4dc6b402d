"""Stories about the pipeline schedules: what each stage runs, in what order.

Items print as kind + micro-batch (+ ``c`` + chunk where a stage holds several chunks):
``F3`` is the forward of micro-batch 3, ``BW0c1`` the full backward of micro-batch 0
through chunk 1, ``B``/``W`` the two halves of a split backward.
"""

from __future__ import annotations

from collections import Counter

import pytest

from moesim.pipeline import PipelineSpec, Work, build_schedule, chunk_path


def fmt(items: list[Work], chunks: bool = False) -> str:
    def one(w: Work) -> str:
        text = f"{w.kind}{w.microbatch}" + (f"c{w.chunk}" if chunks else "")
        if w.kind == "FB":
            text += f"/{w.bwd_microbatch}" + (f"c{w.bwd_chunk}" if chunks else "")
        return text
    return " ".join(one(w) for w in items)


def test_1f1b_warms_up_alternates_and_drains():
    """Megatron's 1F1B on 4 stages: stage s warms up with 3 - s forwards, then runs one
    forward and one full backward in turn, then drains the backwards it still owes."""
    stages = build_schedule(PipelineSpec(schedule="1f1b", pp=4, micro_batches=6))
    assert [fmt(s) for s in stages] == [
        "F0 F1 F2 F3 BW0 F4 BW1 F5 BW2 BW3 BW4 BW5",
        "F0 F1 F2 BW0 F3 BW1 F4 BW2 F5 BW3 BW4 BW5",
        "F0 F1 BW0 F2 BW1 F3 BW2 F4 BW3 F5 BW4 BW5",
        "F0 BW0 F1 BW1 F2 BW2 F3 BW3 F4 BW4 F5 BW5",
    ]


def test_1f1b_with_fewer_micro_batches_than_stages_is_all_warm_up():
    stages = build_schedule(PipelineSpec(schedule="1f1b", pp=4, micro_batches=2))
    assert fmt(stages[0]) == "F0 F1 BW0 BW1"
    assert fmt(stages[3]) == "F0 BW0 F1 BW1"


def test_interleaved_runs_rounds_of_pp_micro_batches_per_chunk():
    """Interleaved 1F1B, 2 stages x 2 chunks, 4 micro-batches. Micro-batches go in rounds
    of pp = 2: 0 and 1 through chunk 0, then through chunk 1, then 2 and 3. Stage 0 warms
    up with (2 - 0 - 1) * 2 + (2 - 1) * 2 = 4 forwards, stage 1 with 2 (Megatron-LM's
    count); backwards take the same rounds with the chunks reversed."""
    stages = build_schedule(PipelineSpec(schedule="interleaved", pp=2, vp=2, micro_batches=4))
    assert [fmt(s, chunks=True) for s in stages] == [
        "F0c0 F1c0 F0c1 F1c1 F2c0 BW0c1 F3c0 BW1c1 F2c1 BW0c0 F3c1 BW1c0 BW2c1 BW3c1 BW2c0 BW3c0",
        "F0c0 F1c0 F0c1 BW0c1 F1c1 BW1c1 F2c0 BW0c0 F3c0 BW1c0 F2c1 BW2c1 F3c1 BW3c1 BW2c0 BW3c0",
    ]


@pytest.mark.parametrize("pp,vp,m", [(4, 2, 8), (4, 3, 12), (8, 2, 16)])
def test_interleaved_warm_up_count_follows_megatron(pp, vp, m):
    stages = build_schedule(PipelineSpec(schedule="interleaved", pp=pp, vp=vp, micro_batches=m))
    for s, work in enumerate(stages):
        first_backward = next(i for i, w in enumerate(work) if w.kind == "BW")
        # Warm-up forwards, then the first steady forward, then the first backward.
        assert first_backward == (pp - s - 1) * 2 + (vp - 1) * pp + 1


def test_zero_bubble_h1_holds_back_weight_passes_keeping_pp_in_flight():
    """ZB-H1 keeps 1F1B's order of F and B; stage s holds back its first s weight passes,
    so every stage has at most pp micro-batches forwarded and not yet through W -- the
    same as 1F1B's first stage."""
    pp, m = 4, 6
    stages = build_schedule(PipelineSpec(schedule="zero-bubble", pp=pp, micro_batches=m))
    assert fmt(stages[0]) == "F0 F1 F2 F3 B0 W0 F4 B1 W1 F5 B2 W2 B3 W3 B4 W4 B5 W5"
    assert fmt(stages[3]) == "F0 B0 F1 B1 F2 B2 F3 B3 W0 F4 B4 W1 F5 B5 W2 W3 W4 W5"
    for work in stages:
        in_flight, peak = 0, 0
        for w in work:
            in_flight += {"F": 1, "W": -1}.get(w.kind, 0)
            peak = max(peak, in_flight)
        assert peak == pp
        # Same F/B order as 1F1B: drop the Ws and rename B to BW.
        without_w = [Work(kind="BW" if w.kind == "B" else w.kind, microbatch=w.microbatch,
                          chunk=w.chunk) for w in work if w.kind != "W"]
        one_f_one_b = build_schedule(PipelineSpec(schedule="1f1b", pp=pp, micro_batches=m))
        assert without_w == one_f_one_b[stages.index(work)]


def test_dualpipe_feeds_half_the_micro_batches_from_each_end():
    spec = PipelineSpec(schedule="dualpipe", pp=4, micro_batches=8)
    assert chunk_path(spec, 0) == [(0, 0), (1, 0), (2, 0), (3, 0)]
    assert chunk_path(spec, 4) == [(3, 1), (2, 1), (1, 1), (0, 1)]


def test_dualpipe_stage_0_follows_the_eight_steps():
    """DualPipe, 8 stages, 20 micro-batches (the README figure's case): 0..9 enter at
    stage 0, 10..19 at stage 7. Stage 0 (h = 0) runs step 1 (6 near forwards), step 2
    (near, far), step 3 (3 x far B, its W, far F), step 4 (3 x two overlapped F&B
    pairs), step 5 (3 x far backward, F&B pair), step 6 (far backward, near B with W
    deferred), step 7 (3 x deferred W, near B) and step 8 (the last W)."""
    stages = build_schedule(PipelineSpec(schedule="dualpipe", pp=8, micro_batches=20))
    assert fmt(stages[0]) == " ".join([
        "F0 F1 F2 F3 F4 F5",
        "F6 F10",
        "B10 W10 F11 B11 W11 F12 B12 W12 F13",
        "FB7/13 FB14/0 FB8/14 FB15/1 FB9/15 FB16/2",
        "BW16 FB17/3 BW17 FB18/4 BW18 FB19/5",
        "BW19 B6",
        "W6 B7 W7 B8 W8 B9",
        "W9",
    ])
    # A middle stage (h = 3) runs its first steady pair apart: F(near) then BW(far).
    assert fmt(stages[3][8:11]) == "F4 BW10 FB14/0"


@pytest.mark.parametrize("schedule,pp,vp,m", [
    ("1f1b", 4, 1, 7), ("zero-bubble", 5, 1, 9), ("interleaved", 3, 3, 6),
    ("dualpipe", 6, 1, 14), ("dualpipe", 2, 1, 4),
])
def test_every_stage_runs_each_pass_of_each_chunk_it_holds_exactly_once(schedule, pp, vp, m):
    spec = PipelineSpec(schedule=schedule, pp=pp, vp=vp, micro_batches=m)
    stages = build_schedule(spec)
    expected = Counter((s, c, mb) for mb in range(m) for s, c in chunk_path(spec, mb))
    forward, dgrad, wgrad = Counter(), Counter(), Counter()
    for s, work in enumerate(stages):
        for w in work:
            me = (s, w.chunk, w.microbatch)
            if w.kind in ("F", "FB"):
                forward[me] += 1
            if w.kind in ("B", "BW"):
                dgrad[me] += 1
            if w.kind in ("W", "BW"):
                wgrad[me] += 1
            if w.kind == "FB":
                other = (s, w.bwd_chunk, w.bwd_microbatch)
                dgrad[other] += 1
                wgrad[other] += 1
    assert forward == dgrad == wgrad == expected


@pytest.mark.parametrize("kwargs,field", [
    (dict(schedule="gpipe", pp=4, micro_batches=8), "schedule"),
    (dict(schedule="1f1b", pp=0, micro_batches=8), "pp"),
    (dict(schedule="1f1b", pp=4, micro_batches=0), "micro_batches"),
    (dict(schedule="1f1b", pp=4, vp=2, micro_batches=8), "vp"),
    (dict(schedule="zero-bubble", pp=4, vp=2, micro_batches=8), "vp"),
    (dict(schedule="interleaved", pp=4, vp=1, micro_batches=8), "vp"),
    (dict(schedule="interleaved", pp=4, vp=2, micro_batches=6), "micro_batches"),
    (dict(schedule="dualpipe", pp=4, vp=2, micro_batches=8), "vp"),
    (dict(schedule="dualpipe", pp=3, micro_batches=8), "pp"),
    (dict(schedule="dualpipe", pp=4, micro_batches=6), "micro_batches"),
    (dict(schedule="dualpipe", pp=4, micro_batches=9), "micro_batches"),
])
def test_a_shape_the_schedule_cannot_run_is_a_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        PipelineSpec(**kwargs)
