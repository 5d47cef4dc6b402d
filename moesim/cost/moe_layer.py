"""Costs of the MoE layers that route alike: their exchanges over the network and their
expert GEMMs on every GPU, from the routed counts of each EP group and micro-batch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.config.scenario import Scenario
from moesim.cost.step import StepCosts
from moesim.network.exchange import TRAINING, Exchange, exchange_phases
from moesim.network.models import NetworkModel
from moesim.routing.batch import BatchCounts


@dataclass(frozen=True, kw_only=True)
class LayerCosts:
    """Costs of the MoE layers that share one routing key."""

    exchanges: dict[tuple[int, str, bool], Exchange]  # (microbatch, phase, backward)
    expert_s: dict[tuple[int, bool], np.ndarray]  # (microbatch, backward) -> [gpus] compute
    # (microbatch, backward) -> [gpus] communication after the expert GEMMs (serving's
    # MoE-TP all-reduce), not slowed by the communication SMs.
    expert_comm_s: dict[tuple[int, bool], np.ndarray]
    tokens_ge: list[np.ndarray]  # per microbatch: [gpus, local experts] kept assignments
    routed: int  # assignments the gate made, all groups and micro-batches
    kept_e: np.ndarray  # [E] assignments computed, all groups and micro-batches
    dropped_e: np.ndarray  # [E] assignments dropped
    dropped_unknown: int  # replayed slots recorded as dropped, expert unknown
    weight_routed: float | None  # a real gate's weights of all assignments (None: synthetic)
    weight_dropped: float | None  # ... of the dropped ones
    score_mass: tuple[float, float] | None  # (chosen, unrestricted top-K) affinity


def moe_layer_costs(scenario: Scenario, topology, counts_gm: list[list[BatchCounts]], *,
                    step: StepCosts, network: NetworkModel) -> LayerCosts:
    """Costs of one routing key from its counts per EP group and micro-batch."""
    m, p = scenario.model, scenario.parallel
    phases = tuple(phase for phase in TRAINING if phase[1] in step.passes)
    exchanges, expert_s, expert_comm_s, tokens_ge = {}, {}, {}, []
    for mb in range(p.micro_batches):
        groups = [counts_gm[group][mb] for group in range(p.ep_groups)]
        timed = exchange_phases(
            groups, kernel=p.dispatch_kernel, topology=topology, hw=scenario.hardware,
            comm_sms=p.comm_sms, hidden=m.hidden_size, dispatch_dtype=p.dispatch_dtype,
            combine_dtype=p.combine_dtype, combine_grad_dtype=p.combine_grad_dtype,
            network=network, gpus_per_node=min(p.ep, topology.gpus_per_domain), phases=phases)
        for (phase, backward), exchange in timed.items():
            exchanges[mb, phase, backward] = exchange
        tokens = np.concatenate([c.kept_s.reshape(p.ep, -1) for c in groups])
        received = np.concatenate([c.reach_gpu_sg.sum(axis=0) for c in groups])
        tokens_ge.append(tokens)
        for backward in step.passes:
            expert_s[mb, backward], expert_comm_s[mb, backward] = step.experts(
                tokens, received, backward=backward)
    every = [c for per_group in counts_gm for c in per_group]
    return LayerCosts(
        exchanges=exchanges, expert_s=expert_s, expert_comm_s=expert_comm_s,
        tokens_ge=tokens_ge,
        routed=sum(c.routed for c in every),
        kept_e=np.sum([c.kept_e for c in every], axis=0),
        dropped_e=np.sum([c.dropped_e for c in every], axis=0),
        dropped_unknown=sum(c.dropped_unknown for c in every),
        weight_routed=_total([c.weight_routed for c in every]),
        weight_dropped=_total([c.weight_dropped for c in every]),
        score_mass=None if every[0].score_mass is None else tuple(
            float(sum(c.score_mass[i] for c in every)) for i in range(2)),
    )


def _total(values: list) -> float | None:
    return None if values[0] is None else float(sum(values))
