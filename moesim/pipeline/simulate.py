"""Discrete-event simulation of one pipeline-parallel training step.

One SimPy process per stage walks that stage's work list (:func:`build_schedule`) in
order. Before an item it waits for its inputs:

* ``F`` at position k of a micro-batch's path waits for the activation of position
  k-1 (none for k = 0);
* ``B``/``BW`` at position k waits for the gradient of position k+1 (for the last
  position, for its own ``F``: the loss is computed there);
* ``W`` waits for its ``B``;
* ``FB`` waits for the inputs of both halves.

An item then holds its stage for its duration (:func:`item_seconds`). When it ends,
its output goes to the stage of the neighbouring position: at once when that is the
same stage, else as a send of ``send_s`` over the sender's link towards the receiver.
Each stage has one link per direction (towards stage s+1 and towards stage s-1), a
SimPy resource: sends overlap compute, as Megatron's batched isend/irecv do, but two
sends on the same link queue.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
import simpy

from moesim.errors import InputError
from moesim.pipeline.schedules import (
    PipelineSpec,
    Schedule,
    Work,
    build_schedule,
    chunk_path,
)


@dataclass(frozen=True, kw_only=True)
class ChunkCosts:
    """Seconds of one micro-batch through one model chunk, per (stage, chunk).

    Arrays are ``[pp, chunks]``: ``chunks`` is ``vp`` (1 except for interleaved), or 2
    for DualPipe, whose chunk 0 on stage s is model stage s (micro-batches entering at
    stage 0) and chunk 1 model stage pp-1-s (those entering at stage pp-1).

    Array-likes are stored as float arrays. ``forward_comm_s``/``backward_comm_s`` matter
    only inside ``FB`` items; everywhere else communication is simply part of the
    chunk's time, exposed.
    """

    forward_s: np.ndarray  # [pp, chunks] forward
    backward_input_s: np.ndarray  # [pp, chunks] input-gradient (dgrad) part, incl. recompute
    backward_weight_s: np.ndarray  # [pp, chunks] weight-gradient (wgrad) part
    forward_comm_s: np.ndarray  # [pp, chunks] of forward_s, the communication (EP all-to-all)
    backward_comm_s: np.ndarray  # [pp, chunks] of the full backward, the communication
    # Seconds to send one micro-batch's activation (or its gradient) between stages s and
    # s+1: a scalar, or [pp] with entry s for the pair (s, s+1); entry pp-1 is the
    # wrap-around pair (pp-1, 0) that only the interleaved schedule uses.
    send_s: float | np.ndarray = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = np.asarray(getattr(self, f.name), dtype=float)
            if not np.all(np.isfinite(value)) or np.any(value < 0):
                raise InputError("must be finite and non-negative", field=f"costs.{f.name}")
            object.__setattr__(self, f.name, value)
        for part, wholes in (("forward_comm_s", (self.forward_s,)),
                             ("backward_comm_s", (self.backward_input_s, self.backward_weight_s))):
            comm = getattr(self, part)
            # (Shapes are checked against the pipeline by check_shape.)
            if all(w.shape == comm.shape for w in wholes) and np.any(
                    comm > sum(wholes) * (1 + 1e-9)):
                raise InputError("the communication part exceeds the whole chunk",
                                 field=f"costs.{part}")

    def check_shape(self, pp: int, chunks: int) -> None:
        """Raise InputError unless the arrays fit ``pp`` stages of ``chunks`` chunks."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "send_s":
                if value.shape not in ((), (pp,)):
                    raise InputError(f"shape {value.shape} does not fit pp={pp}",
                                     field="costs.send_s", allowed=f"a scalar or ({pp},)")
            elif value.shape != (pp, chunks):
                raise InputError(f"shape {value.shape} does not fit {pp} stages of {chunks} "
                                 "chunks", field=f"costs.{f.name}", allowed=f"({pp}, {chunks})")


def item_seconds(costs: ChunkCosts, stage: int, item: Work) -> float:
    """How long ``item`` holds ``stage``.

    ``FB`` overlaps the forward of one chunk with the full backward of another, as
    DualPipe's overlapped_forward_backward does: the compute of each half runs while
    the other half's communication is in flight, so the pair takes the longer of the
    two streams, ``max(F_compute + B_compute, F_comm + B_comm)``. This is the ideal
    overlap; it ignores that a chunk's own compute and communication depend on each
    other, and that communication kernels take SMs from compute.
    """
    s, c = stage, item.chunk
    if item.kind == "F":
        return float(costs.forward_s[s, c])
    if item.kind == "B":
        return float(costs.backward_input_s[s, c])
    if item.kind == "W":
        return float(costs.backward_weight_s[s, c])
    if item.kind == "BW":
        return float(costs.backward_input_s[s, c] + costs.backward_weight_s[s, c])
    b = item.bwd_chunk
    f_comm, b_comm = costs.forward_comm_s[s, c], costs.backward_comm_s[s, b]
    f_compute = costs.forward_s[s, c] - f_comm
    b_compute = costs.backward_input_s[s, b] + costs.backward_weight_s[s, b] - b_comm
    return float(max(f_compute + b_compute, f_comm + b_comm))


@dataclass(frozen=True, kw_only=True)
class PipelineTimeline:
    """The simulated step.

    ``items`` has one row per work item: ``stage``, ``order`` (its index in the
    stage's list), ``kind``, ``microbatch``, ``chunk`` (the forward half for ``FB``),
    ``bwd_microbatch``, ``bwd_chunk`` (``FB`` only, else -1), ``start_s``, ``end_s``.
    """

    spec: PipelineSpec
    items: pd.DataFrame
    busy_s: np.ndarray  # [pp] seconds each stage spends running items
    end_s: np.ndarray  # [pp] when each stage finishes its last item
    step_s: float  # when the last stage finishes

    @property
    def idle_s(self) -> np.ndarray:
        """[pp] each stage's bubble: the step's seconds it spends waiting."""
        return self.step_s - self.busy_s

    @property
    def bubble_fraction(self) -> float:
        """Share of the pipeline's GPU-seconds spent waiting: 1 - busy / (pp * step)."""
        return 1.0 - float(self.busy_s.sum()) / (self.spec.pp * self.step_s)


def simulate_pipeline(
    costs: ChunkCosts, *, schedule: Schedule, pp: int, vp: int = 1, micro_batches: int
) -> PipelineTimeline:
    """Simulate one training step of ``micro_batches`` through ``pp`` stages.

    Raises :class:`moesim.errors.InputError` (a ValueError) naming the field when the
    schedule cannot run this shape or the costs do not fit it.
    """
    spec = PipelineSpec(schedule=schedule, pp=pp, vp=vp, micro_batches=micro_batches)
    costs.check_shape(pp, spec.chunks)
    work = build_schedule(spec)
    m = micro_batches
    paths = [chunk_path(spec, mb) for mb in range(m)]
    position = {(mb, s, c): k for mb, path in enumerate(paths) for k, (s, c) in enumerate(path)}
    send_s = np.broadcast_to(costs.send_s, (pp,))

    env = simpy.Environment()
    # Per micro-batch and path position: the input activation has arrived, the output
    # gradient has arrived, the input-gradient pass (B) is done.
    activation = [[env.event() for _ in path] for path in paths]
    gradient = [[env.event() for _ in path] for path in paths]
    b_done = [[env.event() for _ in path] for path in paths]
    for mb in range(m):
        activation[mb][0].succeed()
    links = {(s, d): simpy.Resource(env, capacity=1) for s in range(pp) for d in (1, -1)}

    def deliver(src: int, dst: int, arrived: simpy.Event) -> None:
        if src == dst:
            arrived.succeed()  # the next chunk is on the same stage: nothing to send
        else:
            env.process(send(src, dst, arrived))

    def send(src: int, dst: int, arrived: simpy.Event):
        # Neighbours use the pair's own entry; only interleaved wraps from pp-1 to 0.
        wrap = abs(src - dst) > 1
        pair = pp - 1 if wrap else min(src, dst)
        direction = (1 if src > dst else -1) if wrap else (1 if dst > src else -1)
        with links[src, direction].request() as turn:
            yield turn
            yield env.timeout(send_s[pair])
        arrived.succeed()

    def forward_done(mb: int, k: int):
        path = paths[mb]
        if k + 1 == len(path):
            gradient[mb][k].succeed()  # the loss, on the same stage
        else:
            deliver(path[k][0], path[k + 1][0], activation[mb][k + 1])

    def backward_done(mb: int, k: int):
        b_done[mb][k].succeed()
        if k > 0:
            path = paths[mb]
            deliver(path[k][0], path[k - 1][0], gradient[mb][k - 1])

    rows: list[tuple] = []

    def stage_process(s: int):
        for order, item in enumerate(work[s]):
            k = position[item.microbatch, s, item.chunk]
            if item.kind == "F":
                needs = [activation[item.microbatch][k]]
            elif item.kind in ("B", "BW"):
                needs = [gradient[item.microbatch][k]]
            elif item.kind == "W":
                needs = [b_done[item.microbatch][k]]
            else:
                kb = position[item.bwd_microbatch, s, item.bwd_chunk]
                needs = [activation[item.microbatch][k], gradient[item.bwd_microbatch][kb]]
            yield from needs
            start = env.now
            yield env.timeout(item_seconds(costs, s, item))
            rows.append((s, order, item.kind, item.microbatch, item.chunk,
                         -1 if item.bwd_microbatch is None else item.bwd_microbatch,
                         -1 if item.bwd_chunk is None else item.bwd_chunk, start, env.now))
            if item.kind in ("F", "FB"):
                forward_done(item.microbatch, k)
            if item.kind in ("B", "BW"):
                backward_done(item.microbatch, k)
            if item.kind == "FB":
                backward_done(item.bwd_microbatch, kb)

    for s in range(pp):
        env.process(stage_process(s))
    env.run()
    if len(rows) != sum(len(w) for w in work):
        raise RuntimeError(f"the {schedule} schedule deadlocked: {len(rows)} of "
                           f"{sum(len(w) for w in work)} work items ran")

    items = pd.DataFrame(rows, columns=["stage", "order", "kind", "microbatch", "chunk",
                                        "bwd_microbatch", "bwd_chunk", "start_s", "end_s"])
    items = items.sort_values(["stage", "order"], ignore_index=True)
    duration = (items.end_s - items.start_s).to_numpy()
    busy = np.bincount(items.stage, weights=duration, minlength=pp)
    end = items.groupby("stage").end_s.max().reindex(range(pp), fill_value=0.0).to_numpy()
    return PipelineTimeline(spec=spec, items=items, busy_s=busy, end_s=end,
                            step_s=float(end.max()))
