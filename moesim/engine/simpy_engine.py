"""The discrete-event engine: SimPy processes run every GPU's two streams.

One process per (GPU, stream) walks that stream's ops in program order. Before an
op it waits for its dependencies on the same GPU. A compute op then holds the stream
for its duration. A communication op is a collective of the GPU's EP group: the GPU
arrives, waits until every member has arrived, and the exchange then takes its
duration for all of them; the wait shows how much a slow GPU delays its peers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import simpy

from moesim.engine.program import COMM, Op


@dataclass(frozen=True, kw_only=True)
class Timeline:
    """Per op and GPU: when the GPU reached the op, and when the op ran."""

    arrive_og: np.ndarray  # [ops, gpus] seconds
    start_og: np.ndarray
    end_og: np.ndarray


class _Collective:
    """One exchange of one EP group: starts when its last member arrives."""

    __slots__ = ("waiting", "finished", "start")

    def __init__(self, env: simpy.Environment, members: int) -> None:
        self.waiting = members
        self.finished = env.event()
        self.start = 0.0


def run_program(
    ops: list[Op], duration_og: np.ndarray, *, ep: int
) -> Timeline:
    """Simulate the program on ``duration_og.shape[1]`` GPUs in EP groups of ``ep``.

    ``duration_og`` [ops, gpus] gives each op's duration on each GPU; collectives must
    have the same duration on every member of a group.
    """
    n_ops, n_gpus = duration_og.shape
    assert n_ops == len(ops) and n_gpus % ep == 0
    env = simpy.Environment()
    arrive = np.zeros((n_ops, n_gpus))
    start = np.zeros((n_ops, n_gpus))
    end = np.zeros((n_ops, n_gpus))
    finished = np.zeros((n_ops, n_gpus), dtype=bool)
    # A completion event exists only while another stream is blocked on that op.
    blocked: dict[tuple[int, int], simpy.Event] = {}
    collectives: dict[tuple[int, int], _Collective] = {}
    by_stream: dict[str, list[Op]] = {}
    for op in ops:
        by_stream.setdefault(op.stream, []).append(op)

    def stream(gpu: int, program: list[Op]):
        for op in program:
            for dep in op.deps:
                if not finished[dep, gpu]:
                    event = blocked.get((dep, gpu))
                    if event is None:
                        event = blocked[dep, gpu] = env.event()
                    yield event
            arrive[op.index, gpu] = env.now
            duration = duration_og[op.index, gpu]
            if op.stream == COMM:
                key = (op.index, gpu // ep)
                coll = collectives.get(key)
                if coll is None:
                    coll = collectives[key] = _Collective(env, ep)
                coll.waiting -= 1
                if coll.waiting == 0:
                    coll.start = env.now
                    yield env.timeout(duration)
                    coll.finished.succeed()
                    del collectives[key]
                else:
                    yield coll.finished
                start[op.index, gpu] = coll.start
            else:
                start[op.index, gpu] = env.now
                yield env.timeout(duration)
            end[op.index, gpu] = env.now
            finished[op.index, gpu] = True
            event = blocked.pop((op.index, gpu), None)
            if event is not None:
                event.succeed()

    for gpu in range(n_gpus):
        for program in by_stream.values():
            env.process(stream(gpu, program))
    env.run()
    assert not collectives, "a collective never completed: the program deadlocked"
    return Timeline(arrive_og=arrive, start_og=start, end_og=end)
