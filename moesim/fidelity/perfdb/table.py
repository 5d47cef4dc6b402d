"""The recorded-run table (schema ``moesim.recorded-table/1``): one row per measured
latency of one kernel or collective at one shape.

It is the long-form, Parquet companion of the YAML recorded runs
(``moesim.recorded-run/1``): where a YAML run holds a few published numbers with their
story, this table holds hundreds of thousands of measurements, e.g. the GEMM, MoE,
attention, MLA, NCCL and DeepEP latencies that :mod:`moesim.fidelity.perfdb.importer` reads
from aiconfigurator-core. Shape columns that an op does not have are ``<NA>``; string
columns that do not apply are ``""``. Latencies are in microseconds.

:func:`validate_table` checks a frame and returns it with the canonical column order
and dtypes; every mistake is one :class:`~moesim.errors.InputError` naming the source,
the column and what is allowed. :func:`table_to_parquet_bytes` and :func:`read_table`
convert to and from Parquet; the schema name and the provenance (JSON) travel in the
file's key-value metadata. Library functions never write files: the CLI does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from moesim.config.model import MAX_EXPERTS, MAX_TOP_K
from moesim.config.parallel import MAX_GPUS
from moesim.errors import InputError
from moesim.inputs import load_json

SCHEMA = "moesim.recorded-table/1"
SCHEMA_KEY = "moesim.schema"  # Parquet key-value metadata: the schema name
PROVENANCE_KEY = "moesim.provenance"  # Parquet key-value metadata: JSON provenance

OPS = ("gemm", "moe", "attention_context", "attention_generation", "mla_context",
       "mla_generation", "nccl", "deepep_normal", "deepep_ll")

NCCL_PHASES = ("all_gather", "all_reduce", "alltoall", "reduce_scatter")
# The phases each op may have; "" = the op has a single phase.
PHASES: dict[str, tuple[str, ...]] = {
    "gemm": ("",),
    "moe": ("", "context", "generation"),  # context/generation: the wide-EP DeepEP MoE tables
    "attention_context": ("",),
    "attention_generation": ("",),
    "mla_context": ("",),
    "mla_generation": ("",),
    "nccl": NCCL_PHASES,
    "deepep_normal": ("dispatch", "combine"),
    "deepep_ll": ("dispatch", "combine"),
}

ID_COLUMNS = ("id", "system", "op", "phase")
INT_COLUMNS = ("m", "n", "k", "tokens", "hidden", "inter", "topk", "experts", "moe_tp",
               "moe_ep", "batch", "isl", "step", "heads", "kv_heads", "head_dim", "window",
               "tp", "gpus", "bytes", "nodes", "sms")
# The largest size each column may hold: the scenario's limits (README "Limits") where
# there is one, else far beyond any measured kernel. The predictions allocate per expert
# and per GPU, so a row of 10**12 experts must stop here.
MAX_INTS: dict[str, int] = {
    "m": 2**24, "n": 2**20, "k": 2**20, "tokens": 2**24, "hidden": 65_536, "inter": 2**20,
    "topk": MAX_TOP_K, "experts": MAX_EXPERTS, "moe_tp": 65_536, "moe_ep": 65_536,
    "batch": 2**24, "isl": 2**24, "step": 2**24, "heads": 4096, "kv_heads": 4096,
    "head_dim": 65_536, "window": 2**24, "tp": 65_536, "gpus": MAX_GPUS, "bytes": 2**40,
    "nodes": 8192, "sms": 10_000,
}
TEXT_COLUMNS = ("dtype", "kv_dtype", "distribution", "kernel", "framework",
                "framework_version", "device", "file")
FLOAT_COLUMNS = ("latency_us", "tolerance")
STR_COLUMNS = ID_COLUMNS + TEXT_COLUMNS
COLUMNS = ID_COLUMNS + INT_COLUMNS + TEXT_COLUMNS + FLOAT_COLUMNS

# Canonical pandas dtypes ("str" is pandas' string dtype: pyarrow-backed in pandas 3).
DTYPES: dict[str, str] = {
    **{c: "str" for c in STR_COLUMNS},
    **{c: "Int64" for c in INT_COLUMNS},
    **{c: "float64" for c in FLOAT_COLUMNS},
}

_ALLOWED_COLUMNS = f"the columns of {SCHEMA}: " + ", ".join(COLUMNS)


def validate_table(df: pd.DataFrame, *, source: str) -> pd.DataFrame:
    """Check ``df`` against ``moesim.recorded-table/1``; return it with the canonical
    column order, dtypes and a fresh index. Raise :class:`InputError` naming
    ``source``, the column and what is allowed on the first problem found."""
    if not isinstance(df, pd.DataFrame):
        raise InputError(f"expected a table, got {type(df).__name__}", source=source)
    names = [str(c) for c in df.columns]
    for name in COLUMNS:
        if name not in names:
            raise InputError("missing column", field=name, allowed=_ALLOWED_COLUMNS,
                             source=source)
    for name in names:
        if name not in DTYPES:
            raise InputError("unknown column", field=name, allowed=_ALLOWED_COLUMNS,
                             source=source)
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise InputError("column appears twice", field=twice, allowed=_ALLOWED_COLUMNS,
                         source=source)

    ids = _strings(df["id"], "id", source)
    out: dict[str, pd.Series] = {"id": ids}
    for name in STR_COLUMNS[1:]:
        out[name] = _strings(df[name], name, source, ids)
    for name in INT_COLUMNS:
        out[name] = _ints(df[name], name, source, ids)
    for name in FLOAT_COLUMNS:
        out[name] = _floats(df[name], name, source)

    if (ids == "").any():
        raise InputError("empty id", field="id", allowed="a unique non-empty string",
                         source=source)
    twice = _duplicate(ids)
    if twice is not None:
        raise InputError(f"duplicate id {twice!r}", field="id",
                         allowed="a unique non-empty string", source=source)

    op = out["op"]
    bad = ~op.isin(OPS).to_numpy()
    if bad.any():
        raise InputError(f"unknown op {op[bad].iloc[0]!r} (row id {ids[bad].iloc[0]!r})",
                         field="op", allowed=", ".join(OPS), source=source)
    phase = out["phase"]
    for name, allowed in PHASES.items():
        bad = (op == name).to_numpy() & ~phase.isin(allowed).to_numpy()
        if bad.any():
            raise InputError(
                f"phase {phase[bad].iloc[0]!r} for op {name} (row id {ids[bad].iloc[0]!r})",
                field="phase", allowed=", ".join(repr(p) for p in allowed), source=source)

    _check_exchanges(out, ids, source)
    latency = out["latency_us"].to_numpy()
    bad = ~(np.isfinite(latency) & (latency > 0))
    if bad.any():
        raise InputError(f"latency_us is {latency[bad][0]!r} (row id {ids[bad].iloc[0]!r})",
                         field="latency_us", allowed="a finite number of microseconds > 0",
                         source=source)
    tolerance = out["tolerance"].to_numpy()
    bad = ~(np.isnan(tolerance) | ((tolerance > 0) & np.isfinite(tolerance)))
    if bad.any():
        raise InputError(f"tolerance is {float(tolerance[bad][0])} (row id {ids[bad].iloc[0]!r})",
                         field="tolerance",
                         allowed="a relative tolerance > 0 (|simulated - measured| / measured), "
                                 "or NaN for none",
                         source=source)
    return pd.DataFrame(out, columns=list(COLUMNS), copy=False)


def _check_exchanges(out: dict[str, pd.Series], ids: pd.Series, source: str) -> None:
    """A DeepEP row is predicted by drawing its routing on every rank: its picks must fit
    the scenario limit, or the draw would not fit in memory."""
    from moesim.config.feasibility import MAX_ASSIGNMENTS
    from moesim.fidelity.benchmarks import SAMPLED_TOKENS, sampled_picks
    from moesim.fidelity.perfdb.predict import GPUS_PER_NODE

    def sizes(name: str) -> np.ndarray:  # <NA> as NaN: predict() leaves such a row out
        return out[name].to_numpy(dtype="float64", na_value=np.nan)

    deepep = out["op"].isin(["deepep_normal", "deepep_ll"]).to_numpy()
    # The columns are bounded, so the product stays below 2**53: exact in float64.
    picks = sampled_picks(GPUS_PER_NODE * sizes("nodes"), sizes("tokens"), sizes("topk"))
    with np.errstate(invalid="ignore"):
        bad = deepep & (picks > MAX_ASSIGNMENTS)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{int(picks[i]):,} routed picks to draw (row id {ids.iloc[i]!r})", field="topk",
            allowed=f"{GPUS_PER_NODE} x nodes x min(tokens, {SAMPLED_TOKENS}) x topk at "
                    f"most {MAX_ASSIGNMENTS:,}", source=source)


def _duplicate(ids: pd.Series) -> str | None:
    """One value that occurs twice, or None. Sorting in Arrow takes a third of the
    memory and half the time of a hash table for millions of ids."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(ids) < 2:
        return None
    values = pa.chunked_array(pa.array(ids.array)).combine_chunks()
    ordered = values.take(pc.sort_indices(values))
    same = pc.equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1))
    if not pc.any(same).as_py():
        return None
    first = pc.index(same, True).as_py()
    return ordered[first].as_py()


def _reset(col: pd.Series) -> pd.Series:
    return col.reset_index(drop=True)


def _first_row(mask, ids: pd.Series | None) -> str:
    index = int(np.flatnonzero(np.asarray(mask))[0])
    if ids is None:
        return f"row {index}"
    return f"row id {ids.iloc[index]!r}"


def _strings(col: pd.Series, name: str, source: str, ids: pd.Series | None = None) -> pd.Series:
    col = _reset(col)
    allowed = 'a string ("" when not applicable)'
    missing = col.isna().to_numpy()
    if missing.any():
        raise InputError(f"missing value ({_first_row(missing, ids)})", field=name,
                         allowed=allowed, source=source)
    if col.dtype == "str":
        return col
    kind = pd.api.types.infer_dtype(col, skipna=True)
    if kind not in ("string", "empty"):
        raise InputError(f"values of type {kind}", field=name, allowed=allowed,
                         source=source)
    return col.astype("str")


def _ints(col: pd.Series, name: str, source: str, ids: pd.Series) -> pd.Series:
    col = _reset(col)
    allowed = "whole numbers >= 0, or <NA> where the op has no such size"
    if col.dtype == object:
        col = col.infer_objects()
    if col.dtype == "Int64":
        cast = col
    else:
        if pd.api.types.is_bool_dtype(col.dtype) or not (
                pd.api.types.is_numeric_dtype(col.dtype) or col.isna().all()):
            raise InputError(f"values of type {col.dtype}", field=name, allowed=allowed,
                             source=source)
        if pd.api.types.is_float_dtype(col.dtype):
            values = col.to_numpy(dtype="float64", na_value=np.nan)
            with np.errstate(invalid="ignore"):
                bad = ~np.isnan(values) & ~(np.isfinite(values) & (values == np.round(values))
                                            & (np.abs(values) < 2.0**63))
            if bad.any():
                raise InputError(f"{values[bad][0]} is not a whole number "
                                 f"({_first_row(bad, ids)})", field=name, allowed=allowed,
                                 source=source)
        try:
            cast = col.astype("Int64")
        except (TypeError, ValueError, OverflowError):
            raise InputError("not whole numbers", field=name, allowed=allowed,
                             source=source) from None
    negative = (cast < 0).fillna(False).to_numpy(dtype=bool)
    if negative.any():
        raise InputError(f"negative value ({_first_row(negative, ids)})", field=name,
                         allowed=allowed, source=source)
    most = MAX_INTS[name]
    huge = (cast > most).fillna(False).to_numpy(dtype=bool)
    if huge.any():
        raise InputError(f"{cast[huge].iloc[0]} ({_first_row(huge, ids)})", field=name,
                         allowed=f"whole numbers from 0 to {most:,}, or <NA>", source=source)
    return cast


def _floats(col: pd.Series, name: str, source: str) -> pd.Series:
    col = _reset(col)
    if col.dtype == object:
        col = col.infer_objects()
    if col.dtype == "float64":
        return col
    if pd.api.types.is_bool_dtype(col.dtype) or not (
            pd.api.types.is_numeric_dtype(col.dtype) or col.isna().all()):
        raise InputError(f"values of type {col.dtype}", field=name,
                         allowed="numbers (float64)", source=source)
    return pd.Series(col.to_numpy(dtype="float64", na_value=np.nan), name=name)


def table_to_parquet_bytes(df: pd.DataFrame, metadata: dict) -> bytes:
    """The validated table as Parquet bytes (zstd), with the schema name under
    ``moesim.schema`` and ``metadata`` as JSON under ``moesim.provenance``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    df = validate_table(df, source="table")
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[SCHEMA_KEY.encode()] = SCHEMA.encode()
    meta[PROVENANCE_KEY.encode()] = json.dumps(metadata, sort_keys=True).encode()
    table = table.replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def read_table(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """Read a ``moesim.recorded-table/1`` Parquet file: the validated table and its
    provenance dict. Raise :class:`InputError` naming the file if it cannot be read,
    is not Parquet, carries another schema or breaks the schema's rules."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    source = str(path)
    allowed = f"a {SCHEMA} Parquet file written by `moesim perfdb import`"
    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
    except OSError as err:  # pyarrow's I/O errors among them
        raise InputError(f"cannot read file ({err.strerror or _short(err)})",
                         source=source) from None
    except (pa.ArrowException, ValueError, TypeError) as err:
        raise InputError(f"not a Parquet file ({_short(err)})", allowed=allowed,
                         source=source) from None
    meta = schema.metadata or {}
    found = meta.get(SCHEMA_KEY.encode())
    if found != SCHEMA.encode():
        what = "missing" if found is None else repr(found.decode("utf-8", "replace"))
        raise InputError(f"schema is {what}", field=SCHEMA_KEY, allowed=SCHEMA, source=source)
    try:  # bounded: the metadata is as hostile as the rest of the file
        provenance = load_json(meta.get(PROVENANCE_KEY.encode(), b"{}"), source=source)
    except InputError as err:
        raise InputError(err.problem, field=PROVENANCE_KEY, allowed="a JSON object",
                         source=source) from None
    if not isinstance(provenance, dict):
        raise InputError("provenance is not a JSON object", field=PROVENANCE_KEY,
                         allowed="a JSON object", source=source)
    try:
        table = parquet.read()
    except (pa.ArrowException, OSError, ValueError, TypeError) as err:
        raise InputError(f"cannot read the table ({_short(err)})", source=source) from None
    return validate_table(_to_pandas(table, source), source=source), provenance


def _to_pandas(table, source: str) -> pd.DataFrame:
    """The Arrow table as a frame of its stored types. The pandas dtypes a writer put in
    the metadata are ignored: "Int64" over a float column of inf failed inside pyarrow;
    :func:`validate_table` casts and names the column and row instead."""
    import pyarrow as pa

    ints = {pa.int64(): pd.Int64Dtype()}.get
    try:
        return table.to_pandas(types_mapper=ints, ignore_metadata=True)
    except (pa.ArrowException, ValueError, TypeError, OverflowError) as err:
        for name in table.column_names:  # which column: convert them one at a time
            try:
                table.select([name]).to_pandas(types_mapper=ints, ignore_metadata=True)
            except (pa.ArrowException, ValueError, TypeError, OverflowError):
                raise InputError(f"cannot convert the column ({_short(err)})", field=name,
                                 allowed=_ALLOWED_COLUMNS, source=source) from None
        raise InputError(f"cannot convert the table ({_short(err)})", source=source) from None


def _short(err: Exception) -> str:
    return " ".join(str(err).split())[:200]
