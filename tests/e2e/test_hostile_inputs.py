"""Hostile inputs, generated and mutated by hypothesis: whatever a user feeds moesim, it
answers with results (exit 0) or one line and exit 2, never a traceback, and leaves no
half-written output.

Each property runs ``MOESIM_FUZZ_EXAMPLES`` cases (default 40, a few hundred in all in
CI); ``make fuzz`` runs 2,000 each (over 10,000 in all).
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import string
import warnings
import zipfile
from pathlib import Path

import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from moesim.cli.main import app

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = int(os.environ.get("MOESIM_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
runner = CliRunner()

# A DeepSeek-V3 slice that simulates in a fraction of a second.
TINY = ["model.num_layers=4", "parallel.ep=8", "routing.max_devices=null",
        "parallel.tokens_per_gpu=16", "routing.layer_samples=1", "engine=fast"]

# Numbers at and far beyond every edge, and other things that are not what a field wants.
numbers = st.one_of(
    st.integers(-2, 64),
    st.sampled_from([0, -1, 2**15, 2**31, 2**40, 2**63, 10**12, 10**100]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 1e300, 0.5, 1.0, 1.5]),
)
texts = st.one_of(st.text(string.printable, max_size=12),
                  st.sampled_from(["", "null", "~", "[]", "{}", "yes", "0x10", "1e3", "&a",
                                   "*a", "!!python/object:os.system", "../../etc/passwd",
                                   "/dev/zero", "h800-node", "deepseek-v3", "fp8",
                                   "9" * 5000]))  # an integer past Python's own limit
leaves = st.one_of(numbers, st.booleans(), st.none(), texts)
values = st.recursive(leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(string.ascii_lowercase, max_size=6),
                                                 inner, max_size=3)), max_leaves=6)


def scenario_fields() -> list[str]:
    from moesim.config.loading import _SECTION_TYPES, _scenario_fields
    from moesim.validation import field_names

    out = []
    for top in _scenario_fields():
        if top in _SECTION_TYPES:
            out += [f"{top}.{name}" for name in field_names(_SECTION_TYPES[top])]
        else:
            out.append(top)
    return out


FIELDS = scenario_fields()


def check(result, out: Path | None = None) -> None:
    """Exit 0, or exit 2 with one `moesim: error:` line; never a traceback; with exit 2,
    no output folder."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        trace = "".join(traceback.format_exception(result.exception))
        raise AssertionError(f"traceback:\n{trace}")
    assert result.exit_code in (0, 2), result.output
    if result.exit_code == 2:
        lines = [line for line in result.output.strip().splitlines()
                 if not line.startswith("moesim: warning")]
        assert len(lines) == 1 and lines[0].startswith("moesim: error:"), result.output
        if out is not None:
            assert not out.exists() or not any(out.iterdir()), "half-written output"
        assert "Traceback" not in result.output


def as_yaml(value) -> str:
    """A value as one line of YAML text (what --set reads); NaN and infinities as YAML."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix(
        "\n...").strip()


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(FIELDS), values), min_size=1, max_size=3))
def test_set_any_field_to_anything(tmp_path_factory, changes):
    out = tmp_path_factory.mktemp("out") / "run"
    args = ["simulate", "--json", "--out", str(out)]
    for field, value in changes:
        args += ["--set", f"{field}={as_yaml(value)}"]
    result = runner.invoke(app, [*args[:1], *sum((["--set", t] for t in TINY), []),
                                 *args[1:]])
    check(result, out)


def _paths(data, prefix=()):
    """Every (path, value) inside nested mappings and lists."""
    yield prefix, data
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _paths(value, (*prefix, i))


def mutate(data, draw_path: int, how: str, value):
    """``data`` with the ``draw_path``-th node replaced, dropped, duplicated or nested."""
    data = copy.deepcopy(data)
    paths = [p for p, _ in _paths(data) if p]
    if not paths:
        return value
    path = paths[draw_path % len(paths)]
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if how == "replace":
        parent[key] = value
    elif how == "drop":
        del parent[key]
    elif how == "nest":
        inner = parent[key]
        for _ in range(40):  # deeper than any schema
            inner = {"x": inner}
        parent[key] = inner
    elif how == "wrap":
        parent[key] = [parent[key], value]
    return data


mutations = st.tuples(st.integers(0, 10**6), st.sampled_from(["replace", "drop", "nest",
                                                                "wrap"]), values)


def write_mutated(folder: Path, name: str, data, steps) -> tuple[Path, object]:
    """``data`` after every mutation of ``steps``, written as ``folder/name``."""
    for step in steps:
        data = mutate(data, *step)
    path = folder / name
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path, data


def tiny_scenario() -> dict:
    data = yaml.safe_load((REPO / "moesim/config/presets/default-scenario.yaml").read_text())
    data["model"] = {"preset": "deepseek-v3", "num_layers": 4}
    data["parallel"].update(ep=8, tokens_per_gpu=16)
    data["routing"].update(max_devices=None, layer_samples=1)
    data["engine"] = "fast"
    return data


@FUZZ
@given(st.lists(mutations, min_size=1, max_size=3))
def test_mutated_scenario_files(tmp_path_factory, steps):
    path, _ = write_mutated(tmp_path_factory.mktemp("scenario"), "scenario.yaml",
                            tiny_scenario(), steps)
    check(runner.invoke(app, ["simulate", str(path), "--json"]))


@FUZZ
@given(st.lists(mutations, min_size=1, max_size=3))
def test_mutated_topology_files(tmp_path_factory, steps):
    data = yaml.safe_load((REPO / "topologies/h800-node.yaml").read_text())
    path, _ = write_mutated(tmp_path_factory.mktemp("topology"), "topo.yaml", data, steps)
    check(runner.invoke(app, ["topo", "show", str(path), "--gpus", "8"]))


@FUZZ
@given(st.lists(mutations, min_size=1, max_size=3))
def test_mutated_recorded_runs(tmp_path_factory, steps):
    data = yaml.safe_load((REPO / "moesim/fidelity/gpu_runs/deepep_intranode.yaml").read_text())
    path, _ = write_mutated(tmp_path_factory.mktemp("runs"), "runs.yaml", data, steps)
    result = runner.invoke(app, ["regress", str(path)])
    if result.exit_code == 1:  # a well-formed run out of tolerance: a verdict, not an error
        assert "FAIL" in result.output or "fail" in result.output.lower(), result.output
        return
    check(result)


@FUZZ
@given(st.lists(mutations, min_size=1, max_size=3))
def test_mutated_sweep_and_plan_files(tmp_path_factory, steps):
    folder = tmp_path_factory.mktemp("sweep")
    sweep = {"base": tiny_scenario(), "axes": {"parallel.ep": [8], "routing.capacity_factor":
                                               [None, 1.0]}, "seeds": 1}
    path, data = write_mutated(folder, "sweep.yaml", sweep, steps)
    out = folder / "out"
    result = runner.invoke(app, ["sweep", str(path), "--out", str(out), "--workers", "1"])
    check(result)
    if isinstance(data, dict) and "axes" in data:
        plan = {k: v for k, v in data.items() if k != "axes"} | {"search": data["axes"]}
        path.write_text(yaml.safe_dump(plan, allow_unicode=True))
        check(runner.invoke(app, ["plan", str(path), "--out", str(folder / "plan"),
                                  "--workers", "1"]), folder / "plan")


ARRAYS = ["expert_ids", "weights", "scores", "seq_id", "pos", "metadata"]


@FUZZ
@given(st.sampled_from(ARRAYS),
       st.sampled_from(["shape", "dtype", "values", "drop", "empty", "scalar", "header"]),
       st.integers(0, 2**31 - 1))
def test_mutated_traces(tmp_path_factory, name, how, seed):
    rng = np.random.default_rng(seed)
    arrays = dict(np.load(REPO / "traces/samples/tiny-v1.npz", allow_pickle=False))
    a = arrays[name]
    if how == "shape":
        arrays[name] = a.reshape(-1)[: max(1, a.size // 2)]
    elif how == "dtype":
        arrays[name] = a.astype(rng.choice([np.float64, np.int8, np.uint64, np.bool_]))
    elif how == "values":
        flat = a.reshape(-1).copy()
        idx = rng.integers(0, flat.size, size=min(flat.size, 8))
        bad = rng.choice([-1, 2**15 - 1, 10**6]) if a.dtype.kind in "iu" else rng.choice(
            [np.nan, np.inf, -1.0, 1e30])
        with np.errstate(over="ignore", invalid="ignore"):
            flat[idx] = np.asarray(bad).astype(flat.dtype)
        arrays[name] = flat.reshape(a.shape)
    elif how == "drop":
        del arrays[name]
    elif how == "empty":
        arrays[name] = a[:0]
    elif how == "scalar":
        arrays[name] = np.asarray(a.reshape(-1)[0])
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path = tmp_path_factory.mktemp("trace") / "trace.npz"
    path.write_bytes(buffer.getvalue())
    if how == "header":  # the member's .npy header declares far more than it holds
        huge = tuple(int(rng.choice([10**12, 2**40, 3 * 2**30])) for _ in range(a.ndim or 1))
        with zipfile.ZipFile(path, "a") as archive:
            member = io.BytesIO()
            np.lib.format.write_array_header_1_0(member, {
                "descr": np.lib.format.dtype_to_descr(a.dtype), "fortran_order": False,
                "shape": huge})
            member.write(a.tobytes()[:64])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a second member of the same name
                archive.writestr(f"{name}.npy", member.getvalue())
    check(runner.invoke(app, ["trace", "stats", str(path), "--ep", "8"]))
    check(runner.invoke(app, ["simulate", str(REPO / "examples/dsmoe16b-trace.yaml"), "--set",
                              f"trace={path}", "--set", "engine=fast", "--set",
                              "model.num_layers=4", "--set", "parallel.ep=8", "--set",
                              "parallel.tokens_per_gpu=256", "--json"]))


def megatron_records(rank: int) -> list[dict]:
    """Two layers of one step of Megatron-Core's router trace for ``rank``, as its
    tracer writes them (8 experts, top-2)."""
    rng = np.random.default_rng(rank)
    return [{"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": layer,
             "rank": rank, "num_tokens": 3, "topk": 2,
             "top_indices": [rng.choice(8, 2, replace=False).tolist() for _ in range(3)]}
            for layer in (1, 3)]


@FUZZ
@given(st.lists(mutations, min_size=1, max_size=3), st.integers(0, 2),
       st.sampled_from(["json", "cut", "bytes"]), st.integers(0, 10**6))
def test_mutated_megatron_traces(tmp_path_factory, steps, rank, how, where):
    folder = tmp_path_factory.mktemp("megatron")
    for r in range(2):
        records = megatron_records(r)
        if r == rank:  # rank 2: a file of its own, beside the two good ones
            for step in steps:
                records = mutate(records, *step)
        lines = [json.dumps(x) for x in (records if isinstance(records, list) else [records])]
        text = "".join(line + "\n" for line in lines)
        if r == rank and how == "cut":  # a file cut short, mid-record
            text = text[: where % (len(text) + 1)]
        data = text.encode()
        if r == rank and how == "bytes":  # bytes that are not UTF-8, or a NUL
            i = where % (len(data) + 1)
            data = data[:i] + bytes([0xFF, 0x00, 0xC3])[where % 3:] + data[i:]
        (folder / f"router_trace_rank{r}.jsonl").write_bytes(data)
    if rank == 2:
        (folder / "router_trace_rank2.jsonl").write_text(
            "".join(json.dumps(x) + "\n" for x in megatron_records(2)))
    out = tmp_path_factory.mktemp("imported") / "trace.npz"
    result = runner.invoke(app, ["trace", "import", str(folder), "--experts", "8",
                                 "--out", str(out)])
    check(result)
    assert (result.exit_code == 0) == out.exists(), "an import that failed wrote its trace"


loads_cells = st.one_of(st.integers(0, 1000).map(str), numbers.map(str), texts,
                        st.sampled_from(["", " ", "1,2", "nan", "inf", "-0", "1e309"]))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**6), loads_cells), min_size=1, max_size=4),
       st.sampled_from(["cells", "rows", "columns"]))
def test_mutated_loads_files(tmp_path_factory, changes, how):
    rows = [[str(v) for v in row] for row in np.arange(16).reshape(2, 8) * 7 + 1]
    for where, cell in changes:
        r = where % len(rows)
        if how == "cells":
            rows[r][where % len(rows[r])] = cell
        elif how == "rows":
            rows.insert(r, [cell] * (where % 12))
        else:
            rows[r] = rows[r][: where % 12] or [cell]
    path = tmp_path_factory.mktemp("loads") / "loads.csv"
    path.write_text("".join(",".join(row) + "\n" for row in rows))
    out = path.parent / "placement.json"
    result = runner.invoke(app, ["placement", str(path), "--gpus", "4", "--slots", "12",
                                 "--nodes", "2", "--groups", "2", "--json", "--out", str(out)])
    check(result)
    assert (result.exit_code == 0) == out.exists(), "a placement that failed was written"


_RESULTS: dict[str, Path] = {}


def results_folder(tmp_path_factory, kind: str) -> Path:
    """A results folder of ``kind`` (simulate, sweep or plan --out) of the tiny scenario,
    written once per session."""
    if kind not in _RESULTS:
        folder = tmp_path_factory.mktemp(f"results-{kind}")
        out = folder / "out"
        if kind == "simulate":
            args = ["simulate", *sum((["--set", t] for t in TINY), []), "--out", str(out)]
        else:
            spec = {"base": tiny_scenario(), "seeds": 2,
                    ("axes" if kind == "sweep" else "search"): {"parallel.ep": [4, 8]}}
            (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
            args = [kind, str(folder / "spec.yaml"), "--out", str(out), "--workers", "1"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        _RESULTS[kind] = out
    return _RESULTS[kind]


RESULT_FILES = {
    "simulate": ["summary.json", "scenario.yaml", "warnings.json", "spans.parquet",
                 "links.parquet", "experts.parquet"],
    "sweep": ["results.parquet", "sweep.yaml", "progress.json"],
    "plan": ["plan.json", "plan.parquet"],
}


def _mutated_table(path: Path, how: int, rng: np.random.Generator) -> None:
    """Rewrite a Parquet table with a column dropped, renamed, emptied or of another
    type, or its rows gone."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    name = table.column_names[int(rng.integers(table.num_columns))]
    i = table.column_names.index(name)
    if how == 0:
        table = table.drop_columns([name])
    elif how == 1:
        table = table.rename_columns([c if c != name else "x" for c in table.column_names])
    elif how == 2:
        table = table.slice(0, 0)
    elif how == 3:
        table = table.set_column(i, name, pa.array(["?"] * table.num_rows))
    else:
        values = rng.choice([np.nan, np.inf, -1.0, 1e300], size=table.num_rows)
        table = table.set_column(i, name, pa.array(values))
    pq.write_table(table, path)


@FUZZ
@given(st.sampled_from([(kind, name) for kind, names in RESULT_FILES.items()
                        for name in names]),
       st.sampled_from(["data", "cut", "bytes", "drop"]),
       st.lists(mutations, min_size=1, max_size=2), st.integers(0, 2**31 - 1))
def test_mutated_results_folders_for_report(tmp_path_factory, file, how, steps, seed):
    kind, name = file
    folder = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(results_folder(tmp_path_factory, kind), folder)
    path, rng = folder / name, np.random.default_rng(seed)
    if how == "drop":
        path.unlink()
    elif how == "cut":
        data = path.read_bytes()
        path.write_bytes(data[: int(rng.integers(len(data) + 1))])
    elif how == "bytes":
        data = bytearray(path.read_bytes())
        for i in rng.integers(0, len(data), size=min(len(data), 4)):
            data[i] = int(rng.integers(256))
        path.write_bytes(bytes(data))
    elif name.endswith(".parquet"):
        _mutated_table(path, int(rng.integers(5)), rng)
    else:
        text = path.read_text()
        data = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
        for step in steps:
            data = mutate(data, *step)
        path.write_text(json.dumps(data) if name.endswith(".json")
                        else yaml.safe_dump(data, allow_unicode=True))
    def files():
        return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    before = files()
    result = runner.invoke(app, ["report", str(folder)])
    check(result)
    if result.exit_code == 2:  # nothing written, nothing lost
        assert files() == before


def test_the_fuzzer_reaches_every_kind_of_field():
    assert len(FIELDS) > 90 and "routing.capacity_factor" in FIELDS
    assert json.loads(json.dumps(as_yaml(float("nan")))) == ".nan"
