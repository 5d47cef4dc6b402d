"""The same schedule as the SimPy engine, computed op by op for all GPUs at once.

Nothing in a step's program queues for a shared resource beyond what the SimPy engine
models: each stream runs its ops in program order, an op waits for its dependencies,
and a collective starts when the last member of its EP group arrives. Every op's times
therefore follow from earlier ops alone, in program order:

    arrive = max(end of the previous op on the same stream, end of every dependency)
    start  = arrive                       (compute)
           = max of arrive over the group (collective)
    end    = start + duration

which numpy evaluates for every GPU in one step per op. :func:`run_program` gives the
timeline the SimPy engine gives (tests compare them op by op); sweeps and plans use it
by default because it runs in milliseconds where SimPy handles one event per op and GPU.
"""

from __future__ import annotations

import numpy as np

from moesim.engine.program import COMM, Op
from moesim.engine.simpy_engine import Timeline


def run_program(ops: list[Op], duration_og: np.ndarray, *, ep: int) -> Timeline:
    """The timeline of ``ops`` on ``duration_og.shape[1]`` GPUs in EP groups of ``ep``
    (arguments as :func:`moesim.engine.simpy_engine.run_program`)."""
    n_ops, n_gpus = duration_og.shape
    assert n_ops == len(ops) and n_gpus % ep == 0
    arrive = np.empty((n_ops, n_gpus))
    start = np.empty((n_ops, n_gpus))
    end = np.empty((n_ops, n_gpus))
    free_g: dict[str, np.ndarray] = {}
    zero = np.zeros(n_gpus)
    for op in ops:
        assert all(dep < op.index for dep in op.deps), "deps must come earlier"
        t = free_g.get(op.stream, zero)
        for dep in op.deps:
            t = np.maximum(t, end[dep])
        arrive[op.index] = t
        if op.stream == COMM:
            t = np.repeat(t.reshape(-1, ep).max(axis=1), ep)
        start[op.index] = t
        end[op.index] = t + duration_og[op.index]
        free_g[op.stream] = end[op.index]
    return Timeline(arrive_og=arrive, start_og=start, end_og=end)
