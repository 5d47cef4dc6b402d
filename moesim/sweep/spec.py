"""A sweep file -> its points: a base scenario with one value of every axis applied.

A sweep file (schema ``moesim.sweep/1``)::

    base: scenario.yaml          # or a scenario mapping; omitted: the embedded default
    set: [parallel.gpus=256]     # overrides applied to the base first
    axes:                        # scenario field -> values; the grid of all of them
      parallel.ep: [32, 64, 128]
      routing.max_devices: [2, 4, null]
    zip: [[model.routed_experts, model.top_k]]   # axes that vary together, not crossed
    seeds: 3                     # runs per point (seed, seed + 1, ...): mean and spread
    keep_active_params: false    # top_k axis: scale moe_intermediate_size by K0 / K
    engine: fast                 # the points' timeline engine (fast: numpy, same
                                 # timeline as simpy; `set` or an axis may change it)

Points are numbered in grid order (the first axis varies slowest). Each point carries
its resolved scenario, so workers need nothing but the point, and a hash of it, so a
resumed sweep knows what it already has.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as schema_dataclass

from moesim.errors import InputError
from moesim.validation import STRICT, Checked, field_names, input_error

SCHEMA = "moesim.sweep/1"
MAX_POINTS = 100_000  # a grid beyond this is almost always a typo (README: Limits)
MAX_SEEDS = 100


@schema_dataclass(frozen=True, kw_only=True, config=STRICT)
class Grid(Checked):
    """What sweep and plan files share: the base, its overrides, and how every point runs.
    A subclass holds the axes in its field ``axes_key``."""

    axes_key: ClassVar[str] = "axes"

    base: str | dict | None = None
    set: list[str] = Field(default_factory=list)
    zip: list[list[str]] = Field(default_factory=list)
    seeds: int = Field(default=1, ge=1, le=MAX_SEEDS)
    keep_active_params: bool = False
    engine: Literal["simpy", "fast"] = "fast"

    @property
    def grid_axes(self) -> dict[str, list[Any]]:
        return getattr(self, self.axes_key)

    def overrides(self) -> list[str]:
        """What every point applies to the base before its axis values."""
        return [f"engine={self.engine}", *self.set]


@schema_dataclass(frozen=True, kw_only=True, config=STRICT)
class SweepFile(Grid):
    """The fields of a sweep file (module doc)."""

    axes: dict[str, list[Any]] = Field(min_length=1)


@dataclass(frozen=True, kw_only=True)
class SweepPoint:
    """One point: its place in the grid, the axis values, the resolved scenario (a plain
    dict as ``Scenario.to_dict`` gives, or ``None`` with ``error`` when the point is not a
    valid scenario), the seeds to run and a hash of all that."""

    index: int
    values: dict[str, Any]
    scenario: dict | None
    seeds: int
    key: str
    error: str | None = None


def point_key(scenario: dict | None, values: Mapping[str, Any], seeds: int) -> str:
    """A stable hash of what a point computes (16 hex digits)."""
    text = json.dumps({"scenario": scenario, "values": values, "seeds": seeds},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_file(data: Any, schema_type: type[Grid], *, schema: str, source: str, what: str):
    """Validate a mapping read from a ``what`` file (a sweep or plan file) against
    ``schema_type`` and check its axes; the ``schema`` key is optional and must match."""
    fields = field_names(schema_type)
    if not isinstance(data, Mapping):
        raise InputError(f"a {what} file is a mapping, got {type(data).__name__}",
                         source=source, allowed=", ".join(fields))
    data = dict(data)
    given = data.pop("schema", schema)
    if given != schema:
        raise InputError(f"unknown schema {given!r}", field="schema", allowed=schema,
                         source=source)
    unknown = sorted(set(data) - set(fields))
    if unknown:  # before pydantic, which would first miss a field the typo meant
        raise InputError("unknown field", field=str(unknown[0]), source=source,
                         allowed=", ".join(fields))
    try:
        spec = TypeAdapter(schema_type).validate_python(data)
    except ValidationError as err:
        raise input_error(err, schema=schema_type, source=source) from None
    check_axes(spec.grid_axes, spec.zip, source=source, what=spec.axes_key)
    return spec


def parse_sweep(data: Any, *, source: str) -> SweepFile:
    """Validate a sweep mapping as read from YAML."""
    return parse_file(data, SweepFile, schema=SCHEMA, source=source, what="sweep")


def check_axes(axes: Mapping[str, Sequence], zipped: Sequence[Sequence[str]], *,
               source: str, what: str = "axes") -> None:
    """Every axis names a scenario field and has values; zipped axes exist, appear in one
    group only and have equal lengths; the grid stays under :data:`MAX_POINTS`."""
    from moesim.config.loading import check_field

    for name, values in axes.items():
        try:
            check_field(name)
        except InputError as err:
            raise InputError(err.problem, field=f"{what}.{name}", allowed=err.allowed,
                             source=source) from None
        if not values:
            raise InputError("an axis needs at least one value", field=f"{what}.{name}",
                             source=source)
    seen: set[str] = set()
    for i, group in enumerate(zipped):
        for name in group:
            if name not in axes:
                raise InputError(f"zip names {name!r}, which is not an axis",
                                 field=f"zip[{i}]", allowed=", ".join(axes), source=source)
            if name in seen:
                raise InputError(f"{name!r} is in two zip groups", field=f"zip[{i}]",
                                 source=source)
            seen.add(name)
        lengths = {len(axes[name]) for name in group}
        if len(lengths) > 1:
            raise InputError("zipped axes need the same number of values",
                             field=f"zip[{i}]", source=source,
                             allowed=", ".join(f"{n}: {len(axes[n])}" for n in group))
    if grid_size(axes, zipped) > MAX_POINTS:
        raise InputError(f"the grid has {grid_size(axes, zipped):,} points", field=what,
                         source=source, allowed=f"at most {MAX_POINTS:,}")


def _units(axes: Mapping[str, Sequence], zipped: Sequence[Sequence[str]]) -> list[list[str]]:
    """The grid's dimensions in axis order: a zip group is one dimension."""
    group_of = {name: tuple(group) for group in zipped for name in group}
    units: list[list[str]] = []
    for name in axes:
        group = group_of.get(name, (name,))
        if list(group) not in units:
            units.append(list(group))
    return units


def grid_size(axes: Mapping[str, Sequence], zipped: Sequence[Sequence[str]]) -> int:
    size = 1
    for unit in _units(axes, zipped):
        size *= len(axes[unit[0]])
    return size


def grid(axes: Mapping[str, Sequence], zipped: Sequence[Sequence[str]] = ()) \
        -> list[dict[str, Any]]:
    """Every combination of the axes' values (zipped axes step together), axis order kept."""
    units = _units(axes, zipped)
    out = []
    for picks in itertools.product(*(range(len(axes[u[0]])) for u in units)):
        values = {name: axes[name][i]
                  for unit, i in zip(units, picks, strict=True) for name in unit}
        out.append({name: values[name] for name in axes})
    return out


def override(name: str, value: Any) -> str:
    """``FIELD=VALUE`` with the value written as JSON (which YAML reads back unchanged)."""
    return f"{name}={json.dumps(value)}"


def base_scenario(spec_base: str | dict | None, *, source: str) -> tuple[dict, str]:
    """The base as a scenario mapping, and the name errors about it should carry. A path
    is read relative to the sweep file's folder first."""
    from importlib import resources

    import yaml

    from moesim.config.loading import DEFAULT_SCENARIO
    from moesim.inputs import read_yaml

    if spec_base is None:
        text = resources.files("moesim.config.presets").joinpath(DEFAULT_SCENARIO).read_text()
        return yaml.safe_load(text), f"<default scenario {DEFAULT_SCENARIO}>"
    if isinstance(spec_base, dict):
        return spec_base, f"{source}: base"
    path = Path(spec_base)
    beside = Path(source).parent / path
    if not path.is_absolute() and beside.is_file():
        path = beside
    if not path.is_file():
        raise InputError(f"no such scenario file {spec_base!r}", field="base", source=source)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise InputError(f"a scenario is a mapping of fields, got {type(data).__name__}",
                         source=str(path))
    return data, str(path)


def resolve_point(base: dict, overrides: Sequence[str], values: Mapping[str, Any], *,
                  source: str, active_width: int | None = None):
    """The checked Scenario of one point: the base with ``overrides``, then the axis values.

    With ``active_width`` (the base's ``moe_intermediate_size x top_k``), a point's
    experts get the width that keeps it: DeepSeekMoE's fine-grained expert segmentation,
    the same active expert parameters in more, narrower experts.
    """
    import dataclasses

    from moesim.config.feasibility import check_feasible
    from moesim.config.loading import scenario_from_dict

    axis_overrides = [override(name, value) for name, value in values.items()]
    scenario = scenario_from_dict(base, source=source, overrides=[*overrides, *axis_overrides])
    if active_width is not None:
        top_k = scenario.model.top_k
        if active_width % top_k:
            # No source: blame() names the axis in the sweep or plan file.
            raise InputError(f"keep_active_params: {active_width} (the base's expert width x"
                             f" top_k) is not a multiple of top_k {top_k}", field="model.top_k")
        model = dataclasses.replace(scenario.model, moe_intermediate_size=active_width // top_k)
        scenario = dataclasses.replace(scenario, model=model)
    check_feasible(scenario)
    return scenario


def blame(err: InputError, spec: Grid, source: str) -> InputError:
    """An error of a point's overrides, named as the sweep or plan file writes them: the
    axis (``axes.routing.capacity_factor``; ``search.`` in a plan) or the entry of ``set``
    (``set[0]``), in ``source``. Errors of the base scenario keep its own file."""
    if err.source not in (None, "--set"):
        return err
    field = err.field or ""

    def names(key: str) -> bool:
        return bool(field) and (field == key or field.startswith(key + ".")
                                or key.startswith(field + "."))

    # Axis overrides are written by moesim, so a malformed override is one of `set`.
    malformed = err.problem.startswith("override ")
    for key in () if malformed else spec.grid_axes:
        if names(key):
            return InputError(err.problem, field=f"{spec.axes_key}.{field}",
                              allowed=err.allowed, source=source)
    for i, text in enumerate(spec.set):
        if names(text.partition("=")[0].strip()):
            return InputError(err.problem, field=f"set[{i}]: {field}", allowed=err.allowed,
                              source=source)
    return InputError(err.problem, field=field or None, allowed=err.allowed, source=source)


def expand(spec: Grid, *, source: str) -> list[SweepPoint]:
    """The points of a sweep or plan file. A point that is not a valid scenario (``M``
    above what its ``D`` allows, say) keeps its error instead of a scenario: it becomes
    a row that says why, and the sweep goes on."""
    from moesim.config.loading import scenario_from_dict

    base, base_source = base_scenario(spec.base, source=source)
    # The base itself must load: a broken base is one error, not one per point.
    try:
        reference = scenario_from_dict(base, source=base_source, overrides=spec.overrides())
    except InputError as err:
        raise blame(err, spec, source) from None
    active_width = None
    if spec.keep_active_params and "model.top_k" in spec.grid_axes:
        active_width = reference.model.moe_intermediate_size * reference.model.top_k
    points = []
    for index, values in enumerate(grid(spec.grid_axes, spec.zip)):
        try:
            scenario = resolve_point(base, spec.overrides(), values, source=base_source,
                                     active_width=active_width).to_dict()
            error = None
        except InputError as err:
            scenario, error = None, str(blame(err, spec, source))
        points.append(SweepPoint(index=index, values=values, scenario=scenario,
                                 seeds=spec.seeds, error=error,
                                 key=point_key(scenario, values, spec.seeds)))
    return points
