"""The summary of one simulated step: its keys, declared once in :class:`Summary`
(meanings in docs/metrics.md), and how they are computed from the timeline."""

# No `from __future__ import annotations`: TypedDict reads NotRequired from live annotations.
from collections import Counter
from typing import get_origin, get_type_hints

import numpy as np
import pandas as pd
from typing_extensions import NotRequired, TypedDict

from moesim.config.scenario import Scenario
from moesim.cost.step import StepCosts
from moesim.engine.program import COMM, COMPUTE, Op
from moesim.engine.simpy_engine import Timeline


class Summary(TypedDict):
    """Every summary key, in SI units (docs/metrics.md defines each). The serving keys
    appear in ``prefill`` and ``decode`` only, ``routing_draws`` with synthetic routing
    only, ``routing_trace`` with a replayed trace only."""

    scenario: str
    mode: str
    gpus: int
    ep: int
    ep_groups: int
    nodes: int
    dispatch_kernel: str
    placement: str
    redundant_experts: int
    max_devices: NotRequired[int]  # routing.max_devices, when set
    capacity_factor: NotRequired[float]  # when set, with its scope and protected share
    capacity_scope: NotRequired[str]
    never_drop_fraction: NotRequired[float]
    step_time_s: float
    tokens_per_step: int
    tokens_per_s: float
    tokens_per_s_per_gpu: float
    ttft_s: NotRequired[float]  # prefill
    input_tokens_per_s_per_gpu: NotRequired[float]  # prefill
    tpot_s: NotRequired[float]  # decode
    output_tokens_per_s_per_gpu: NotRequired[float]  # decode
    requests_per_step: NotRequired[int]
    attention_dp: NotRequired[int]
    attention_tp: NotRequired[int]
    moe_tp: NotRequired[int]
    isl: NotRequired[int]
    osl: NotRequired[int]
    kv_dtype: NotRequired[str]
    attention_keys_per_token: NotRequired[float]
    routed_tokens_per_gpu: NotRequired[int]
    kv_cache_bytes_per_gpu: NotRequired[float]
    attention_tp_allreduce_time_s: NotRequired[float]
    moe_tp_allreduce_time_s: NotRequired[float]
    pp: NotRequired[int]  # the whole training step (docs/training.md)
    vp: NotRequired[int]
    dp: NotRequired[int]
    micro_batches: NotRequired[int]
    tokens_per_microbatch: NotRequired[int]
    schedule: NotRequired[str]
    recompute: NotRequired[str]
    precision: NotRequired[str]
    pipeline_time_s: NotRequired[float]
    pipeline_bubble_fraction: NotRequired[float]
    p2p_send_time_s: NotRequired[float]
    elementwise_time_s: NotRequired[float]
    recompute_time_s: NotRequired[float]
    dp_grad_reduce_time_s: NotRequired[float]
    dp_param_gather_time_s: NotRequired[float]
    dp_exposed_time_s: NotRequired[float]
    optimizer_time_s: NotRequired[float]
    moe_layer_breakdown_s: NotRequired[dict[str, float]]
    dispatch_time_s: float
    combine_time_s: float
    expert_compute_time_s: float
    expert_compute_max_time_s: float
    attention_time_s: float
    shared_expert_time_s: float
    dense_ffn_time_s: float
    lm_head_time_s: float
    comm_exposed_time_s: float
    comm_wait_time_s: float
    mfu: float
    model_tflops_per_gpu: float
    nvlink_bytes: float
    rdma_bytes: float
    bottleneck_link: str
    max_over_mean_gpu_load: float
    dropped_token_fraction: float
    dropped_affinity_fraction: NotRequired[float]  # replayed traces: real gate weights
    affinity_kept: NotRequired[float]  # traces with scores
    tokens_dispatched: int
    tokens_computed: int
    tokens_dropped: int
    routing_source: str
    routing_gate: str
    routing_draws: NotRequired[int]  # synthetic routing
    routing_trace: NotRequired[str]  # a replayed trace
    balance_series: NotRequired[list]  # routing.balance: aux-free-bias
    expert_balance: NotRequired[float]  # a replayed trace with scores
    device_balance: NotRequired[float]
    comm_balance: NotRequired[float]
    memory_gib_per_gpu: float  # moesim.memory: one GPU's estimated memory
    memory_breakdown_gib: dict[str, float]
    memory_capacity_gib: float
    fits_in_memory: bool


_SERVING = ("requests_per_step", "attention_dp", "attention_tp", "moe_tp", "isl", "osl",
            "kv_dtype", "attention_keys_per_token", "routed_tokens_per_gpu",
            "kv_cache_bytes_per_gpu", "attention_tp_allreduce_time_s",
            "moe_tp_allreduce_time_s")
_WHOLE_STEP = ("pp", "vp", "dp", "micro_batches", "tokens_per_microbatch", "schedule",
               "recompute", "precision", "pipeline_time_s", "pipeline_bubble_fraction",
               "p2p_send_time_s", "elementwise_time_s", "recompute_time_s",
               "dp_grad_reduce_time_s", "dp_param_gather_time_s", "dp_exposed_time_s",
               "optimizer_time_s", "moe_layer_breakdown_s")
_CAPACITY = ("capacity_factor", "capacity_scope", "never_drop_fraction")
_BALANCE = ("expert_balance", "device_balance", "comm_balance")
# Optional keys that come together: a summary holding any key of the first tuple holds
# every key of the second.
_TOGETHER = (
    (("ttft_s", "input_tokens_per_s_per_gpu"), ("ttft_s", "input_tokens_per_s_per_gpu",
                                                *_SERVING)),
    (("tpot_s", "output_tokens_per_s_per_gpu"), ("tpot_s", "output_tokens_per_s_per_gpu",
                                                 *_SERVING)),
    (_SERVING, _SERVING), (_WHOLE_STEP, _WHOLE_STEP), (_CAPACITY, _CAPACITY),
    (_BALANCE, _BALANCE),
)


def summary_problem(summary: dict, *, most: float | None = None) -> tuple[str, str] | None:
    """``(key, what it must be)`` for the first key that keeps ``summary`` from being a
    :class:`Summary` (declared keys only, every required one, each of its declared type;
    an int is a float too, a bool only a bool; with ``most``, numbers are at most that
    large, NaN is not a number); the
    optional keys of one mode or feature all together), or None when it is one."""
    types = get_type_hints(Summary)
    for key in sorted(summary.keys() - types.keys()):  # sorted: the same key every run
        return key, "one of the summary keys (docs/metrics.md)"
    for key in sorted(Summary.__required_keys__ - summary.keys()):
        return key, "present"
    for key, value in summary.items():
        declared = get_origin(types[key]) or types[key]
        if not _is_a(value, declared, most=most):
            return key, _WANTED[declared]
        if declared is dict and not all(isinstance(k, str) and _is_a(v, float, most=most)
                                        for k, v in value.items()):
            return key, "a mapping of names to numbers"
    for when, needs in _TOGETHER:
        given = next((key for key in when if key in summary), None)
        missing = [key for key in needs if key not in summary]
        if given is not None and missing:
            return missing[0], f"present with {given}"
    own = "routing_draws" if summary["routing_source"] == "synthetic" else "routing_trace"
    if own not in summary:
        return own, f"present with routing_source {summary['routing_source']}"
    return None


_WANTED = {float: "a number", int: "an integer", bool: "true or false", str: "text",
           dict: "a mapping of names to numbers", list: "a list"}


def _is_a(value, declared: type, *, most: float | None) -> bool:
    allowed = (int, float) if declared is float else declared
    ok = isinstance(value, allowed) and (declared is bool) == isinstance(value, bool)
    return ok and (most is None or declared is not float or abs(value) <= most)


def check_summary(summary: dict) -> Summary:
    """``summary`` unchanged, after asserting that it is a :class:`Summary`."""
    problem = summary_problem(summary)
    assert problem is None, problem
    return summary  # type: ignore[return-value]


def _overlap_with(begin_gi: np.ndarray, end_gi: np.ndarray, starts_gj: np.ndarray,
                  ends_gj: np.ndarray) -> np.ndarray:
    """[G, J]: the length of each ``[starts_gj, ends_gj)`` covered by the intervals
    ``[begin_gi, end_gi)`` of its row (sorted and disjoint within a row)."""
    n_rows, n = begin_gi.shape
    length_gi = end_gi - begin_gi
    busy_gi = np.concatenate((np.zeros((n_rows, 1)), np.cumsum(length_gi, axis=1)), axis=1)
    # One search for every row: row r's times are shifted past all of row r-1's. Equal
    # times shift alike, so ties (an exchange ending as a GEMM starts) stay ties.
    low = min(begin_gi.min(), starts_gj.min())
    shift_g1 = (np.arange(n_rows) * (max(end_gi.max(), ends_gj.max()) - low + 1.0) - low)[:, None]
    flat = (begin_gi + shift_g1).ravel()
    rows_g1 = np.arange(n_rows)[:, None]

    def covered_until(t_gj):
        i_gj = np.searchsorted(flat, t_gj + shift_g1, side="right") - rows_g1 * n
        prev = np.maximum(i_gj - 1, 0)  # the last interval started by t
        inside = np.clip(t_gj - begin_gi[rows_g1, prev], 0, length_gi[rows_g1, prev])
        return busy_gi[rows_g1, prev] + np.where(i_gj > 0, inside, 0.0)

    return covered_until(ends_gj) - covered_until(starts_gj)


def exposed_comm_seconds(ops: list[Op], timeline: Timeline) -> np.ndarray:
    """Per GPU: time the communication stream is busy while the compute stream is idle."""
    comm = np.array([op.stream == COMM for op in ops], dtype=bool)
    calc = np.array([op.stream == COMPUTE for op in ops], dtype=bool)
    start_og, end_og = timeline.start_og, timeline.end_og
    if not comm.any():
        return np.zeros(start_og.shape[1])
    sent = (end_og[comm] - start_og[comm]).sum(axis=0)
    if not calc.any():
        return sent
    # A GPU per row, so that each GPU's times lie together for the search.
    begin_gc, end_gc = start_og[calc].T, end_og[calc].T
    order = np.argsort(begin_gc, axis=1, kind="stable")
    begin_gc = np.take_along_axis(begin_gc, order, axis=1)
    end_gc = np.take_along_axis(end_gc, order, axis=1)
    hidden_gm = _overlap_with(begin_gc, end_gc, start_og[comm].T, end_og[comm].T)
    return sent - hidden_gm.sum(axis=1)


def _per_gpu_sum(ops, begin_og: np.ndarray, end_og: np.ndarray, predicate) -> np.ndarray:
    """Per GPU, the summed ``end - begin`` of the ops that satisfy ``predicate``."""
    rows = np.array([predicate(op) for op in ops])
    if not rows.any():
        return np.zeros(begin_og.shape[1])
    return (end_og[rows] - begin_og[rows]).sum(axis=0)


def _load_imbalance(scenario: Scenario, costs, keys_l) -> float:
    """Mean over MoE layers and EP groups of max/mean assignments per GPU."""
    p = scenario.parallel
    ratios = []
    for key in keys_l:
        tokens_g = sum(t.sum(axis=1) for t in costs[key].tokens_ge)
        for group in range(p.ep_groups):
            g = tokens_g[group * p.ep:(group + 1) * p.ep]
            if g.mean() > 0:
                ratios.append(g.max() / g.mean())
    return float(np.mean(ratios)) if ratios else 1.0


def _limits(scenario: Scenario) -> dict:
    """The routing limits the step ran under, where set."""
    r = scenario.routing
    out = {} if r.max_devices is None else {"max_devices": r.max_devices}
    if r.capacity_factor is not None:
        out |= {"capacity_factor": r.capacity_factor, "capacity_scope": r.capacity_scope,
                "never_drop_fraction": r.never_drop_fraction}
    return out


def _affinity(costs, keys_l) -> dict:
    """The affinity keys, where the routing carries a real gate's weights and scores."""
    out = {}
    first = costs[keys_l[0]]
    if first.weight_routed is not None:
        routed = sum(costs[k].weight_routed for k in keys_l)
        dropped = sum(costs[k].weight_dropped for k in keys_l)
        out["dropped_affinity_fraction"] = dropped / routed if routed else 0.0
    if first.score_mass is not None:
        chosen = sum(costs[k].score_mass[0] for k in keys_l)
        free = sum(costs[k].score_mass[1] for k in keys_l)
        out["affinity_kept"] = chosen / free if free else 1.0
    return out


def summarize(scenario: Scenario, topology, ops, timeline: Timeline, costs, keys_l,
              links: pd.DataFrame, *, step: StepCosts, routing: dict, memory: dict) -> Summary:
    """The summary; ``step`` is the mode's costs (its tokens, FLOPs and own keys),
    ``routing`` the routing keys (``routing_source`` and its detail), ``memory`` the
    memory keys (``moesim.memory.summary_keys``)."""
    m, p, hw = scenario.model, scenario.parallel, scenario.hardware
    step_s = float(timeline.end_og.max())

    dispatched = sum(costs[k].routed for k in keys_l)
    dropped = int(sum(costs[k].dropped_e.sum() + costs[k].dropped_unknown for k in keys_l))
    computed = int(sum(t.sum() for k in keys_l for t in costs[k].tokens_ge))

    tokens = step.step_tokens()
    flops = step.model_flops()
    expert_comm = sum(c for k in keys_l for c in costs[k].expert_comm_s.values())
    extra = step.summary_keys(step_s, expert_comm_s=float(np.mean(expert_comm)))
    start, end = timeline.start_og, timeline.end_og
    mean = {
        name: float(_per_gpu_sum(ops, start, end, lambda op, n=name: op.phase == n).mean())
        for name in ("dispatch", "combine", "attention", "shared", "dense_ffn", "lm_head")
    }
    experts_g = _per_gpu_sum(ops, start, end, lambda op: op.phase == "experts")
    # Collectives start when their last member arrives: the rest waited for it.
    comm_wait_g = _per_gpu_sum(ops, timeline.arrive_og, start, lambda op: op.collective)
    exposed_g = exposed_comm_seconds(ops, timeline)
    bottlenecks = Counter(
        t.bottleneck
        for op in ops if op.collective
        for t in costs[keys_l[op.layer - m.first_dense_layers]]
        .exchanges[op.microbatch, op.phase, op.backward].times
    )
    # Every byte is counted once, on the link it leaves from.
    nvlink_sent = float(links.loc[links["src"].str.startswith("gpu") & (links["kind"] == "nvlink"),
                                  "bytes"].sum())
    rdma_sent = float(links.loc[links["src"].str.startswith("gpu") & (links["kind"] == "nic"),
                                "bytes"].sum())
    return check_summary({
        "scenario": scenario.name,
        "mode": scenario.mode,
        "gpus": p.total_gpus,
        "ep": p.ep,
        "ep_groups": p.ep_groups,
        "nodes": int(topology.n_domains),
        "dispatch_kernel": p.dispatch_kernel,
        "placement": scenario.placement.policy,
        "redundant_experts": scenario.placement.redundant_experts,
        **_limits(scenario),
        "step_time_s": step_s,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / step_s,
        "tokens_per_s_per_gpu": tokens / step_s / p.total_gpus,
        **extra,
        "dispatch_time_s": mean["dispatch"],
        "combine_time_s": mean["combine"],
        "expert_compute_time_s": float(experts_g.mean()),
        "expert_compute_max_time_s": float(experts_g.max()),
        "attention_time_s": mean["attention"],
        "shared_expert_time_s": mean["shared"],
        "dense_ffn_time_s": mean["dense_ffn"],
        "lm_head_time_s": mean["lm_head"],
        "comm_exposed_time_s": float(exposed_g.mean()),
        "comm_wait_time_s": float(comm_wait_g.mean()),
        "mfu": flops / (step_s * p.total_gpus * hw.peak_flops(m.gemm_dtype)),
        "model_tflops_per_gpu": flops / (step_s * p.total_gpus) / 1e12,
        "nvlink_bytes": nvlink_sent,
        "rdma_bytes": rdma_sent,
        "bottleneck_link": bottlenecks.most_common(1)[0][0] if bottlenecks else "none",
        "max_over_mean_gpu_load": _load_imbalance(scenario, costs, keys_l),
        "dropped_token_fraction": dropped / dispatched if dispatched else 0.0,
        **_affinity(costs, keys_l),
        "tokens_dispatched": dispatched,
        "tokens_computed": computed,
        "tokens_dropped": dropped,
        **routing,
        **memory,
    })
