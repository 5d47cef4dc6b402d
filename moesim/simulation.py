"""simulate(scenario) -> SimResult: routing -> traffic and compute costs -> engine."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from moesim.comm.exchange import sms_stretch
from moesim.comm.traffic import LinkLoads, bytes_per_copy, dispatch_flows, dispatch_loads
from moesim.config.feasibility import check_feasible
from moesim.config.scenario import Scenario
from moesim.cost import compute, serving
from moesim.engine.program import COMM, Op, build_program
from moesim.engine.simpy_engine import run_program
from moesim.network.analytical import ExchangeTime, exchange_time
from moesim.network.flow import group_exchange_times
from moesim.output.result import SimResult
from moesim.routing.batch import BatchCounts


@dataclass(frozen=True, kw_only=True)
class Exchange:
    """One dispatch or combine of all EP groups at once: bytes per link, and the
    duration each group sees."""

    loads: LinkLoads  # bytes, all groups
    times: list[ExchangeTime]  # per EP group

    def seconds_per_gpu(self, ep: int) -> np.ndarray:
        return np.repeat([t.seconds for t in self.times], ep)


@dataclass(frozen=True, kw_only=True)
class LayerCosts:
    """Costs of the MoE layers that share one routing key."""

    exchanges: dict[tuple[int, str, bool], Exchange]  # (microbatch, phase, backward)
    expert_s: dict[tuple[int, bool], np.ndarray]  # (microbatch, backward) -> [gpus]
    tokens_ge: list[np.ndarray]  # per microbatch: [gpus, local experts] kept assignments
    routed: int  # assignments the gate made, all groups and micro-batches
    kept_e: np.ndarray  # [E] assignments computed, all groups and micro-batches
    dropped_e: np.ndarray  # [E] assignments dropped
    dropped_unknown: int  # replayed slots recorded as dropped, expert unknown
    # Serving with moe_tp > 1: (microbatch, backward) -> [gpus] MoE-TP all-reduce seconds
    # that follow the expert GEMMs (not slowed by communication SMs).
    expert_comm_s: dict[tuple[int, bool], np.ndarray] = field(default_factory=dict)


def _group_gpus_per_node(scenario: Scenario, topology) -> int:
    return min(scenario.parallel.ep, topology.gpus_per_domain)


def _layer_costs(scenario: Scenario, topology, counts_gm: list[list[BatchCounts]]) -> LayerCosts:
    """Costs of one routing key from its counts per EP group and micro-batch."""
    m, p, hw = scenario.model, scenario.parallel, scenario.hardware
    per_node = _group_gpus_per_node(scenario, topology)
    kernel = p.dispatch_kernel
    overhead = hw.comm_overhead_s(kernel)
    stretch = sms_stretch(hw, kernel, p.comm_sms)
    size = {
        ("dispatch", False): bytes_per_copy(kernel, hidden=m.hidden_size,
                                            dtype=p.dispatch_dtype, dispatch=True),
        ("combine", False): bytes_per_copy(kernel, hidden=m.hidden_size,
                                           dtype=p.combine_dtype, dispatch=False),
        # Backward: combine's gradient goes out like a dispatch, dispatch's comes back
        # like a combine, both in BF16.
        ("combine", True): bytes_per_copy(kernel, hidden=m.hidden_size, dtype="bf16",
                                          dispatch=True),
        ("dispatch", True): bytes_per_copy(kernel, hidden=m.hidden_size, dtype="bf16",
                                           dispatch=False),
    }
    out_direction = {("dispatch", False), ("combine", True)}
    backward_flags = (False, True) if scenario.mode == "train" else (False,)
    flow_level = scenario.network == "flow"
    exchanges, expert_s, expert_comm_s, tokens_ge = {}, {}, {}, []
    for mb in range(p.micro_batches):
        group_copies, group_flows, group_tokens, group_received = [], [], [], []
        for group in range(p.ep_groups):
            c = counts_gm[group][mb]
            where = {"kernel": kernel, "topology": topology, "first_gpu": group * p.ep,
                     "gpus_per_node": per_node}
            if flow_level:
                group_flows.append(dispatch_flows(c, **where))
                group_copies.append(group_flows[-1].loads())
            else:
                group_copies.append(dispatch_loads(c, **where))
            group_tokens.append(c.kept_e.reshape(p.ep, -1))
            group_received.append(c.reach_gpu_sg.sum(axis=0))
        copies = sum(group_copies[1:], group_copies[0])
        tokens = np.concatenate(group_tokens)
        tokens_ge.append(tokens)
        for (phase, backward), nbytes in size.items():
            if backward not in backward_flags:
                continue
            outward = (phase, backward) in out_direction

            def as_bytes(c, outward=outward, nbytes=nbytes):
                return (c if outward else c.reversed()).scaled(nbytes)

            loads = as_bytes(copies)
            if flow_level:
                times = group_exchange_times(
                    [(f if outward else f.reversed()).scaled(nbytes) for f in group_flows],
                    topology, overhead_s=overhead)
            else:
                times = [exchange_time(loads, topology, overhead_s=overhead, own=as_bytes(g))
                         for g in group_copies]
            if stretch > 1.0:  # too few SMs: the transfer, not the fixed cost, slows
                times = [dataclasses.replace(t, seconds=overhead + (t.seconds - overhead)
                                             * stretch) for t in times]
            exchanges[mb, phase, backward] = Exchange(loads=loads, times=times)
        if serving.is_serving(scenario):
            expert_s[mb, False], expert_comm_s[mb, False] = serving.expert_seconds(
                scenario, topology, tokens, np.concatenate(group_received))
            continue
        for backward in backward_flags:
            expert_s[mb, backward] = compute.grouped_expert_seconds(
                m, hw, tokens, backward=backward)
    every = [c for per_group in counts_gm for c in per_group]
    return LayerCosts(
        exchanges=exchanges, expert_s=expert_s, expert_comm_s=expert_comm_s,
        tokens_ge=tokens_ge,
        routed=sum(c.routed for c in every),
        kept_e=np.sum([c.kept_e for c in every], axis=0),
        dropped_e=np.sum([c.dropped_e for c in every], axis=0),
        dropped_unknown=sum(c.dropped_unknown for c in every),
    )


def _fixed_costs(scenario: Scenario, slowdown: float) -> dict[tuple[str, bool], float]:
    """Seconds of the ops whose cost does not depend on the routing (train, inference)."""
    m, p, hw = scenario.model, scenario.parallel, scenario.hardware
    tokens = p.tokens_per_gpu // p.micro_batches
    fixed: dict[tuple[str, bool], float] = {}
    for backward in (False, True):
        fixed["attention", backward] = compute.attention_seconds(
            m, hw, tokens=tokens, seq_len=p.seq_len, backward=backward)
        fixed["shared", backward] = compute.ffn_seconds(
            m, hw, tokens=tokens, intermediate=m.shared_experts * m.moe_intermediate_size,
            backward=backward)
        fixed["dense_ffn", backward] = compute.ffn_seconds(
            m, hw, tokens=tokens, intermediate=m.dense_intermediate_size, backward=backward)
        fixed["lm_head", backward] = compute.lm_head_seconds(
            m, hw, tokens=tokens, backward=backward)
    return {key: value * slowdown for key, value in fixed.items()}


def _durations(scenario: Scenario, ops: list[Op], costs: list[LayerCosts], keys_l: list[int],
               n_gpus: int, serving_fixed=None):
    """[ops, gpus] durations of every op on every GPU.

    ``serving_fixed`` (prefill, decode): :func:`moesim.cost.serving.fixed_costs`."""
    m, p, hw = scenario.model, scenario.parallel, scenario.hardware
    # With overlapped micro-batches a communication kernel runs beside compute all step
    # long, so its SMs are lost to compute; one micro-batch mostly alternates the two.
    slowdown = hw.sms / (hw.sms - p.comm_sms) if p.micro_batches > 1 else 1.0
    if serving_fixed is None:
        fixed = _fixed_costs(scenario, slowdown)
    else:  # tensor-parallel all-reduces are not slowed by the communication SMs
        fixed = {(phase, False): compute_s * slowdown + comm_g
                 for phase, (compute_s, comm_g) in serving_fixed.items()}
    duration = np.zeros((len(ops), n_gpus))
    for op in ops:
        if (op.phase, op.backward) in fixed:
            duration[op.index] = fixed[op.phase, op.backward]
            continue
        layer_costs = costs[keys_l[op.layer - m.first_dense_layers]]
        if op.phase == "experts":
            duration[op.index] = layer_costs.expert_s[op.microbatch, op.backward] * slowdown
            comm = layer_costs.expert_comm_s.get((op.microbatch, op.backward))
            if comm is not None:
                duration[op.index] += comm
        else:
            assert op.stream == COMM
            ex = layer_costs.exchanges[op.microbatch, op.phase, op.backward]
            duration[op.index] = ex.seconds_per_gpu(p.ep)
    return duration


def simulate(scenario: Scenario, trace=None) -> SimResult:
    """Simulate one step of ``scenario``; deterministic for a given ``scenario.seed``.

    Routing replays ``trace`` (a RoutingTrace), else the trace the scenario names,
    else synthetic draws.
    """
    from moesim.output.summary import summarize
    from moesim.output.tables import experts_table, links_table, spans_table
    from moesim.routing.source import SyntheticSource, TraceSource
    from moesim.topologies import load_topology
    from moesim.tracefile.format import RoutingTrace

    p = scenario.parallel
    topology = load_topology(scenario.topology, gpus=p.total_gpus)
    check_feasible(scenario, topology)
    rng = np.random.default_rng(scenario.seed)
    serve = serving.is_serving(scenario)
    # What routing sees: the tokens each GPU dispatches (serving: from the request batch).
    routed = serving.routing_view(scenario) if serve else scenario

    if trace is None and scenario.trace is not None:
        trace = RoutingTrace.load(scenario.trace)
    if trace is None:
        source = SyntheticSource(routed, gpus_per_domain=topology.gpus_per_domain, rng=rng)
    else:
        source = TraceSource(routed, trace, gpus_per_domain=topology.gpus_per_domain,
                             rng=rng)
    keys_l = source.keys_per_layer(scenario.model.moe_layers)
    costs = [_layer_costs(scenario, topology, source.key_counts(key))
             for key in range(source.n_keys)]
    ops = build_program(
        num_layers=scenario.model.num_layers,
        first_dense_layers=scenario.model.first_dense_layers,
        micro_batches=p.micro_batches,
        train=scenario.mode == "train",
    )
    fixed = serving.fixed_costs(scenario, topology) if serve else None
    duration_og = _durations(scenario, ops, costs, keys_l, p.total_gpus, fixed)
    timeline = run_program(ops, duration_og, ep=p.ep)

    spans = spans_table(ops, timeline, ep=p.ep)
    links = links_table(scenario, topology, ops, costs, keys_l)
    experts = experts_table(scenario, costs, keys_l)
    summary = summarize(scenario, topology, ops, timeline, costs, keys_l, links,
                        serving_fixed=fixed)
    if trace is None:
        summary["routing_source"] = "synthetic"
        summary["routing_draws"] = source.n_keys
    else:
        summary["routing_source"] = f"trace ({scenario.routing.replay})"
        summary["routing_trace"] = scenario.trace or trace.metadata.get("source", {}).get(
            "kind", "in memory")
    if not links.empty:
        links["utilization"] = links["busy_s"] / summary["step_time_s"]
    return SimResult(scenario=scenario, summary=summary, spans=spans, links=links,
                     experts=experts)
