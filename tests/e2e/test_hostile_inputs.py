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


def test_the_fuzzer_reaches_every_kind_of_field():
    assert len(FIELDS) > 90 and "routing.capacity_factor" in FIELDS
    assert json.loads(json.dumps(as_yaml(float("nan")))) == ".nan"
