"""One sweep point -> one row: simulate it once per seed, average the summaries.

A row holds the point's number, axis values and key hash, the resolved fields a reader
looks for first (``KEY_FIELDS``), every summary key (the mean over seeds for numbers,
the memory breakdown spread over ``memory_<part>_gib`` columns), the spread over seeds
of the headline numbers (``<key>_std``) and ``error``: ``None``, or why the point has no
results (an invalid scenario, a failed run). Rows depend only on the point, so local
processes and Dask give the same rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

from moesim.sweep.spec import SweepPoint

SPREAD_KEYS = ("step_time_s", "tokens_per_s", "tokens_per_s_per_gpu", "ttft_s", "tpot_s")


def key_fields(scenario: dict) -> dict[str, Any]:
    """The resolved fields a sweep or plan table shows beside its axes (``None`` where
    unset: M, the capacity factor, the serving batch)."""
    m, p, r = scenario["model"], scenario["parallel"], scenario["routing"]
    pl, sv = scenario["placement"], scenario.get("serving")
    gpus = p["gpus"] if p["gpus"] is not None else p["ep"] * p["moe_tp"]
    return {
        "mode": scenario["mode"],
        "model": m["name"],
        "gpu": scenario["hardware"]["name"],
        "topology": scenario["topology"],
        "network": scenario["network"],
        "gpus": gpus,
        "ep": p["ep"],
        "max_devices": r["max_devices"],
        "limit_scope": r["limit_scope"],
        "capacity_factor": r["capacity_factor"],
        "routed_experts": m["routed_experts"],
        "top_k": m["top_k"],
        "moe_intermediate_size": m["moe_intermediate_size"],
        "placement": pl["policy"],
        "redundant_experts": pl["redundant_experts"],
        "balance": r["balance"],
        "dispatch_kernel": p["dispatch_kernel"],
        "tokens_per_gpu": p["tokens_per_gpu"],
        "serving_batch": None if sv is None else sv["batch"],
    }


def _flat(summary: dict) -> dict[str, Any]:
    """The summary's scalar keys, the memory breakdown as one column per part, and
    ``tokens_per_s_per_gpu``; lists (the balance series) stay in the run's own files."""
    out = {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}
    for part, gib in summary.get("memory_breakdown_gib", {}).items():
        out[f"memory_{part}_gib"] = gib
    out["tokens_per_s_per_gpu"] = summary["tokens_per_s"] / summary["gpus"]
    if "tpot_s" in summary:  # decode: each request gets one token per step
        out["tokens_per_s_per_user"] = 1.0 / summary["tpot_s"]
    return out


def _mean(rows: list[dict]) -> dict[str, Any]:
    """Mean over seeds of every number (ints stay ints when all seeds agree), spreads."""
    out: dict[str, Any] = {}
    for key, first in rows[0].items():
        values = [r[key] for r in rows]
        if isinstance(first, bool) or not isinstance(first, (int, float)):
            out[key] = first if all(v == first for v in values) else "varies"
        elif isinstance(first, int) and all(v == first for v in values):
            out[key] = first
        else:
            out[key] = math.fsum(values) / len(values)
    for key in SPREAD_KEYS:
        if key in rows[0]:
            values = [r[key] for r in rows]
            mean = math.fsum(values) / len(values)
            out[f"{key}_std"] = (math.sqrt(math.fsum((v - mean) ** 2 for v in values)
                                           / (len(values) - 1)) if len(values) > 1 else 0.0)
    return out


def simulate_point(point: SweepPoint) -> dict[str, Any]:
    """The summary row of ``point``: its scenario simulated with seeds ``seed .. seed +
    seeds - 1``; never raises for a point that fails (the row's ``error`` says why)."""
    row: dict[str, Any] = {"point": point.index, **point.values, "scenario_hash": point.key,
                           "seeds": point.seeds}
    if point.scenario is None:
        return row | {"error": point.error}
    row |= key_fields(point.scenario)
    try:
        from moesim.config.loading import scenario_from_dict
        from moesim.simulation import simulate

        base = scenario_from_dict(point.scenario, source=f"point {point.index}")
        runs = [_flat(simulate(dataclasses.replace(base, seed=base.seed + i)).summary)
                for i in range(point.seeds)]
    except Exception as err:  # noqa: BLE001 - a failed point is a row, the sweep goes on
        return row | {"error": f"{type(err).__name__}: {err}"}
    return row | _mean(runs) | {"error": None}


def results_frame(rows: Iterable[dict[str, Any]]):
    """Rows -> a DataFrame ordered by point, with columns Parquet can store: a column of
    numbers and ``None`` stays numeric; any other mix becomes text (JSON for lists and
    mappings)."""
    import json

    import pandas as pd

    frame = pd.DataFrame(sorted(rows, key=lambda r: r["point"]))
    for column in frame.columns:
        values = [v for v in frame[column] if v is not None and not _is_nan(v)]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        boolean = all(isinstance(v, bool) for v in values)
        if values and not numeric and not boolean and not all(isinstance(v, str)
                                                                 for v in values):
            frame[column] = [None if v is None else v if isinstance(v, str)
                             else json.dumps(v) for v in frame[column]]
    return frame


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)
