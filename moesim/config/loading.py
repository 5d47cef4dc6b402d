"""Scenario files, presets and `--set` overrides -> a validated :class:`Scenario`.

A scenario file may name presets (``model: deepseek-v3``) or give mappings that
start from a preset and override any of its fields::

    model: {preset: deepseek-v3, num_layers: 8}

Overrides ``FIELD.PATH=VALUE`` (values parsed as YAML) apply on top, in order.
Every mistake becomes one :class:`InputError` naming the file (or ``--set``), the
field and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from moesim.config.hardware import HardwareSpec
from moesim.config.model import ModelShape
from moesim.config.parallel import ParallelConfig
from moesim.config.placement import PlacementConfig
from moesim.config.routing import RoutingPolicy
from moesim.config.scenario import SCHEMA, Scenario
from moesim.config.serving import ServingConfig
from moesim.config.training import TrainingConfig
from moesim.errors import InputError
from moesim.inputs import load_yaml, read_yaml
from moesim.validation import field_names, input_error

DEFAULT_SCENARIO = "default-scenario.yaml"
_PRESET_SECTIONS = {"model": "models.yaml", "hardware": "gpus"}
_SECTION_TYPES: dict[str, type] = {
    "model": ModelShape,
    "hardware": HardwareSpec,
    "parallel": ParallelConfig,
    "routing": RoutingPolicy,
    "placement": PlacementConfig,
    "serving": ServingConfig,
    "training": TrainingConfig,
}


@cache
def _preset_table(name: str) -> dict[str, dict]:
    """Presets by name: ``models.yaml`` holds every model; ``gpus/`` one file per GPU
    (``<name>.yaml``, whose ``hardware`` section is the spec)."""
    presets = resources.files("moesim.config.presets")
    if name.endswith(".yaml"):
        return yaml.safe_load(presets.joinpath(name).read_text("utf-8"))
    table = {}
    for entry in sorted(presets.joinpath(name).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            doc = yaml.safe_load(entry.read_text("utf-8"))
            table[entry.name[: -len(".yaml")]] = {
                k: v for k, v in doc["hardware"].items() if k != "name"}
    return table


def preset_names(section: str) -> list[str]:
    """Names of the shipped presets for ``model`` or ``hardware``."""
    return sorted(_preset_table(_PRESET_SECTIONS[section]))


def _preset(section: str, name: Any, field: str) -> dict:
    table = _preset_table(_PRESET_SECTIONS[section])
    if not isinstance(name, str) or name not in table:
        raise InputError(
            f"unknown {section} preset {name!r}", field=field, allowed=", ".join(sorted(table))
        )
    return {"name": name, **copy.deepcopy(table[name])}


def model_preset(name: str) -> ModelShape:
    data = _preset("model", name, "model")
    data.pop("default_routing", None)
    return ModelShape(**data)


def hardware_preset(name: str) -> HardwareSpec:
    return HardwareSpec(**_preset("hardware", name, "hardware"))


# ---------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"parallel.ep=64"`` -> (["parallel", "ep"], 64); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    path = [part.strip() for part in key.split(".")]
    if not sep or not all(path):
        raise InputError(
            f"override {text!r} is not FIELD=VALUE", field=key or text, source="--set",
            allowed="e.g. parallel.ep=64, routing.max_devices=4, model=deepseek-v2",
        )
    try:
        value = load_yaml(raw, source="--set") if raw.strip() else None
    except InputError:
        value = raw  # not YAML: the text itself (a name, a path)
    return path, value


def _section_fields(section: str) -> list[str]:
    return field_names(_SECTION_TYPES[section])


def _scenario_fields() -> list[str]:
    return field_names(Scenario)


def check_field(dotted: str) -> None:
    """Raise the InputError an override of ``dotted`` would raise if it names no field."""
    _apply_override({}, [part.strip() for part in dotted.split(".")], None)


def _apply_override(data: dict, path: list[str], value: Any) -> None:
    dotted = ".".join(path)
    top = path[0]
    if top not in _scenario_fields():
        raise InputError(
            "unknown field", field=dotted, source="--set", allowed=", ".join(_scenario_fields())
        )
    if len(path) == 1:
        data[top] = value
        return
    if top not in _SECTION_TYPES:
        raise InputError(f"{top!r} has no sub-fields", field=dotted, source="--set")
    allowed = _section_fields(top) + (["preset"] if top in _PRESET_SECTIONS else [])
    if len(path) != 2 or path[1] not in allowed:
        raise InputError(
            f"unknown field of {top}", field=dotted, source="--set", allowed=", ".join(allowed)
        )
    section = data.get(top)
    if isinstance(section, str):
        section = {"preset": section}
    if not isinstance(section, dict):
        section = {}
    section[path[1]] = value
    data[top] = section


# ---------------------------------------------------------------- resolution


def _expand(data: dict, section: str) -> tuple[dict, dict]:
    """Preset name or {preset: name, ...overrides} -> full mapping, plus preset routing."""
    value = data.get(section)
    if section == "hardware" and isinstance(value, str):
        value = _hardware_file(value)
    if isinstance(value, str):
        value = {"preset": value}
    if value is None:
        return {}, {}
    if not isinstance(value, dict):
        raise InputError(
            f"expected a preset name or a mapping, got {type(value).__name__}",
            field=section, allowed=", ".join(preset_names(section)),
        )
    value = dict(value)
    routing = {}
    if "preset" in value:
        base = _preset(section, value.pop("preset"), f"{section}.preset")
        routing = base.pop("default_routing", {}) or {}
        base.update(value)
        value = base
    return value, routing


def _hardware_file(value: str) -> str | dict:
    """``hardware: path.yaml`` (not a preset name) -> the file's mapping of HardwareSpec
    fields, as `moesim calibrate --out` writes, or its ``hardware`` section (a GPU file as
    `moesim perfdb fit --out` writes and ``presets/gpus/`` ships); a preset name is
    returned unchanged."""
    if value in _preset_table(_PRESET_SECTIONS["hardware"]) or not value.endswith(
            (".yaml", ".yml")):
        return value
    path = Path(value)
    if not path.is_file():
        raise InputError("no such hardware file", source=value,
                         allowed="a hardware preset name or a hardware YAML file")
    spec = read_yaml(path)
    if not isinstance(spec, dict):
        raise InputError(f"a hardware file is a mapping of fields, got {type(spec).__name__}",
                         source=value)
    if isinstance(spec.get("hardware"), dict):  # a GPU file: the spec is one section of it
        spec = spec["hardware"]
    if "preset" not in spec:  # {preset: name, ...} is checked once expanded
        try:
            TypeAdapter(HardwareSpec).validate_python(spec)
        except ValidationError as err:
            raise input_error(err, schema=HardwareSpec, source=value) from None
    return dict(spec)


def _hardware_of_topology(topology: Any) -> str:
    from moesim.topologies import read_spec  # networkx stays off the import path

    if not isinstance(topology, str):
        raise InputError("expected a topology preset name or file path", field="topology")
    return read_spec(topology)[0].gpu  # the GPU is the file's: no cluster to build


def scenario_from_dict(
    data: Mapping[str, Any] | None,
    *,
    source: str = "<scenario>",
    overrides: Sequence[str] = (),
) -> Scenario:
    """Validate a scenario mapping (as read from YAML) with overrides applied."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise InputError(
            f"a scenario is a mapping of fields, got {type(data).__name__}", source=source
        )
    data = copy.deepcopy(dict(data))
    schema = data.pop("schema", SCHEMA)
    if schema != SCHEMA:
        raise InputError(
            f"unknown schema {schema!r}", field="schema", allowed=SCHEMA, source=source
        )

    for text in overrides:
        path, value = parse_override(text)
        _apply_override(data, path, value)

    def blame(err: InputError) -> InputError:
        return attribute(err, source, overrides)

    try:
        # Without a hardware preset or full spec, the GPU is the topology's own; fields
        # given alone then override that preset.
        hardware = data.get("hardware")
        if (hardware is None or (isinstance(hardware, dict) and not {"preset", "name"} & set(
                hardware))) and "topology" in data:
            data["hardware"] = {"preset": _hardware_of_topology(data["topology"]),
                                **(hardware or {})}
        model, routing_base = _expand(data, "model")
        hardware, _ = _expand(data, "hardware")
        routing_user = data.get("routing")
        routing_user = {} if routing_user is None else routing_user
        if not isinstance(routing_user, dict):
            raise InputError(f"expected a mapping, got {type(routing_user).__name__}",
                             field="routing", allowed="a mapping of routing fields")
        data["model"] = model
        data["routing"] = {**routing_base, **routing_user}
        if hardware:
            data["hardware"] = hardware
        scenario = _validate(data)
    except InputError as err:
        raise blame(err) from None
    return scenario


def _validate(data: dict) -> Scenario:
    try:
        return TypeAdapter(Scenario).validate_python(data)
    except ValidationError as err:
        raise input_error(err, schema=Scenario) from None


def load_scenario(path: str | Path | None = None, *, overrides: Sequence[str] = ()) -> Scenario:
    """Load a scenario YAML file (``None``: the embedded default) and apply overrides.

    The scenario is checked against its topology too (EP size, GPUs, ``M``), so an
    impossible setup fails here with the file's name rather than deep in a run.
    """
    from moesim.config.feasibility import check_feasible

    if path is None:
        source = f"<default scenario {DEFAULT_SCENARIO}>"
        text = resources.files("moesim.config.presets").joinpath(DEFAULT_SCENARIO).read_text()
        data = yaml.safe_load(text)
    else:
        source = str(path)
        data = read_yaml(path)
    scenario = scenario_from_dict(data, source=source, overrides=overrides)
    if scenario.trace is not None and path is not None:
        # A trace named in a scenario file is found next to that file first.
        beside = Path(path).parent / scenario.trace
        if not Path(scenario.trace).is_absolute() and beside.exists():
            scenario = dataclasses.replace(scenario, trace=str(beside))
    try:
        check_feasible(scenario)
    except InputError as err:
        raise attribute(err, source, overrides) from None
    return scenario


def attribute(err: InputError, source: str | None, overrides: Sequence[str]) -> InputError:
    """Blame ``--set`` when an override wrote the faulty field (or a section holding
    it, or a field inside it), the scenario's source otherwise."""
    overridden = {".".join(parse_override(text)[0]) for text in overrides}
    field = err.field or ""
    hit = field and any(
        field == key or field.startswith(key + ".") or key.startswith(field + ".")
        for key in overridden
    )
    return err.with_source("--set" if hit else source)

