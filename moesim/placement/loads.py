"""Expert loads from a file: one row per MoE layer, one column per logical expert."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moesim.config.model import MAX_EXPERTS, MAX_LAYERS
from moesim.errors import InputError
from moesim.inputs import read_text


def read_loads(path: str | Path, *, experts: int | None = None) -> np.ndarray:
    """``loads_le`` [L, E] from a CSV file without a header (tokens, or any non-negative
    load per expert); ``experts`` is the column count it must have."""
    source = str(path)
    text = read_text(path, what="loads CSV file")
    rows = [line for line in text.splitlines() if line.strip()]
    if not rows:
        raise InputError("no rows", source=source, allowed="one row per MoE layer")
    _check_size(rows, source)
    try:
        loads = np.array([[float(v) for v in row.split(",")] for row in rows])
    except ValueError:
        raise InputError("rows of different lengths or values that are not numbers",
                         source=source, allowed="numbers, one column per expert") from None
    if experts is not None and loads.shape[1] != experts:
        raise InputError(f"{loads.shape[1]} columns", source=source,
                         allowed=f"{experts} (one per logical expert)")
    if not np.isfinite(loads).all() or (loads < 0).any():
        raise InputError("a load that is negative or not finite", source=source,
                         allowed="finite numbers >= 0")
    return loads


def _check_size(rows: list[str], source: str) -> None:
    """The scenario's own limits (README "Limits"), checked before a number is parsed, so
    that a 16 MiB file of one-digit loads never becomes millions of Python floats."""
    if len(rows) > MAX_LAYERS:
        raise InputError(f"{len(rows):,} rows", source=source,
                         allowed=f"at most {MAX_LAYERS:,} rows, one per MoE layer")
    columns = max(row.count(",") for row in rows) + 1
    if columns > MAX_EXPERTS:
        raise InputError(f"{columns:,} columns", source=source,
                         allowed=f"at most {MAX_EXPERTS:,} columns, one per logical expert")
