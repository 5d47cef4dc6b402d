"""Pipeline-parallel training schedules: what each pipeline stage runs, in what order.

A schedule is a pure function of the pipeline's shape (``pp`` stages, ``vp`` virtual
stages per stage for interleaving, ``m`` micro-batches): for every stage, the ordered list of
:class:`Work` items that stage executes in one training step. Nothing here knows
about time; :mod:`moesim.pipeline.simulate` runs the lists.

Work kinds:

* ``F``  -- forward of one micro-batch through one model chunk.
* ``B``  -- the input-gradient (dgrad) half of its backward; the gradient leaves for
  the previous chunk when ``B`` ends.
* ``W``  -- the weight-gradient (wgrad) half; needs only its own ``B``.
* ``BW`` -- a full backward (``B`` then ``W`` in one go, the gradient leaves when both
  are done). 1F1B and interleaved 1F1B never split the backward, so they emit ``BW``:
  emitting ``B`` then ``W`` would send the gradient a ``W`` early and understate their
  bubble.
* ``FB`` -- DualPipe's overlapped pair: the forward of ``(microbatch, chunk)`` runs
  alongside the full backward of ``(bwd_microbatch, bwd_chunk)``, each hiding its
  communication behind the other's compute.

Every micro-batch passes through a fixed path of (stage, chunk) *positions*
(:func:`chunk_path`): forward from position 0 to the last, backward the other way.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from numbers import Integral
from typing import Literal, get_args

from moesim.config.training import Schedule
from moesim.config.training_layout import check_schedule
from moesim.errors import InputError

SCHEDULES: tuple[str, ...] = get_args(Schedule)
WorkKind = Literal["F", "B", "W", "BW", "FB"]


@dataclass(frozen=True, kw_only=True)
class Work:
    """One item of a stage's work list.

    For ``FB`` ``microbatch``/``chunk`` name the forward half and ``bwd_microbatch``/
    ``bwd_chunk`` the backward half; for every other kind the ``bwd_*`` fields are None.
    """

    kind: WorkKind
    microbatch: int
    chunk: int
    bwd_microbatch: int | None = None
    bwd_chunk: int | None = None


@dataclass(frozen=True, kw_only=True)
class PipelineSpec:
    """The pipeline's shape; raises :class:`moesim.errors.InputError` (a ValueError)
    naming the offending field when the schedule cannot run it."""

    schedule: Schedule
    pp: int  # pipeline stages (GPUs in the pipeline)
    vp: int = 1  # virtual stages per stage: >= 2 for interleaved, else 1
    micro_batches: int  # per training step, both directions together for DualPipe

    @property
    def chunks(self) -> int:
        """Model chunks each stage holds: ``vp``, except DualPipe's two (one per
        direction)."""
        return 2 if self.schedule == "dualpipe" else self.vp

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise InputError(f"unknown schedule {self.schedule!r}", field="schedule",
                             allowed=", ".join(SCHEDULES))
        for name in ("pp", "vp", "micro_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
                raise InputError(f"must be a positive integer, got {value!r}", field=name)
        check_schedule(self.schedule, pp=self.pp, vp=self.vp,
                       micro_batches=self.micro_batches)


def chunk_path(spec: PipelineSpec, microbatch: int) -> list[tuple[int, int]]:
    """The (stage, chunk) positions ``microbatch``'s forward visits, in order.

    * 1f1b, zero-bubble: stage 0, 1, ..., pp-1 (chunk 0).
    * interleaved: position ``c * pp + s`` is chunk c on stage s (Megatron's virtual
      pipeline): chunk 0 on every stage, then chunk 1 on every stage, ...; the hop
      from stage pp-1 back to stage 0 wraps around.
    * dualpipe: the first half of the micro-batches enter at stage 0 and run chunk 0 on
      stages 0..pp-1; the second half enter at stage pp-1 and run chunk 1 on stages
      pp-1..0. Chunk 0 on stage s holds model stage s, chunk 1 model stage pp-1-s.
    """
    pp = spec.pp
    if spec.schedule == "dualpipe":
        if microbatch < spec.micro_batches // 2:
            return [(s, 0) for s in range(pp)]
        return [(s, 1) for s in reversed(range(pp))]
    return [(s, c) for c in range(spec.chunks) for s in range(pp)]


def build_schedule(spec: PipelineSpec) -> list[list[Work]]:
    """Each stage's work list, indexed by stage."""
    builder = {
        "1f1b": _one_f_one_b,
        "zero-bubble": _zero_bubble_h1,
        "interleaved": _interleaved,
        "dualpipe": _dualpipe,
    }[spec.schedule]
    return [builder(spec, stage) for stage in range(spec.pp)]


def _one_f_one_b(spec: PipelineSpec, stage: int) -> list[Work]:
    """Megatron-LM's 1F1B (PipeDream-Flush): warm up with ``pp - stage - 1`` forwards,
    then alternate one forward and one backward, then drain the remaining backwards."""
    m = spec.micro_batches
    warmup = min(spec.pp - stage - 1, m)
    work = [Work(kind="F", microbatch=i, chunk=0) for i in range(warmup)]
    for i in range(m - warmup):
        work.append(Work(kind="F", microbatch=warmup + i, chunk=0))
        work.append(Work(kind="BW", microbatch=i, chunk=0))
    for i in range(m - warmup, m):
        work.append(Work(kind="BW", microbatch=i, chunk=0))
    return work


def _zero_bubble_h1(spec: PipelineSpec, stage: int) -> list[Work]:
    """ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", arXiv 2401.10241,
    sec. 2.1): 1F1B's order of forwards and input-gradient passes ``B``, with the weight
    passes ``W`` held back.

    Stage s holds back its first s ``W``s: s = 0 runs each ``W`` right after its ``B``,
    the last stage runs each ``W`` pp-1 micro-batches late. A stage therefore keeps
    ``warm-up + 1 + s = pp`` micro-batches in flight (forwarded but not yet
    weight-differentiated), the same on every stage and no more than 1F1B's first
    stage. Because ``B`` alone travels back, the gradient reaches earlier stages sooner;
    the held-back ``W``s fill the cool-down, where 1F1B waits for gradients.
    """
    m = spec.micro_batches
    warmup = min(spec.pp - stage - 1, m)
    held_back = stage
    pending: deque[int] = deque()  # micro-batches whose B ran and W did not
    work = [Work(kind="F", microbatch=i, chunk=0) for i in range(warmup)]

    def b(i: int) -> None:
        work.append(Work(kind="B", microbatch=i, chunk=0))
        pending.append(i)

    def w() -> None:
        work.append(Work(kind="W", microbatch=pending.popleft(), chunk=0))

    for i in range(m - warmup):
        work.append(Work(kind="F", microbatch=warmup + i, chunk=0))
        b(i)
        if len(pending) > held_back:
            w()
    # Cool-down: a held-back W after each B fills the wait for the next gradient.
    for i in range(m - warmup, m):
        b(i)
        w()
    work.extend(Work(kind="W", microbatch=i, chunk=0) for i in pending)
    return work


def _interleaved(spec: PipelineSpec, stage: int) -> list[Work]:
    """Megatron-LM's interleaved 1F1B (Narayanan et al. 2021, arXiv 2104.04473, sec.
    2.2; ``forward_backward_pipelining_with_interleaving``).

    The stage runs ``m * vp`` forwards and as many backwards, numbered k = 0, 1, ...
    Forward k handles chunk ``(k // pp) % vp`` of micro-batch ``(k // (pp * vp)) * pp
    + k % pp``: pp micro-batches go through chunk 0, the same pp through chunk 1, ...,
    then the next pp. Backwards take the same order with the chunks reversed (the last
    chunk's gradient is ready first). Warm-up runs ``(pp - stage - 1) * 2 + (vp - 1) *
    pp`` forwards (all of them if m == pp), then one forward and one backward
    alternate, then the remaining backwards drain.
    """
    pp, vp, m = spec.pp, spec.vp, spec.micro_batches
    total = m * vp

    def item(kind: str, k: int) -> Work:
        chunk = (k // pp) % vp
        if kind == "BW":
            chunk = vp - 1 - chunk
        return Work(kind=kind, microbatch=(k // (pp * vp)) * pp + k % pp, chunk=chunk)

    warmup = total if m == pp else min((pp - stage - 1) * 2 + (vp - 1) * pp, total)
    work = [item("F", k) for k in range(warmup)]
    for k in range(total - warmup):
        work.append(item("F", warmup + k))
        work.append(item("BW", k))
    work.extend(item("BW", k) for k in range(total - warmup, total))
    return work


def _dualpipe(spec: PipelineSpec, stage: int) -> list[Work]:
    """DualPipe (DeepSeek-V3 report, arXiv 2412.19437, sec. 3.2.1; the 8 steps of
    ``DualPipe.step`` in github.com/deepseek-ai/DualPipe).

    Micro-batches enter from both ends, half each (see :func:`chunk_path`). For a stage
    the *near* direction is the one that enters at its end of the pipeline (chunk 0
    for the first half of the stages, chunk 1 for the second half) and the *far*
    direction the other; ``h`` is the stage's distance from its end. Each direction's
    micro-batches run in order. A ``B`` marked "split" defers its ``W`` to a FIFO that
    later ``W`` items pop (DualPipe's WeightGradStore); other backwards are full.
    """
    pp, m = spec.pp, spec.micro_batches
    half, n = pp // 2, m // 2
    h = min(stage, pp - 1 - stage)
    near = 0 if stage < half else 1
    far = 1 - near
    middle = h == half - 1  # the two stages where the directions cross
    next_f = [0, 0]  # per direction: next micro-batch to forward / backward
    next_b = [0, 0]
    deferred_w: deque[tuple[int, int]] = deque()
    work: list[Work] = []

    def take(counter: list[int], chunk: int) -> int:
        i = counter[chunk]
        counter[chunk] += 1
        return chunk * n + i  # direction d's micro-batches are d*n .. d*n + n - 1

    def f(chunk: int) -> None:
        work.append(Work(kind="F", microbatch=take(next_f, chunk), chunk=chunk))

    def b(chunk: int, split: bool = False) -> None:
        mb = take(next_b, chunk)
        if split:
            work.append(Work(kind="B", microbatch=mb, chunk=chunk))
            deferred_w.append((mb, chunk))
        else:
            work.append(Work(kind="BW", microbatch=mb, chunk=chunk))

    def w() -> None:
        mb, chunk = deferred_w.popleft()
        work.append(Work(kind="W", microbatch=mb, chunk=chunk))

    def fb(f_chunk: int, b_chunk: int) -> None:
        work.append(Work(kind="FB", microbatch=take(next_f, f_chunk), chunk=f_chunk,
                         bwd_microbatch=take(next_b, b_chunk), bwd_chunk=b_chunk))

    # 1: forwards of the near direction fill the pipeline from this end.
    for _ in range(2 * (half - h - 1)):
        f(near)
    # 2: near and far forwards alternate.
    for _ in range(h + 1):
        f(near)
        f(far)
    # 3: the first far backwards, weight pass right after (the gradient leaves first).
    for _ in range(half - h - 1):
        b(far, split=True)
        w()
        f(far)
    # 4: steady phase, forwards overlapped with backwards of the other direction. The
    # middle stages run their first pair apart: the forward need not wait for the
    # backward's gradient (DualPipe: "we don't overlap these two chunks to further
    # reduce bubble size").
    for i in range(n - pp + h + 1):
        if i == 0 and middle:
            f(near)
            b(far)
        else:
            fb(near, far)
        fb(far, near)
    # 5: the near direction has no forwards left.
    for _ in range(half - h - 1):
        b(far)
        fb(far, near)
    # 6: backwards of both directions; from the middle of the loop on, weight passes
    # are deferred to fill the bubbles of steps 7 and 8.
    split = False
    for i in range(h + 1):
        if i == (h + 1) // 2 and h % 2 == 1:
            split = True
        b(far, split)
        if i == (h + 1) // 2 and h % 2 == 0:
            split = True
        b(near, split)
    # 7: a deferred weight pass before each remaining near backward.
    for _ in range(half - h - 1):
        w()
        b(near, split=True)
    # 8: the remaining weight passes.
    while deferred_w:
        w()
    return work
