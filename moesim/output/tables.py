"""The spans, links and experts tables of a SimResult."""

from __future__ import annotations

import numpy as np
import pandas as pd

from moesim.comm.traffic import LinkLoads
from moesim.config.scenario import Scenario
from moesim.engine.program import Op
from moesim.engine.simpy_engine import Timeline

# Each table's columns and their kinds (``i`` integer, ``f`` finite float, ``b`` bool, ``T``
# text or categories of text): what a results folder read back must hold.
TABLE_COLUMNS: dict[str, dict[str, str]] = {
    "spans": {"gpu": "i", "ep_group": "i", "layer": "i", "microbatch": "i", "phase": "T",
              "stream": "T", "backward": "b", "arrive_s": "f", "start_s": "f", "end_s": "f"},
    "links": {"link": "T", "src": "T", "dst": "T", "kind": "T", "bytes": "f", "busy_s": "f",
              "utilization": "f"},
    "experts": {"layer": "i", "expert": "i", "tokens": "i", "dropped": "i"},
}


def plain_records(frame: pd.DataFrame) -> list[dict]:
    """``frame``'s rows as plain dicts, a missing number (NaN) as ``None`` (JSON's null)."""
    return [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
            for row in frame.to_dict(orient="records")]


def _categorical(names_o: np.ndarray, index: np.ndarray) -> pd.Categorical:
    """``pd.Categorical(names_o[index])``, built from codes: factorizing one string per
    (op, GPU) took most of a sweep point's table time."""
    categories, codes_o = np.unique(names_o, return_inverse=True)
    return pd.Categorical.from_codes(codes_o[index], categories=categories)


def spans_table(ops: list[Op], timeline: Timeline, *, ep: int) -> pd.DataFrame:
    n_ops, n_gpus = timeline.start_og.shape
    op_index = np.repeat(np.arange(n_ops), n_gpus)
    gpu = np.tile(np.arange(n_gpus), n_ops)
    col = {name: np.array([getattr(op, name) for op in ops]) for name in
           ("layer", "microbatch", "phase", "stream", "backward")}
    return pd.DataFrame({
        "gpu": gpu.astype(np.int32),
        "ep_group": (gpu // ep).astype(np.int32),
        "layer": col["layer"][op_index].astype(np.int32),
        "microbatch": col["microbatch"][op_index].astype(np.int16),
        "phase": _categorical(col["phase"], op_index),
        "stream": _categorical(col["stream"], op_index),
        "backward": col["backward"][op_index],
        "arrive_s": timeline.arrive_og.ravel(),
        "start_s": timeline.start_og.ravel(),
        "end_s": timeline.end_og.ravel(),
    })


def step_link_loads(ops: list[Op], costs, keys_l, first_dense_layers: int) -> LinkLoads | None:
    """Bytes per link summed over every exchange of the step."""
    total = None
    for op in ops:
        if not op.collective:
            continue
        layer_costs = costs[keys_l[op.layer - first_dense_layers]]
        loads = layer_costs.exchanges[op.microbatch, op.phase, op.backward].loads
        total = loads if total is None else total + loads
    return total


def _edge_rows(graph, u: str, v: str, nbytes: float, rows: list) -> None:
    attrs = graph.edges[u, v]
    achievable = attrs["bandwidth"] * attrs["efficiency"]
    rows.append((f"{u}->{v}", u, v, attrs["kind"], nbytes, nbytes / achievable))


def links_table(scenario: Scenario, topology, ops: list[Op], costs, keys_l) -> pd.DataFrame:
    """Bytes and busy time of every directed NVLink, NIC and uplink edge."""
    total = step_link_loads(ops, costs, keys_l, scenario.model.first_dense_layers)
    n = topology.n_gpus
    if total is None:
        total = LinkLoads.zeros(n, topology.n_leaves)
    graph = topology.graph
    rows: list[tuple] = []
    for g in range(n):
        switch = f"nvswitch{topology.domain_of[g]}"
        _edge_rows(graph, f"gpu{g}", switch, total.nvl_out[g], rows)
        _edge_rows(graph, switch, f"gpu{g}", total.nvl_in[g], rows)
        if topology.leaf_of[g] >= 0:
            leaf = f"leaf{topology.leaf_of[g]}"
            _edge_rows(graph, f"gpu{g}", leaf, total.nic_out[g], rows)
            _edge_rows(graph, leaf, f"gpu{g}", total.nic_in[g], rows)
    for leaf in range(topology.n_leaves):
        name = f"leaf{leaf}"
        spines = [s for s in graph.successors(name) if graph.edges[name, s]["kind"] == "uplink"]
        bw = np.array([graph.edges[name, s]["bandwidth"] for s in spines], dtype=float)
        share = bw / bw.sum() if spines else bw  # ECMP spreads in proportion to capacity
        for spine, frac in zip(spines, share, strict=True):
            _edge_rows(graph, name, spine, total.up[leaf] * frac, rows)
            _edge_rows(graph, spine, name, total.down[leaf] * frac, rows)
    return pd.DataFrame(rows, columns=["link", "src", "dst", "kind", "bytes", "busy_s"])


def experts_table(scenario: Scenario, costs, keys_l) -> pd.DataFrame:
    """Forward (token, expert) assignments computed and dropped per MoE layer."""
    m = scenario.model
    layer_l = m.first_dense_layers + np.arange(m.moe_layers)
    return pd.DataFrame({
        "layer": np.repeat(layer_l, m.routed_experts).astype(np.int32),
        "expert": np.tile(np.arange(m.routed_experts, dtype=np.int32), m.moe_layers),
        "tokens": np.concatenate([costs[k].kept_e for k in keys_l]).astype(np.int64),
        "dropped": np.concatenate([costs[k].dropped_e for k in keys_l]).astype(np.int64),
    })
