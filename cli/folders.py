"""Reading a results folder back (``simulate``, ``sweep``, ``plan --out``): its JSON and
Parquet files are inputs like any other, because a folder may be damaged, half-copied or
hand-edited. Every problem is one :class:`InputError` naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moesim.errors import InputError
from moesim.inputs import load_json, read_text

_RERUN = "the file moesim wrote there; run the command again to rewrite it"


def read_json(path: Path, *, kind: type = dict) -> Any:
    """The JSON value of ``path`` (bounded like every input), which must be a ``kind``."""
    value = load_json(read_text(path, what="JSON file"), source=str(path))
    if not isinstance(value, kind):
        raise InputError(f"holds a JSON {type(value).__name__}, not a {kind.__name__}",
                         source=str(path), allowed=_RERUN)
    return value


def read_parquet(path: Path, *, columns: tuple[str, ...] = ()):
    """The table of ``path``; a file that is missing, not Parquet or lacks one of
    ``columns`` is one InputError."""
    import pandas as pd
    import pyarrow as pa

    try:
        frame = pd.read_parquet(path)
    except FileNotFoundError:
        raise InputError("missing", source=str(path), allowed=_RERUN) from None
    except (pa.ArrowException, OSError, ValueError, TypeError) as err:
        # pyarrow's errors carry the path and several sentences: one short clause here.
        reason = " ".join(str(err).split()).removeprefix(
            f"Could not open Parquet input source '{path}': ")[:160]
        raise InputError(f"not a readable Parquet table ({reason})", source=str(path),
                         allowed=_RERUN) from None
    for name in columns:
        if name not in frame.columns:
            raise InputError("missing column", field=name, source=str(path), allowed=_RERUN)
    return frame
