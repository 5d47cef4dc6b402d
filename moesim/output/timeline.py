"""Chrome-trace (Perfetto) view of a simulated step: one process per GPU, one thread
per stream, one complete event per op."""

from __future__ import annotations

import numpy as np
import pandas as pd

_TID = {"compute": 1, "comm": 2}


def chrome_trace(spans: pd.DataFrame, *, max_gpus: int | None = None) -> dict:
    """Trace-event JSON object for ``spans`` (the first ``max_gpus`` GPUs, or all)."""
    if max_gpus is not None:
        spans = spans[spans["gpu"] < max_gpus]
    gpus = np.unique(spans["gpu"].to_numpy())
    events: list[dict] = []
    for gpu in gpus:
        events.append({"name": "process_name", "ph": "M", "pid": int(gpu),
                       "args": {"name": f"GPU {gpu}"}})
        for stream, tid in _TID.items():
            events.append({"name": "thread_name", "ph": "M", "pid": int(gpu), "tid": tid,
                           "args": {"name": stream}})
    start_us = spans["start_s"].to_numpy() * 1e6
    dur_us = (spans["end_s"].to_numpy() - spans["start_s"].to_numpy()) * 1e6
    wait_us = (spans["start_s"].to_numpy() - spans["arrive_s"].to_numpy()) * 1e6
    columns = zip(spans["gpu"].to_numpy(), spans["phase"].astype(str).to_numpy(),
                  spans["stream"].astype(str).to_numpy(), spans["backward"].to_numpy(),
                  spans["layer"].to_numpy(), spans["microbatch"].to_numpy(),
                  start_us, dur_us, wait_us, strict=True)
    for gpu, phase, stream, backward, layer, mb, ts, dur, wait in columns:
        args = {"layer": int(layer), "microbatch": int(mb)}
        if stream == "comm":
            args["waited_for_peers_us"] = round(float(wait), 3)
        events.append({
            "name": f"{phase}{' bwd' if backward else ''}", "cat": stream, "ph": "X",
            "pid": int(gpu), "tid": _TID[stream], "ts": round(float(ts), 3),
            "dur": round(float(dur), 3), "args": args,
        })
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def pipeline_trace(items: pd.DataFrame) -> dict:
    """Trace-event JSON object of a whole training step's schedule (``SimResult.pipeline``):
    one process per pipeline stage, one slice per schedule item (``F``, ``B``, ``W``,
    ``BW``, ``FB``) named by its micro-batch and chunk."""
    stages = np.unique(items["stage"].to_numpy())
    events: list[dict] = [{"name": "process_name", "ph": "M", "pid": int(stage),
                           "args": {"name": f"stage {stage}"}} for stage in stages]
    for row in items.itertuples(index=False):
        name = f"{row.kind} mb{row.microbatch} c{row.chunk}"
        if row.kind == "FB":
            name += f" + B mb{row.bwd_microbatch} c{row.bwd_chunk}"
        events.append({"name": name, "cat": row.kind, "ph": "X", "pid": int(row.stage),
                       "tid": 0, "ts": round(float(row.start_s) * 1e6, 3),
                       "dur": round(float(row.end_s - row.start_s) * 1e6, 3),
                       "args": {"microbatch": int(row.microbatch), "chunk": int(row.chunk)}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}
