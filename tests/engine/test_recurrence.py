"""The fast engine computes the very timeline the SimPy engine simulates."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.config.loading import load_scenario
from moesim.engine import recurrence, simpy_engine
from moesim.engine.program import COMM, build_program
from moesim.simulation import simulate


def test_a_collective_starts_when_its_last_member_arrives():
    ops = build_program(num_layers=2, first_dense_layers=0, micro_batches=1, train=False)
    rng = np.random.default_rng(0)
    duration = rng.uniform(1, 2, size=(len(ops), 4))
    for op in ops:  # a collective lasts the same on every member of its group
        if op.stream == COMM:
            duration[op.index] = np.repeat(duration[op.index, ::2], 2)
    fast = recurrence.run_program(ops, duration, ep=2)
    events = simpy_engine.run_program(ops, duration, ep=2)
    for got, want in ((fast.arrive_og, events.arrive_og), (fast.start_og, events.start_og),
                      (fast.end_og, events.end_og)):
        np.testing.assert_array_equal(got, want)
    dispatch = next(op for op in ops if op.phase == "dispatch")
    start = fast.start_og[dispatch.index]
    assert start[0] == start[1] == fast.arrive_og[dispatch.index, :2].max()


@pytest.mark.parametrize("overrides", [
    [],
    ["parallel.micro_batches=1"],
    ["parallel.gpus=128", "routing.assignment=zipf"],
    ["mode=inference", "network=flow"],
    ["routing.capacity_factor=1.0", "parallel.tokens_per_gpu=128"],
    ["mode=decode", "parallel.tokens_per_gpu=null", "serving={batch: 32, isl: 512, osl: 64}",
     "parallel.moe_tp=2", "parallel.ep=32", "parallel.gpus=64"],
])
def test_both_engines_give_the_same_step(overrides):
    base = ["model.num_layers=5", "parallel.tokens_per_gpu=256", "routing.layer_samples=2"]
    events = simulate(load_scenario(None, overrides=[*base, *overrides]))
    fast = simulate(load_scenario(None, overrides=[*base, *overrides, "engine=fast"]))
    assert fast.summary == events.summary
    np.testing.assert_array_equal(fast.spans["end_s"], events.spans["end_s"])
