"""simulate(scenario) -> SimResult: routing -> exchanges and compute costs -> engine ->
tables and summary.

The assembly knows no modes and no network models: the mode's
:class:`~moesim.cost.step.StepCosts` and the scenario's network model answer for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.config.feasibility import check_feasible
from moesim.config.scenario import Scenario
from moesim.cost.modes import step_costs
from moesim.cost.moe_layer import LayerCosts, moe_layer_costs
from moesim.cost.step import StepCosts
from moesim.engine import recurrence, simpy_engine
from moesim.engine.program import COMM, Op, build_program
from moesim.engine.simpy_engine import Timeline
from moesim.network.models import NETWORK_MODELS
from moesim.output.result import SimResult

ENGINES = {"simpy": simpy_engine.run_program, "fast": recurrence.run_program}


def compute_slowdown(scenario: Scenario) -> float:
    """How much slower compute runs for the SMs it leaves to communication: with
    overlapped micro-batches a communication kernel runs beside compute all step long;
    one micro-batch mostly alternates the two."""
    p, hw = scenario.parallel, scenario.hardware
    return hw.sms / (hw.sms - p.comm_sms) if p.micro_batches > 1 else 1.0


def fixed_seconds(scenario: Scenario, step: StepCosts) -> dict:
    """Per (phase, backward): the seconds of the routing-independent ops on the compute
    stream (a float or [gpus])."""
    slowdown = compute_slowdown(scenario)
    return {key: compute_s * slowdown + comm_s
            for key, (compute_s, comm_s) in step.fixed().items()}


def _durations(scenario: Scenario, ops: list[Op], costs: list[LayerCosts], keys_l: list[int],
               step: StepCosts) -> np.ndarray:
    """[ops, gpus] durations of every op on every GPU."""
    m, p = scenario.model, scenario.parallel
    slowdown = compute_slowdown(scenario)
    fixed = fixed_seconds(scenario, step)
    duration = np.zeros((len(ops), p.total_gpus))
    for op in ops:
        if (op.phase, op.backward) in fixed:
            duration[op.index] = fixed[op.phase, op.backward]
            continue
        layer_costs = costs[keys_l[op.layer - m.first_dense_layers]]
        if op.phase == "experts":
            duration[op.index] = (layer_costs.expert_s[op.microbatch, op.backward] * slowdown
                                  + layer_costs.expert_comm_s[op.microbatch, op.backward])
        else:
            assert op.stream == COMM
            ex = layer_costs.exchanges[op.microbatch, op.phase, op.backward]
            duration[op.index] = ex.seconds_per_gpu(p.ep)
    return duration


@dataclass(frozen=True, kw_only=True)
class _Step:
    """One simulated step: its ops, their timeline and the MoE layers' costs."""

    ops: list[Op]
    timeline: Timeline
    costs: list[LayerCosts]
    keys_l: list[int]


def _run(scenario: Scenario, topology, source, step: StepCosts, network) -> _Step:
    """Cost every routing key of ``source``, then run the step's program on the engine."""
    keys_l = source.keys_per_layer(scenario.model.moe_layers)
    costs = [moe_layer_costs(scenario, topology, source.key_counts(key), step=step,
                             network=network)
             for key in range(source.n_keys)]
    ops = build_program(
        num_layers=scenario.model.num_layers,
        first_dense_layers=scenario.model.first_dense_layers,
        micro_batches=scenario.parallel.micro_batches,
        train=step.train,
    )
    duration_og = _durations(scenario, ops, costs, keys_l, step)
    engine = ENGINES[scenario.engine]
    timeline = engine(ops, duration_og, ep=scenario.parallel.ep)
    return _Step(ops=ops, timeline=timeline, costs=costs, keys_l=keys_l)


def _balanced(scenario: Scenario, routed: Scenario, trace, topology, step: StepCosts,
              network):
    """The aux-loss-free balance policy: the routing of the step after
    ``balance_steps`` bias updates, and the series of every step (balance of its
    sample; step time at the checkpoints)."""
    from moesim.routing.balance import balanced_source, bias_history, checkpoints

    per_domain = topology.gpus_per_domain
    history = bias_history(routed, trace, gpus_per_domain=per_domain, seed=scenario.seed)
    series = history.series.assign(step_time_s=np.nan)
    last = scenario.routing.balance_steps
    for when in checkpoints(last)[:-1]:
        source = balanced_source(routed, trace, history, when, gpus_per_domain=per_domain,
                                 seed=scenario.seed)
        timeline = _run(scenario, topology, source, step, network).timeline
        series.loc[series["step"] == when, "step_time_s"] = float(timeline.end_og.max())
    source = balanced_source(routed, trace, history, last, gpus_per_domain=per_domain,
                             seed=scenario.seed)
    return source, series


def simulate(scenario: Scenario, trace=None) -> SimResult:
    """Simulate one step of ``scenario``; deterministic for a given ``scenario.seed``.

    Routing replays ``trace`` (a RoutingTrace), else the trace the scenario names,
    else synthetic draws. Under ``routing.balance: aux-free-bias`` the step is the one
    after ``routing.balance_steps`` steps of bias updates, and ``SimResult.balance``
    holds the series of every step. A training scenario with a pipeline or a global
    batch simulates the whole step (:mod:`moesim.pipeline.whole_step`): one
    micro-batch here, then its schedule, data parallelism and the optimizer.
    """
    from moesim.config.training_layout import whole_step
    from moesim.memory import memory_per_gpu
    from moesim.topologies import load_topology

    topology = load_topology(scenario.topology, gpus=scenario.parallel.total_gpus)
    check_feasible(scenario, topology)
    memory = memory_per_gpu(scenario)
    if whole_step(scenario):
        from moesim.pipeline.result import simulate_whole_step

        return simulate_whole_step(scenario, trace, topology, memory, simulate_ep=_simulate)
    return _simulate(scenario, trace, topology, memory)


def _simulate(scenario: Scenario, trace, topology, memory) -> SimResult:
    """:func:`simulate` of the op program on ``topology`` (checked), with ``memory`` the
    scenario's estimate."""
    from moesim.memory import explain, summary_keys
    from moesim.output.summary import summarize
    from moesim.output.tables import experts_table, links_table, plain_records, spans_table
    from moesim.routing.source import SyntheticSource, TraceSource
    from moesim.tracefile.format import RoutingTrace
    from moesim.tracefile.stats import seed_balance, trace_warnings

    p = scenario.parallel
    rng = np.random.default_rng(scenario.seed)
    step = step_costs(scenario, topology)
    network = NETWORK_MODELS[scenario.network]
    routed = step.routed_scenario()

    if trace is None and scenario.trace is not None:
        trace = RoutingTrace.load(scenario.trace)
    series = None
    if scenario.routing.balance == "aux-free-bias":
        source, series = _balanced(scenario, routed, trace, topology, step, network)
    elif trace is None:
        source = SyntheticSource(routed, gpus_per_domain=topology.gpus_per_domain, rng=rng)
    else:
        source = TraceSource(routed, trace, gpus_per_domain=topology.gpus_per_domain,
                             rng=rng)
    run = _run(scenario, topology, source, step, network)
    ops, timeline, costs, keys_l = run.ops, run.timeline, run.costs, run.keys_l
    if series is not None:
        series.loc[series["step"] == scenario.routing.balance_steps, "step_time_s"] = float(
            timeline.end_og.max())

    spans = spans_table(ops, timeline, ep=p.ep)
    links = links_table(scenario, topology, ops, costs, keys_l)
    experts = experts_table(scenario, costs, keys_l)
    if trace is None:
        routing = {"routing_source": "synthetic", "routing_gate": source.gate,
                   "routing_draws": source.n_keys}
    else:
        routing = {"routing_source": f"trace ({scenario.routing.replay})",
                   "routing_gate": source.gate,
                   "routing_trace": scenario.trace or trace.metadata.get("source", {}).get(
                       "kind", "in memory")}
    if series is not None:
        routing["balance_series"] = plain_records(series)
    elif trace is not None:
        routing.update(seed_balance(trace, scenario, topology.gpus_per_domain))
    summary = summarize(scenario, topology, ops, timeline, costs, keys_l, links, step=step,
                        routing=routing, memory=summary_keys(memory))
    if not links.empty:
        links["utilization"] = links["busy_s"] / summary["step_time_s"]
    return SimResult(scenario=scenario, summary=summary, spans=spans, links=links,
                     experts=experts, balance=series,
                     warnings=(*(trace_warnings(trace) if trace else ()), *source.warnings,
                               *(() if memory.fits else (explain(memory),))))
