"""Balance and communication statistics of a :class:`~moesim.tracefile.format.RoutingTrace`.

For every MoE layer of a trace, with experts placed contiguously on ``D = ep`` devices
(expert ``e`` on rank ``e // (E / D)``, rank ``r`` on node ``r // gpus_per_node``,
docs/routing.md section 7), :func:`trace_stats` reports:

* expert load: coefficient of variation (population std / mean of the assignments per
  expert) and max / mean; the same per device;
* the DeepSeek-V2 balance terms (docs/routing.md section 2.4), without their alpha factors;
  each is 1 under perfect balance with softmax scores:

  - expert level ``exp_bal = sum_i f_i P_i`` with ``f_i = E / (K T) * #(t selects i)``
    and ``P_i = mean_t s_{t,i}``;
  - device level ``dev_bal = sum_d f'_d P'_d`` with ``f'_d`` the mean of ``f_i`` over the
    experts of device ``d`` and ``P'_d`` the sum of their ``P_i``;
  - communication ``comm_bal = sum_d f''_d P''_d`` with
    ``f''_d = D / (M T) * #(tokens sent to d)`` (a token counts once per device, however
    many of its experts live there) and ``P''_d = P'_d``. ``M`` is ``max_devices`` when
    given; without a device limit a token can reach ``min(K, D)`` devices, which takes
    the place of ``M``.

  The ``P`` factors need the trace's ``scores``; without them the balance columns are
  NaN while the frequency maxima ``f_max``, ``f_dev_max``, ``f_comm_max`` remain;
* how many devices and nodes each token reaches (histograms, means) and, with
  ``max_devices = M``, the share of tokens that reach more than ``M`` devices or nodes.

Dropped slots (id ``-1``) select no expert and reach no device. Capacity and dropping
under a capacity factor are not computed here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from moesim.cores import threads
from moesim.errors import InputError
from moesim.routing.batch import expert_loads
from moesim.tracefile.format import RoutingTrace, release_pages


@dataclass(frozen=True, kw_only=True, eq=False)
class TraceStats:
    """Statistics of one trace under one placement.

    ``layers`` has one row per MoE layer (index: the model's layer numbers from
    ``metadata.layer_indices``) and the columns described in the module docstring.
    ``devices_reached`` / ``nodes_reached`` have the same rows and one column per count
    ``n = 0 .. min(K, D)`` (or ``min(K, nodes)``): the share of the layer's tokens that
    reach exactly ``n`` devices (nodes). The scalars summarise all layers.
    """

    layers: pd.DataFrame
    devices_reached: pd.DataFrame
    nodes_reached: pd.DataFrame
    num_layers: int
    num_tokens: int
    num_experts: int
    top_k: int
    ep: int
    gpus_per_node: int
    num_nodes: int
    max_devices: int | None
    has_scores: bool
    expert_load_cv: float  # mean over layers
    max_over_mean: float  # expert max / mean of the worst layer
    mean_devices_per_token: float
    mean_nodes_per_token: float
    share_over_m_devices: float | None  # over all layers and tokens; None without M
    share_over_m_nodes: float | None


def _check_int(value, name: str, lo: int, hi: int | None, allowed: str | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        span = f"{lo}..{hi}" if hi is not None else f"an integer >= {lo}"
        raise InputError(f"got {value!r}", field=name, allowed=allowed or span)


def _distinct_units(units_tk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted units ``sorted_tk`` and ``first_tk``: True where a row meets a unit first.

    Sorting each row puts equal units side by side, so a unit is new where it differs
    from its left neighbour; ``-1`` (dropped) is never counted.
    """
    sorted_tk = np.sort(units_tk, axis=1)
    first_tk = np.ones(sorted_tk.shape, dtype=bool)
    first_tk[:, 1:] = sorted_tk[:, 1:] != sorted_tk[:, :-1]
    first_tk &= sorted_tk >= 0
    return sorted_tk, first_tk


def _cv(load_x: np.ndarray) -> tuple[float, float]:
    """(population std / mean, max / mean) of a load vector; NaN when it is all zero."""
    mean = load_x.mean()
    if mean == 0:
        return math.nan, math.nan
    return float(load_x.std() / mean), float(load_x.max() / mean)


ROWS_PER_CHUNK = 2048  # a chunk of float64 scores (4 MiB at E = 256) stays in the caches
TOKENS_PER_CHUNK = 1 << 16  # of expert ids: a few MiB of temporaries, reused


def score_shares(scores_te: np.ndarray) -> np.ndarray:
    """``P_e = mean_t s_te / sum_e' s_te'`` [E] (0 for a token whose scores sum to
    <= 0), in float64, chunk by chunk.

    Sigmoid scores do not sum to 1 per token; like DeepSeek-V3's sequence-wise loss,
    each token's scores are normalised so that perfect balance gives 1 again. A token's
    sum of float16 scores is exact in float64; the mean sums ``s_te * (1 / sum_t)``, one
    matrix-vector product per chunk.
    """
    n_tokens, n_experts = scores_te.shape
    chunk_te = np.empty((min(ROWS_PER_CHUNK, n_tokens), n_experts))
    total_e = np.zeros(n_experts)
    for start in range(0, n_tokens, ROWS_PER_CHUNK):
        part = scores_te[start:start + ROWS_PER_CHUNK]
        s_te = chunk_te[: part.shape[0]]
        np.copyto(s_te, part)
        release_pages(part)  # a mapped trace's pages go back chunk by chunk
        row_t = s_te.sum(axis=1)
        inverse_t = np.divide(1.0, row_t, out=np.zeros_like(row_t), where=row_t > 0)
        total_e += np.einsum("t,te->e", inverse_t, s_te)  # not BLAS: no threads to wake
    return total_e / n_tokens


def _layer_row(ids_tk: np.ndarray, scores_te: np.ndarray | None, *, num_experts: int,
               ep: int, gpus_per_node: int, m_comm: int, max_devices: int | None,
               nodes: bool = True):
    """One layer's statistics row, devices-reached counts ``ndev_t`` and ``nnode_t``
    (without ``nodes``: no node counts, NaN in their columns, ``nnode_t`` None)."""
    n_tokens, top_k = ids_tk.shape
    per_device = num_experts // ep
    load_e = np.zeros(num_experts, dtype=np.int64)
    sent_d = np.zeros(ep, dtype=np.int64)
    ndev_t = np.empty(n_tokens, dtype=np.int64)
    nnode_t = np.empty(n_tokens, dtype=np.int64) if nodes else None
    assignments = 0
    for start in range(0, n_tokens, TOKENS_PER_CHUNK):  # all counts add up over chunks
        part = slice(start, start + TOKENS_PER_CHUNK)
        ids = ids_tk[part]
        kept = ids >= 0
        assignments += int(kept.sum())
        load_e += np.bincount(ids[kept], minlength=num_experts)
        # -1 // per_device stays negative, so dropped slots stay out of both counts.
        dev = np.where(kept, ids // per_device, -1)
        dev_sorted, dev_first = _distinct_units(dev)
        ndev_t[part] = dev_first.sum(axis=1)
        if nodes:
            _, node_first = _distinct_units(np.where(kept, dev // gpus_per_node, -1))
            nnode_t[part] = node_first.sum(axis=1)
        sent_d += np.bincount(dev_sorted[dev_first], minlength=ep)
    load_e = load_e.astype(np.float64)
    sent_d = sent_d.astype(np.float64)
    load_d = load_e.reshape(ep, per_device).sum(axis=1)

    if n_tokens:
        f_e = num_experts / (top_k * n_tokens) * load_e
        f_dev_d = f_e.reshape(ep, per_device).mean(axis=1)
        f_comm_d = ep / (m_comm * n_tokens) * sent_d
    else:
        f_e = np.full(num_experts, math.nan)
        f_dev_d = f_comm_d = np.full(ep, math.nan)
    if scores_te is not None and n_tokens:
        p_e = score_shares(scores_te)
        p_dev_d = p_e.reshape(ep, per_device).sum(axis=1)
        exp_bal = float(f_e @ p_e)
        dev_bal = float(f_dev_d @ p_dev_d)
        comm_bal = float(f_comm_d @ p_dev_d)
    else:
        exp_bal = dev_bal = comm_bal = math.nan

    cv_e, mom_e = _cv(load_e)
    cv_d, mom_d = _cv(load_d)
    row = {
        "assignments": assignments,
        "expert_load_cv": cv_e,
        "expert_max_over_mean": mom_e,
        "device_load_cv": cv_d,
        "device_max_over_mean": mom_d,
        "exp_bal": exp_bal,
        "f_max": float(f_e.max()),
        "dev_bal": dev_bal,
        "f_dev_max": float(f_dev_d.max()),
        "comm_bal": comm_bal,
        "f_comm_max": float(f_comm_d.max()),
        "mean_devices": float(ndev_t.mean()) if n_tokens else math.nan,
        "mean_nodes": float(nnode_t.mean()) if n_tokens and nodes else math.nan,
    }
    if max_devices is not None:
        row["share_over_m_devices"] = float((ndev_t > max_devices).mean()) if n_tokens \
            else math.nan
        row["share_over_m_nodes"] = float((nnode_t > max_devices).mean()) \
            if n_tokens and nodes else math.nan
    assert sent_d.sum() == ndev_t.sum()
    return row, ndev_t, nnode_t


def _check_placement(trace: RoutingTrace, *, ep: int, max_devices: int | None,
                     gpus_per_node: int) -> int:
    """InputError unless :func:`trace_stats` can place the trace so; the "M" of the
    communication term."""
    n_experts = trace.num_experts
    _check_int(ep, "ep", 1, n_experts)
    if n_experts % ep:
        divisors = ", ".join(str(d) for d in range(1, n_experts + 1) if n_experts % d == 0)
        raise InputError(f"EP size {ep} does not divide the trace's {n_experts} experts",
                         field="ep", allowed=divisors)
    _check_int(gpus_per_node, "gpus_per_node", 1, None)
    if max_devices is not None:
        _check_int(max_devices, "max_devices", 1, ep)
    # Without a limit a token reaches at most min(K, D) devices: that is its "M".
    return max_devices if max_devices is not None else min(trace.top_k, ep)


def _layer_rows(trace: RoutingTrace, *, rows_only: bool = False, **kwargs) -> list:
    """:func:`_layer_row` of every layer of ``trace`` (``rows_only``: without the
    per-token counts), side by side on the cores when there are scores (numpy's loops
    release the GIL); a mapped trace's pages of a layer go back once its row is done."""

    def layer_row(layer: int):
        scores_te = None if trace.scores is None else trace.scores[layer]
        done = _layer_row(trace.expert_ids[layer], scores_te, num_experts=trace.num_experts,
                          **kwargs)
        release = getattr(trace, "release", None)
        if release is not None:
            release(layer)
        return (done[0], None, None) if rows_only else done

    layers_l = range(trace.num_layers)
    workers = min(threads(), trace.num_layers) if trace.scores is not None else 1
    if workers <= 1:
        return [layer_row(layer) for layer in layers_l]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(layer_row, layers_l))


def trace_stats(
    trace: RoutingTrace,
    *,
    ep: int,
    max_devices: int | None = None,
    gpus_per_node: int = 8,
) -> TraceStats:
    """Per-layer load balance, balance-loss terms and devices/nodes reached per token.

    ``ep`` is the expert-parallel size ``D`` (must divide the trace's ``E``),
    ``gpus_per_node`` groups ranks into nodes (the last node may be partial), and
    ``max_devices`` (``M``, 1..D) is the device limit to measure against.
    """
    n_experts, top_k = trace.num_experts, trace.top_k
    m_comm = _check_placement(trace, ep=ep, max_devices=max_devices,
                              gpus_per_node=gpus_per_node)
    n_nodes = -(-ep // gpus_per_node)

    done_l = _layer_rows(trace, ep=ep, gpus_per_node=gpus_per_node, m_comm=m_comm,
                         max_devices=max_devices)
    rows = [row for row, _, _ in done_l]
    ndev_lt = [ndev_t for _, ndev_t, _ in done_l]
    nnode_lt = [nnode_t for _, _, nnode_t in done_l]

    index = pd.Index([int(i) for i in trace.metadata["layer_indices"]], name="layer")
    layers = pd.DataFrame(rows, index=index)

    def histogram(count_lt: list[np.ndarray], top: int) -> pd.DataFrame:
        n_tokens = max(trace.num_tokens, 1)
        hist_ln = [np.bincount(c, minlength=top + 1)[: top + 1] / n_tokens for c in count_lt]
        frame = pd.DataFrame(np.array(hist_ln).reshape(len(count_lt), top + 1), index=index,
                             columns=pd.Index(range(top + 1), name="reached"))
        return frame

    all_dev = np.concatenate(ndev_lt) if ndev_lt else np.zeros(0, dtype=np.int64)
    all_node = np.concatenate(nnode_lt) if nnode_lt else np.zeros(0, dtype=np.int64)

    def share_over(counts: np.ndarray) -> float | None:
        if max_devices is None:
            return None
        return float((counts > max_devices).mean()) if counts.size else math.nan

    return TraceStats(
        layers=layers,
        devices_reached=histogram(ndev_lt, min(top_k, ep)),
        nodes_reached=histogram(nnode_lt, min(top_k, n_nodes)),
        num_layers=trace.num_layers,
        num_tokens=trace.num_tokens,
        num_experts=n_experts,
        top_k=top_k,
        ep=ep,
        gpus_per_node=gpus_per_node,
        num_nodes=n_nodes,
        max_devices=max_devices,
        has_scores=trace.scores is not None,
        expert_load_cv=float(layers["expert_load_cv"].mean()),
        max_over_mean=float(layers["expert_max_over_mean"].max()),
        mean_devices_per_token=float(all_dev.mean()) if all_dev.size else math.nan,
        mean_nodes_per_token=float(all_node.mean()) if all_node.size else math.nan,
        share_over_m_devices=share_over(all_dev),
        share_over_m_nodes=share_over(all_node),
    )


# Short headers keep the per-layer table within a terminal's width.
_SHORT = {
    "assignments": "assigned", "expert_load_cv": "CV", "expert_max_over_mean": "max/mean",
    "device_load_cv": "dev CV", "device_max_over_mean": "dev max/mean", "exp_bal": "ExpBal",
    "f_max": "f max", "dev_bal": "DevBal", "f_dev_max": "f' max", "comm_bal": "CommBal",
    "f_comm_max": "f'' max", "mean_devices": "devs/tok", "mean_nodes": "nodes/tok",
    "share_over_m_devices": ">M devs", "share_over_m_nodes": ">M nodes",
}


def format_stats(stats: TraceStats) -> str:
    """A plain-text report: a summary, the per-layer table and the reach histograms."""
    s = stats
    limit = f", M = {s.max_devices}" if s.max_devices is not None else ""
    lines = [
        f"{s.num_layers} MoE layers x {s.num_tokens} tokens, E = {s.num_experts}, "
        f"K = {s.top_k}; EP = {s.ep} devices on {s.num_nodes} node(s) of "
        f"{s.gpus_per_node} GPUs{limit}",
        f"expert load CV {s.expert_load_cv:.3f} (mean of layers), "
        f"max/mean {s.max_over_mean:.3f} (worst layer)",
        f"devices per token {s.mean_devices_per_token:.2f}, "
        f"nodes per token {s.mean_nodes_per_token:.2f}",
    ]
    if s.max_devices is not None:
        lines.append(
            f"tokens beyond M = {s.max_devices}: {s.share_over_m_devices:.1%} of tokens reach "
            f"more devices, {s.share_over_m_nodes:.1%} more nodes")
    if not s.has_scores:
        lines.append("ExpBal, DevBal, CommBal need scores; this trace has none (-)")
    table = s.layers.rename(columns=_SHORT)
    lines += ["", "per layer:", table.to_string(float_format="{:.3f}".format, na_rep="-"),
              "(ExpBal = sum f_i P_i, DevBal = sum f'_d P'_d, CommBal = sum f''_d P''_d)"]
    lines += ["", "share of tokens by devices reached:",
              s.devices_reached.to_string(float_format="{:.3f}".format)]
    lines += ["", "share of tokens by nodes reached:",
              s.nodes_reached.to_string(float_format="{:.3f}".format)]
    return "\n".join(lines)


def capacity_drop_rates(trace: RoutingTrace, *, ep: int, capacity_factor: float) -> np.ndarray:
    """Per layer, the share of (token, expert) assignments that device-level dropping
    with ``capacity_factor`` would drop if the layer's tokens formed one batch over
    ``ep`` devices (lowest gate weight first; torch's dropping, imported lazily)."""
    from moesim.routing.dropping import Capacity, keep_within_capacity

    if not capacity_factor > 0:
        raise InputError(f"got {capacity_factor!r}", field="capacity_factor", allowed="> 0")
    rates = np.zeros(trace.num_layers)
    for layer in range(trace.num_layers):
        ids_tk = trace.expert_ids[layer].astype(np.int64)
        valid = ids_tk >= 0
        kept_tk = keep_within_capacity(
            ids_tk, trace.weights[layer],
            capacity=Capacity(factor=capacity_factor, drop_policy="probs", scope="device"),
            pos_t=np.arange(ids_tk.shape[0]), bins=ep, per_bin=trace.num_experts // ep,
            tokens_per_rank=ids_tk.shape[0])
        rates[layer] = 1.0 - kept_tk.sum() / max(valid.sum(), 1)
    return rates


# A trained model spreads its load: the 600-step sample traces have expert-load CVs of
# 0.4-0.5; an untrained or barely trained one sends most tokens to a few experts.
DEGENERATE_CV = 1.0
FEW_STEPS = 100


def trace_warnings(trace: RoutingTrace) -> list[str]:
    """Why a trace may not stand for a trained model's routing (empty when none)."""
    cv_l = []
    for ids in trace.expert_ids:  # layer by layer, a mapped layer's pages handed back
        cv_l.append(_cv(expert_loads(ids, trace.num_experts))[0])
        release_pages(ids)
    cv = float(np.mean(cv_l))
    training = (trace.metadata.get("source") or {}).get("training") or {}
    steps = training.get("steps")
    out = []
    if cv > DEGENERATE_CV or (isinstance(steps, int) and steps < FEW_STEPS):
        trained = f", from a model trained for {steps} steps" if steps is not None else ""
        out.append(f"the trace's expert loads are far from a trained model's: load CV "
                   f"{cv:.2f} (mean of layers{trained}; the 600-step sample traces have "
                   f"0.4-0.5), so replaying it exaggerates imbalance and drops")
    return out


def affinity_by_limit(trace: RoutingTrace, *, units: int) -> pd.DataFrame:
    """For every device limit ``M = 1 .. units`` (units: contiguous blocks of ``E / units``
    experts, one per GPU or node), the share of the unrestricted top-K affinity the
    trace's scores keep when re-routed under ``M``, and the units a token then reaches.

    The scores are re-routed by the trace's own gate when it is a DeepSeek gate (with its
    stored V3 bias), else by the plain group-limited top-K (``device-limited``); the
    torch routing layers do the routing (imported here, not at module load), a layer's
    tokens chunk by chunk."""
    from moesim.config.gates import SCENARIO_GATES
    from moesim.routing.source import units_reached
    from moesim.traces.gates import route_rows

    if trace.scores is None:
        raise InputError("the trace has no scores to re-route", field="trace",
                         allowed="a trace captured with scores")
    if units < 1 or trace.num_experts % units:
        raise InputError(f"{units} units do not split {trace.num_experts} experts",
                         field="units", allowed=f"divisors of {trace.num_experts}")
    gate = str((trace.metadata.get("gate") or {}).get("kind"))
    kind = gate if gate in SCENARIO_GATES else "device-limited"
    per_unit = trace.num_experts // units
    rows = []
    for limit in range(1, units + 1):
        if limit * per_unit < trace.top_k:
            continue
        chosen = free = reach = 0.0
        for layer in range(trace.num_layers):
            bias = None
            if kind == "group-limited-sigmoid" and trace.bias is not None:
                bias = trace.bias[layer]
            routed = route_rows(trace.scores[layer], kind=kind, top_k=trace.top_k,
                                group_size=per_unit, max_groups=limit, bias_e=bias)
            chosen += float(routed.picked_tk.sum())
            free += float(routed.top_tk.sum())
            reach += units_reached(routed.ids_tk, per_unit).mean() / trace.num_layers
        rows.append({"M": limit, "affinity_kept": chosen / free if free else 1.0,
                     "units_per_token": reach})
    return pd.DataFrame(rows).set_index("M")


def seed_balance(trace: RoutingTrace, scenario, gpus_per_domain: int) -> dict:
    """The DeepSeek-V2 balance terms of the replayed trace over the scenario's EP group
    (mean of layers; docs/routing.md section 2.4): ``expert_balance`` (sum f_i P_i),
    ``device_balance``, ``comm_balance``; empty without scores or when the GPUs do not
    divide the experts."""
    p, r = scenario.parallel, scenario.routing
    if trace.scores is None or trace.num_experts % p.ep:
        return {}
    # trace_stats' rows, without the nodes reached that these terms do not need
    gpus_per_node = min(p.ep, gpus_per_domain)
    m_comm = _check_placement(trace, ep=p.ep, max_devices=r.max_devices,
                              gpus_per_node=gpus_per_node)
    rows = pd.DataFrame([row for row, _, _ in _layer_rows(
        trace, ep=p.ep, gpus_per_node=gpus_per_node, m_comm=m_comm,
        max_devices=r.max_devices, nodes=False, rows_only=True)])
    terms = {"expert_balance": "exp_bal", "device_balance": "dev_bal",
             "comm_balance": "comm_bal"}
    return {key: float(rows[column].mean()) for key, column in terms.items()
            if np.isfinite(rows[column]).all()}
