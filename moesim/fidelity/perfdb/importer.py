"""Import the GPU kernel measurements shipped by aiconfigurator-core into a
``moesim.recorded-table/1`` table.

aiconfigurator-core (NVIDIA, Apache-2.0) keeps its measurements as Parquet files laid
out as ``systems/data/<system>/<op folder>/<framework>/<version>/<table>.parquet``.
:func:`import_perfdb` reads the tables listed in :data:`TABLES`, maps their columns to
the recorded-table schema (:mod:`moesim.fidelity.perfdb.table`), converts milliseconds to
microseconds, splits each DeepEP row into a dispatch and a combine row and drops
measurements whose latency is not a finite number > 0 (counted in the provenance).
It reads only the files that exist: tables that a version folder merely declares as
reused from another version (``reuse.yaml``) are not duplicated.

The package is located without importing it (it loads a compiled extension).
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from moesim.errors import InputError
from moesim.fidelity.perfdb.table import (
    COLUMNS,
    DTYPES,
    INT_COLUMNS,
    OPS,
    STR_COLUMNS,
    TEXT_COLUMNS,
)

PACKAGE = "aiconfigurator-core"
MODULE = "aiconfigurator_core"
INSTALL_HINT = ("pip install 'moesim[perfdb]' (aiconfigurator-core==0.12.0), "
                "or --root PATH to its systems/data folder")


@dataclass(frozen=True)
class TableSpec:
    """How one aiconfigurator table maps onto the recorded-table schema."""

    folder: str  # the op folder under <system>/
    table: str  # file name without .parquet
    op: str
    ints: dict[str, str]  # our column -> their column
    texts: dict[str, str]  # our column -> their column
    phases: tuple[str, ...] = ("",)  # one output row per source row and phase
    # Latency: their column in ms (one phase), or per phase the µs columns to add up.
    latency_ms: str | None = "latency"
    latency_us: dict[str, tuple[str, ...]] = field(default_factory=dict)
    phase_column: str | None = None  # the phase comes from this column (nccl op_name)
    phase_ints: dict[str, dict[str, str]] = field(default_factory=dict)
    optional: frozenset[str] = frozenset()  # their columns that may be absent

    def required(self) -> set[str]:
        cols = set(self.ints.values()) | set(self.texts.values())
        cols |= {c for per in self.phase_ints.values() for c in per.values()}
        cols |= {c for cs in self.latency_us.values() for c in cs}
        if self.latency_ms:
            cols.add(self.latency_ms)
        if self.phase_column:
            cols.add(self.phase_column)
        return cols - self.optional


_COMMON_TEXT = {"kernel": "kernel_source", "device": "device"}
_OPTIONAL = frozenset({"kernel_source", "device"})
_MOE_INTS = {"tokens": "num_tokens", "hidden": "hidden_size", "inter": "inter_size",
             "topk": "topk", "experts": "num_experts", "moe_tp": "moe_tp_size",
             "moe_ep": "moe_ep_size"}
_MOE_TEXT = {"dtype": "moe_dtype", "distribution": "distribution", **_COMMON_TEXT}
_ATTN_INTS = {"batch": "batch_size", "isl": "isl", "step": "step", "heads": "num_heads",
              "kv_heads": "num_key_value_heads", "head_dim": "head_dim",
              "window": "window_size"}
_ATTN_TEXT = {"dtype": "attn_dtype", "kv_dtype": "kv_cache_dtype", **_COMMON_TEXT}
_MLA_INTS = {"heads": "num_heads", "batch": "batch_size", "isl": "isl", "tp": "tp_size",
             "step": "step"}
_MLA_TEXT = {"dtype": "mla_dtype", "kv_dtype": "kv_cache_dtype", **_COMMON_TEXT}
_DEEPEP_INTS = {"nodes": "node_num", "hidden": "hidden_size", "tokens": "num_token",
                "topk": "num_topk", "experts": "num_experts"}

TABLES: tuple[TableSpec, ...] = (
    TableSpec("gemm", "gemm_perf", "gemm", {"m": "m", "n": "n", "k": "k"},
              {"dtype": "gemm_dtype", **_COMMON_TEXT}, optional=_OPTIONAL),
    TableSpec("moe", "moe_perf", "moe", _MOE_INTS, _MOE_TEXT, optional=_OPTIONAL),
    TableSpec("moe", "wideep_context_moe_perf", "moe", _MOE_INTS, _MOE_TEXT,
              phases=("context",), optional=_OPTIONAL),
    TableSpec("moe", "wideep_generation_moe_perf", "moe", _MOE_INTS, _MOE_TEXT,
              phases=("generation",), optional=_OPTIONAL),
    # Older attention tables have no window_size column: <NA> there.
    TableSpec("attention", "context_attention_perf", "attention_context", _ATTN_INTS,
              _ATTN_TEXT, optional=_OPTIONAL | {"window_size"}),
    TableSpec("attention", "generation_attention_perf", "attention_generation", _ATTN_INTS,
              _ATTN_TEXT, optional=_OPTIONAL | {"window_size"}),
    TableSpec("mla", "context_mla_perf", "mla_context", _MLA_INTS, _MLA_TEXT,
              optional=_OPTIONAL),
    TableSpec("mla", "generation_mla_perf", "mla_generation", _MLA_INTS, _MLA_TEXT,
              optional=_OPTIONAL),
    TableSpec("comm", "nccl_perf", "nccl", {"gpus": "num_gpus", "bytes": "message_size"},
              {"dtype": "nccl_dtype", **_COMMON_TEXT}, phase_column="op_name",
              optional=_OPTIONAL),
    TableSpec("comm", "wideep_deepep_normal_perf", "deepep_normal", _DEEPEP_INTS,
              dict(_COMMON_TEXT), phases=("dispatch", "combine"), latency_ms=None,
              latency_us={"dispatch": ("dispatch_transmit_us", "dispatch_notify_us"),
                          "combine": ("combine_transmit_us", "combine_notify_us")},
              phase_ints={"dispatch": {"sms": "dispatch_sms"},
                          "combine": {"sms": "combine_sms"}},
              optional=_OPTIONAL),
    TableSpec("comm", "wideep_deepep_ll_perf", "deepep_ll", _DEEPEP_INTS,
              dict(_COMMON_TEXT), phases=("dispatch", "combine"), latency_ms=None,
              latency_us={"dispatch": ("dispatch_avg_t_us",),
                          "combine": ("combine_avg_t_us",)},
              optional=_OPTIONAL),
)


def find_data_root() -> Path:
    """The ``systems/data`` folder of the installed aiconfigurator-core, found without
    importing the package (it loads a compiled extension)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(MODULE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise InputError(f"{PACKAGE} is not installed", field="--root", allowed=INSTALL_HINT)
    for location in locations:
        data = Path(location) / "systems" / "data"
        if data.is_dir():
            return data
    raise InputError(f"{PACKAGE} at {locations[0]} has no systems/data folder",
                     field="--root", allowed=INSTALL_HINT)


def package_version(root: Path) -> str:
    """The aiconfigurator-core version that ``root`` (its systems/data folder) belongs
    to: from the dist-info METADATA beside the package, else from a version file in
    the package, else "unknown"."""
    root = Path(root)
    package = root.parent.parent if root.parent.name == "systems" else root
    for dist in sorted(package.parent.glob(f"{MODULE}-*.dist-info")):
        try:
            text = (dist / "METADATA").read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        match = re.search(r"^Version:\s*(\S+)", text, flags=re.M)
        if match:
            return match.group(1)
    for name in ("_version.py", "version.py", "VERSION", "version.txt"):
        try:
            text = (package / name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        match = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", text)
        if match:
            return match.group(1)
        if name in ("VERSION", "version.txt") and text.strip():
            return text.strip().split()[0]
    return "unknown"


def resolve_root(root: str | Path | None) -> Path:
    """``root`` as the data folder: the installed package's when None; a package
    folder (holding systems/data) is accepted too."""
    if root is None:
        return find_data_root()
    path = Path(root)
    if not path.is_dir():
        raise InputError("not a folder", field="--root", source=str(path),
                         allowed="the systems/data folder of aiconfigurator-core")
    if (path / "systems" / "data").is_dir():
        path = path / "systems" / "data"
    return path


@dataclass(frozen=True)
class _Found:
    path: Path
    system: str
    framework: str
    version: str
    spec: TableSpec

    @property
    def rel(self) -> str:
        return (f"{self.system}/{self.spec.folder}/{self.framework}/{self.version}/"
                f"{self.spec.table}.parquet")


def _discover(root: Path) -> list[_Found]:
    found = []
    for system in sorted(p for p in root.iterdir() if p.is_dir()):
        for spec in TABLES:
            folder = system / spec.folder
            if not folder.is_dir():
                continue
            for path in sorted(folder.glob(f"*/*/{spec.table}.parquet")):
                if path.is_file():
                    found.append(_Found(path, system.name, path.parent.parent.name,
                                        path.parent.name, spec))
    return found


def _check_filter(values, known, flag: str, present=None) -> set[str] | None:
    """The filter values as a set (None = no filter); an unknown one is an InputError
    listing ``known``. ``present``: values that exist but hold no table we import."""
    if values is None:
        return None
    values = [values] if isinstance(values, str) else list(values)
    for value in values:
        if value not in known:
            problem = (f"{value!r} holds none of the tables moesim imports"
                       if present is not None and value in present
                       else f"unknown value {value!r}")
            raise InputError(problem, field=flag, allowed=", ".join(sorted(known)))
    return set(values)


def import_perfdb(root: str | Path | None = None, *, systems=None, ops=None,
                  frameworks=None) -> tuple[pd.DataFrame, dict]:
    """Read aiconfigurator-core's measurements under ``root`` (its systems/data folder;
    None = the installed package's) into a ``moesim.recorded-table/1`` table.

    ``systems`` (folder names such as ``h100_sxm``), ``ops`` (:data:`OPS`) and
    ``frameworks`` (folder names: ``trtllm``, ``sglang``, ``vllm``, ``nccl``) narrow
    what is read; an unknown value is an :class:`InputError` listing what exists.
    Returns the table and its provenance (package, version, root, date, files read
    with their row counts, frameworks and versions).
    """

    data = resolve_root(root)
    everything = _discover(data)
    all_systems = sorted(p.name for p in data.iterdir() if p.is_dir())
    if not everything:
        raise InputError(f"no {PACKAGE} tables under this folder", field="--root",
                         source=str(data),
                         allowed="the systems/data folder of aiconfigurator-core, laid out "
                                 "as <system>/<op>/<framework>/<version>/<table>.parquet")
    want_systems = _check_filter(systems, {f.system for f in everything}, "--system",
                                 present=set(all_systems))
    want_ops = _check_filter(ops, set(OPS), "--op")
    want_frameworks = _check_filter(frameworks, {f.framework for f in everything},
                                    "--framework")

    def keep(found: _Found, *, op: bool = True, framework: bool = True) -> bool:
        return ((want_systems is None or found.system in want_systems)
                and (not op or want_ops is None or found.spec.op in want_ops)
                and (not framework or want_frameworks is None
                     or found.framework in want_frameworks))

    chosen = [f for f in everything if keep(f)]
    if not chosen:
        ops_there = {f.spec.op for f in everything if keep(f, op=False)}
        if ops_there:
            raise InputError("no table matches the filters", field="--op",
                             allowed="for these systems and frameworks: "
                                     + ", ".join(op for op in OPS if op in ops_there))
        raise InputError("no table matches the filters", field="--framework",
                         allowed="for these systems and ops: " + ", ".join(sorted(
                             {f.framework for f in everything if keep(f, framework=False)})))

    # Sizes are known from the Parquet footers: fill preallocated columns file by file,
    # so that peak memory stays near the size of the result.
    bound = sum(_source_rows(f) * len(f.spec.phases) for f in chosen)
    builder = _Builder(bound)
    files = {}
    for found in chosen:
        before = builder.rows
        read, dropped = _convert(found, builder)
        files[found.rel] = {"rows": read, "imported": builder.rows - before,
                            "dropped": dropped}
    frame = builder.frame()

    frameworks_seen: dict[str, list[str]] = {}
    for found in chosen:
        versions = frameworks_seen.setdefault(found.framework, [])
        if found.version not in versions:
            versions.append(found.version)
    provenance = {
        "package": PACKAGE,
        "package_version": package_version(data),
        "root": str(data),
        "imported_at": datetime.date.today().isoformat(),
        "systems": sorted({f.system for f in chosen}),
        "ops": [op for op in OPS if any(f.spec.op == op for f in chosen)],
        "frameworks": {k: sorted(v) for k, v in sorted(frameworks_seen.items())},
        "rows": int(len(frame)),
        "dropped_rows": int(sum(f["dropped"] for f in files.values())),
        "files": files,
    }
    return frame, provenance


def _source_rows(found: _Found) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(found.path).num_rows
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"cannot read the table ({' '.join(str(err).split())[:200]})",
                         source=found.rel) from None


class _Builder:
    """The columns of the table under construction: numpy arrays for the numbers
    (``bound`` rows at most), lists of Arrow chunks for the strings."""

    def __init__(self, bound: int) -> None:
        self.rows = 0
        self.ints = {c: np.zeros(bound, dtype=np.int64) for c in INT_COLUMNS}
        self.missing = {c: np.ones(bound, dtype=bool) for c in INT_COLUMNS}  # True = <NA>
        self.latency = np.empty(bound, dtype=np.float64)
        self.strings: dict[str, list] = {c: [] for c in STR_COLUMNS}

    def frame(self) -> pd.DataFrame:
        import pyarrow as pa

        n = self.rows
        columns = {}
        for name in COLUMNS:
            if name in self.strings:
                chunks = self.strings.pop(name)
                values = pa.chunked_array(chunks, type=pa.string()).to_pandas()
                if values.dtype != DTYPES[name]:
                    values = values.astype(DTYPES[name])
            elif name in self.ints:
                data, mask = self.ints.pop(name), self.missing.pop(name)
                if n < len(data):
                    data, mask = data[:n].copy(), mask[:n].copy()
                values = pd.Series(pd.arrays.IntegerArray(data, mask), name=name)
            elif name == "latency_us":
                values = pd.Series(self.latency[:n].copy() if n < len(self.latency)
                                   else self.latency, name=name)
            else:
                values = pd.Series(np.full(n, np.nan), name=name)
            columns[name] = values
        return pd.DataFrame(columns, columns=list(COLUMNS), copy=False)


def _convert(found: _Found, builder: _Builder) -> tuple[int, int]:
    """Append one aiconfigurator table to ``builder``; return the source rows read
    and the (row, phase) measurements dropped."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    spec = found.spec
    source = found.rel
    try:
        src = pq.read_table(found.path)
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"cannot read the table ({' '.join(str(err).split())[:200]})",
                         source=source) from None
    have = set(src.column_names)
    missing = sorted(spec.required() - have)
    if missing:
        raise InputError("missing column", field=missing[0], source=source,
                         allowed="the columns of aiconfigurator-core 0.12.0's "
                                 f"{spec.table} table")
    n = src.num_rows
    prefix = f"{found.system}/{spec.folder}/{found.framework}-{found.version}/{spec.table}#"
    constants = {"system": found.system, "op": spec.op, "framework": found.framework,
                 "framework_version": found.version, "file": source}

    def floats(name: str) -> np.ndarray:
        try:
            column = src.column(name).cast(pa.float64()).combine_chunks()
        except pa.ArrowException:
            raise InputError("not numeric", field=name, source=source,
                             allowed="latencies as numbers") from None
        return column.fill_null(np.nan).to_numpy(zero_copy_only=False)

    def ints(name: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            column = src.column(name).cast(pa.int64()).combine_chunks()
        except pa.ArrowException:
            raise InputError("not whole numbers", field=name, source=source,
                             allowed="whole numbers") from None
        null = column.is_null().to_numpy(zero_copy_only=False)
        return column.fill_null(0).to_numpy(zero_copy_only=False), null

    def texts(name: str, keep) -> pa.Array:
        column = src.column(name).cast(pa.string()).combine_chunks().take(keep)
        return pc.fill_null(column, "")

    dropped = 0
    for phase in spec.phases:
        if spec.latency_ms is not None:
            latency = floats(spec.latency_ms) * 1000.0
        else:
            latency = sum(floats(c) for c in spec.latency_us[phase])
        good = np.isfinite(latency) & (latency > 0)
        rows = np.flatnonzero(good)
        keep = pa.array(rows)
        k = len(rows)
        dropped += n - k
        at = slice(builder.rows, builder.rows + k)
        builder.rows += k

        suffix = f":{phase}" if len(spec.phases) > 1 else ""
        strings = builder.strings
        strings["id"].append(
            pc.binary_join_element_wise(prefix, pc.cast(keep, pa.string()), suffix, ""))
        for name in ("system", "op"):
            strings[name].append(pa.repeat(constants[name], k))
        if spec.phase_column:
            strings["phase"].append(texts(spec.phase_column, keep))
        else:
            strings["phase"].append(pa.repeat(phase, k))
        for name in TEXT_COLUMNS:
            if name in constants:
                strings[name].append(pa.repeat(constants[name], k))
            elif name in spec.texts and spec.texts[name] in have:
                strings[name].append(texts(spec.texts[name], keep))
            else:
                strings[name].append(pa.repeat("", k))

        theirs = {**spec.ints, **spec.phase_ints.get(phase, {})}
        for name, column in theirs.items():
            if column in have:
                values, null = ints(column)
                builder.ints[name][at] = values[rows]
                builder.missing[name][at] = null[rows]
        builder.latency[at] = latency[rows]
    return n, dropped
