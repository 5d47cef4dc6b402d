"""A lower bound on a scenario's step time, from its costs alone (no routing, no engine).

Every GPU runs its compute-stream ops one after another, so the step lasts at least as
long as the mean GPU's compute stream. The routing-independent ops (attention, shared
experts, dense FFN, LM head, with their tensor-parallel all-reduces) cost exactly what
the simulation charges them. Expert GEMMs are bounded by their FLOPs alone at the GPU's
best GEMM efficiency, which no grouped GEMM beats; without a capacity factor every
assignment is computed, so the mean GPU computes ``tokens x top_k`` rows per MoE layer.
With a capacity factor (drops may remove most of them) or a replayed trace (whose
choices may differ from the model's top-k) the experts add nothing to the bound.
Communication adds nothing either: it may hide behind compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.config.scenario import Scenario


@dataclass(frozen=True, kw_only=True)
class StepBound:
    """What is known of a step before simulating it: at least ``step_s`` seconds for
    ``tokens`` tokens (so at most ``tokens / step_s`` tokens/s), on ``nodes`` nodes."""

    step_s: float
    tokens: int
    nodes: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_s if self.step_s > 0 else float("inf")


def expert_rows_per_gpu(scenario: Scenario, routed: Scenario) -> float:
    """Assignments the mean GPU surely computes per MoE layer and micro-batch (0 when
    drops or a trace make that unknown)."""
    r = scenario.routing
    if r.capacity_factor is not None or scenario.trace is not None:
        return 0.0
    p = routed.parallel
    return p.tokens_per_gpu // scenario.parallel.micro_batches * scenario.model.top_k


def step_bound(scenario: Scenario) -> StepBound:
    """The step of ``scenario``: its lower bound on time (module doc), tokens and nodes.

    The whole training step (docs/training.md) computes every layer of every
    micro-batch somewhere: the busiest stage at least ``1 / pp`` of them, so at least
    ``micro_batches / pp`` times one micro-batch's bound (bubbles, communication, DP
    and the optimizer add nothing)."""
    from moesim.config.training_layout import training_layout, whole_step

    if whole_step(scenario):
        from moesim.pipeline.whole_step import micro_batch_scenario
        from moesim.topologies import load_topology

        layout = training_layout(scenario)
        one = step_bound(micro_batch_scenario(scenario, layout))
        topology = load_topology(scenario.topology, gpus=layout.gpus)
        return StepBound(step_s=one.step_s * layout.micro_batches / layout.pp,
                         tokens=layout.tokens_per_step, nodes=int(topology.n_domains))
    return _ep_step_bound(scenario)


def _ep_step_bound(scenario: Scenario) -> StepBound:
    """:func:`step_bound` of the EP form of a step (one op program per GPU)."""
    from moesim.cost import compute
    from moesim.cost.modes import step_costs
    from moesim.engine.program import COMPUTE, build_program
    from moesim.simulation import compute_slowdown, fixed_seconds
    from moesim.topologies import load_topology

    m, p, hw = scenario.model, scenario.parallel, scenario.hardware
    topology = load_topology(scenario.topology, gpus=p.total_gpus)
    step = step_costs(scenario, topology)
    fixed = fixed_seconds(scenario, step)
    rows = expert_rows_per_gpu(scenario, step.routed_scenario())
    efficiency = max(hw.gemm_efficiency_for(m.gemm_dtype), hw.moe_gemm_efficiency or 0.0)
    forward_expert_s = (compute.swiglu_flops(hidden=m.hidden_size, rows=rows,
                                             intermediate=m.moe_intermediate_size)
                        / (hw.peak_flops(m.gemm_dtype) * efficiency)
                        * compute_slowdown(scenario))
    ops = build_program(num_layers=m.num_layers, first_dense_layers=m.first_dense_layers,
                        micro_batches=p.micro_batches, train=step.train)
    total = 0.0
    for op in ops:
        if op.stream != COMPUTE:
            continue
        if (op.phase, op.backward) in fixed:
            total += float(np.mean(fixed[op.phase, op.backward]))
        elif op.phase == "experts":
            scale = compute.BACKWARD_GEMM if op.backward else 1.0
            total += forward_expert_s * scale
    return StepBound(step_s=total, tokens=step.step_tokens(), nodes=int(topology.n_domains))
