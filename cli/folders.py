"""Reading a results folder back (``simulate``, ``sweep``, ``plan --out``): its JSON and
Parquet files are inputs like any other, because a folder may be damaged, half-copied or
hand-edited. Every problem is one :class:`InputError` naming the file."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moesim.errors import InputError
from moesim.inputs import MAX_RESULT_MAGNITUDE, load_json, read_text

RERUN = "the file moesim wrote there; run the command again to rewrite it"


def read_json(path: Path, *, kind: type = dict) -> Any:
    """The JSON value of ``path`` (bounded like every input), which must be a ``kind``."""
    value = load_json(read_text(path, what="JSON file"), source=str(path))
    if not isinstance(value, kind):
        raise InputError(f"holds a JSON {type(value).__name__}, not a {kind.__name__}",
                         source=str(path), allowed=RERUN)
    return value


_KINDS = {"i": "integers", "f": "finite numbers up to 1e100", "b": "true or false", "T": "text",
          "n": "numbers or empty", "p": "numbers >= 0 or empty", "t": "text or empty",
          "B": "true, false or empty"}


def read_parquet(path: Path, *, columns: Mapping[str, str] | tuple[str, ...] = ()):
    """The table of ``path``; a file that is missing or not Parquet, or that lacks one of
    ``columns`` or holds another kind of value in it (a mapping of names to kinds, as
    :data:`moesim.output.tables.TABLE_COLUMNS`; names alone: any kind), is one
    InputError."""
    import pandas as pd
    import pyarrow as pa

    try:
        frame = pd.read_parquet(path)
    except FileNotFoundError:
        raise InputError("missing", source=str(path), allowed=RERUN) from None
    except (pa.ArrowException, OSError, ValueError, TypeError) as err:
        # pyarrow's errors carry the path and several sentences: one short clause here.
        reason = " ".join(str(err).split()).removeprefix(
            f"Could not open Parquet input source '{path}': ")[:160]
        raise InputError(f"not a readable Parquet table ({reason})", source=str(path),
                         allowed=RERUN) from None
    kinds = columns if isinstance(columns, Mapping) else dict.fromkeys(columns, "")
    for name in kinds:
        if name not in frame.columns:
            raise InputError("missing column", field=name, source=str(path), allowed=RERUN)
    check_columns(frame, kinds, source=path)
    return frame


def check_columns(frame, kinds: Mapping[str, str], *, source: Path) -> None:
    """InputError unless each column ``kinds`` names that ``frame`` has holds values of
    its kind: ``i`` integers, ``f`` finite numbers, ``b`` booleans, ``T`` text (or
    categories of text); ``n``, ``t`` and ``B`` are numbers, text and booleans where a
    row may have none (a failed sweep point), ``p`` such numbers >= 0. "" is any kind."""
    for name, kind in kinds.items():
        if kind and name in frame.columns and not _holds(frame[name], kind):
            raise InputError(f"a column of {frame[name].dtype} values", field=name,
                             source=str(source), allowed=f"{_KINDS[kind]}; {RERUN}")


def _holds(column, kind: str) -> bool:
    """Whether every value of ``column`` (a pandas Series) is of ``kind``."""
    import numpy as np
    import pandas as pd

    dtype = column.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        return kind in "Tt" and all(isinstance(c, str) for c in column.cat.categories)
    is_bool = isinstance(dtype, np.dtype) and dtype.kind == "b"
    missing = column.isna() if kind in "tB" else np.zeros(len(column), dtype=bool)
    if kind in "Tt":
        return all(m or isinstance(v, str) for v, m in zip(column, missing, strict=True))
    if kind in "bB":
        return is_bool or (kind == "B" and all(
            m or isinstance(v, (bool, np.bool_)) for v, m in zip(column, missing, strict=True)))
    if not isinstance(dtype, np.dtype) or dtype.kind not in ("iu" if kind == "i" else "iuf"):
        return False
    values = column.to_numpy(dtype=float)
    if kind == "f":
        return bool((np.abs(values) <= MAX_RESULT_MAGNITUDE).all())  # False for NaN
    return kind != "p" or not (values < 0).any()  # n: NaN stands for a failed point's none
