"""The topology file schema (``moesim.topology/1``) and how a preset or file becomes a spec.

pydantic checks shapes and types; the cross-field rules pydantic cannot express (which
fabric fields belong to which kind, whole domains) are checked here by hand so that every
mistake still names its field.
"""

from __future__ import annotations

import functools
import os
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError

from moesim.errors import InputError
from moesim.inputs import load_yaml, read_text
from moesim.validation import StrictModel, field_names, input_error

SCHEMA = "moesim.topology/1"
FABRIC_KINDS = ("none", "rail-optimized", "multi-plane")
MAX_SPINES = 4096  # per fabric (or per plane): far beyond a two-layer fat tree
# Leaf-to-spine links at max_gpus: each is a networkx edge, ~10 s per 131,072 built.
MAX_UPLINKS = 2**18
_PACKAGE = "moesim.topologies"

# README: Limits. The scenario's own bound (moesim.config.parallel.MAX_GPUS) is the same;
# config imports topologies, not the other way round, so each states it.
MAX_GPUS = 65_536


class _Strict(StrictModel):
    # strict: a quoted "8" in YAML is a mistake, not a number.
    model_config = ConfigDict(**StrictModel.model_config, strict=True)


class LinkSpec(_Strict):
    """One link class: nominal bandwidth per direction, achievable fraction, per-hop latency."""

    bandwidth_GBps: float = Field(gt=0, description="nominal, per direction, 1 GB = 1e9 bytes")
    efficiency: float = Field(gt=0, le=1, description="achievable fraction of nominal")
    latency_us: float = Field(ge=0, description="per hop, microseconds")


class UplinkSpec(_Strict):
    """Leaf-spine links: their bandwidth follows from the leaf's downlinks and oversubscription."""

    efficiency: float = Field(gt=0, le=1)
    latency_us: float = Field(ge=0)


class LinksSpec(_Strict):
    nvlink: LinkSpec
    nic: LinkSpec | None = None
    uplink: UplinkSpec | None = None


class FabricSpec(_Strict):
    kind: Literal["none", "rail-optimized", "multi-plane"]
    rails: int = Field(default=1, ge=1, le=MAX_GPUS, description="NIC rails per domain (= planes)")
    domains_per_leaf: int | None = Field(default=None, ge=1, le=MAX_GPUS)
    spines: int | None = Field(default=None, ge=1, le=MAX_SPINES, description="rail-optimized only")
    spines_per_plane: int | None = Field(default=None, ge=1, le=MAX_SPINES,
                                         description="multi-plane only")
    oversubscription: float = Field(default=1.0, gt=0, description="leaf down / leaf up bw")


class TopologySpec(_Strict):
    schema_: Literal["moesim.topology/1"] = Field(alias="schema")
    name: str = Field(min_length=1)
    description: str = ""
    source: str
    gpu: str = Field(min_length=1, description="GPU hardware preset name")
    gpus_per_domain: int = Field(ge=1, le=MAX_GPUS)
    default_gpus: int = Field(ge=1, le=MAX_GPUS)
    max_gpus: int = Field(ge=1, le=MAX_GPUS, description="README Limits: 65,536 GPUs")
    links: LinksSpec
    fabric: FabricSpec


def preset_names() -> list[str]:
    """Sorted names of the topology presets shipped with moesim."""
    folder = resources.files(_PACKAGE)
    return sorted(
        entry.name[: -len(".yaml")] for entry in folder.iterdir() if entry.name.endswith(".yaml")
    )


def read_spec(name_or_path: str | os.PathLike[str]) -> tuple[TopologySpec, str]:
    """The checked spec of a preset name or YAML file, and the source to name in errors."""
    name_or_path = os.fspath(name_or_path)
    names = preset_names()
    if name_or_path in names:
        return _preset(name_or_path), name_or_path
    if _looks_like_path(name_or_path):
        source = name_or_path
        if not Path(name_or_path).exists():
            raise InputError(
                "no such topology file",
                source=source,
                allowed="a YAML file or a preset: " + ", ".join(names),
            )
        text = read_text(name_or_path, what="topology file")
    else:
        raise InputError(
            f"unknown topology preset {name_or_path!r}", field="topology", allowed=", ".join(names)
        )
    return parse_spec(text, source=source), source


@functools.cache
def _preset(name: str) -> TopologySpec:
    """A shipped preset's checked spec, read once per process (a sweep reads it for every
    point; the spec is frozen)."""
    text = resources.files(_PACKAGE).joinpath(f"{name}.yaml").read_text("utf-8")
    return parse_spec(text, source=name)


def _looks_like_path(text: str) -> bool:
    return text.endswith((".yaml", ".yml")) or os.sep in text or "/" in text or Path(text).exists()


def parse_spec(text: str, *, source: str) -> TopologySpec:
    """Parse and check YAML text; every problem becomes an :class:`InputError`."""
    data = load_yaml(text, source=source)
    if not isinstance(data, dict):
        raise InputError(
            "a topology file holds a YAML mapping of fields",
            source=source,
            allowed=", ".join(field_names(TopologySpec)),
        )
    try:
        spec = TopologySpec.model_validate(data)
    except ValidationError as exc:
        raise input_error(exc, schema=TopologySpec, source=source) from None
    _check(spec, source)
    return spec


def _check(spec: TopologySpec, source: str) -> None:
    def fail(problem: str, field: str, allowed: str | None = None) -> None:
        raise InputError(problem, field=field, allowed=allowed, source=source)

    fabric, gpd = spec.fabric, spec.gpus_per_domain
    if fabric.kind == "none":
        for name in sorted(fabric.model_fields_set - {"kind"}):
            fail("has no meaning when fabric kind is 'none'", f"fabric.{name}", "kind")
        for name in ("nic", "uplink"):
            if getattr(spec.links, name) is not None:
                fail("fabric kind 'none' has no network; remove this link class", f"links.{name}")
        if spec.max_gpus > gpd:
            fail("without a fabric a topology is a single domain", "max_gpus", f"1..{gpd}")
    else:
        for name in ("nic", "uplink"):
            if getattr(spec.links, name) is None:
                fail(f"fabric kind {fabric.kind!r} needs this link class", f"links.{name}")
        if fabric.domains_per_leaf is None:
            fail(f"fabric kind {fabric.kind!r} needs it", "fabric.domains_per_leaf")
        if gpd % fabric.rails:
            divisors = [d for d in range(1, gpd + 1) if gpd % d == 0]
            fail(
                f"every rail needs the same number of GPUs of each {gpd}-GPU domain",
                "fabric.rails",
                ", ".join(map(str, divisors)),
            )
        needed, other = (
            ("spines", "spines_per_plane")
            if fabric.kind == "rail-optimized"
            else ("spines_per_plane", "spines")
        )
        if getattr(fabric, needed) is None:
            fail(f"fabric kind {fabric.kind!r} needs it", f"fabric.{needed}")
        if getattr(fabric, other) is not None:
            fail(f"not used by fabric kind {fabric.kind!r}", f"fabric.{other}", needed)
        uplinks = _uplinks_at_most(spec)
        if uplinks > MAX_UPLINKS:
            fail(f"{uplinks:,} leaf-spine links at max_gpus {spec.max_gpus:,}",
                 f"fabric.{needed}",
                 f"leaves x {needed} at most {MAX_UPLINKS:,} (fewer spines or max_gpus)")
    if spec.max_gpus > gpd and spec.max_gpus % gpd:
        fail(
            f"more than one domain must be whole domains of {gpd} GPUs",
            "max_gpus",
            f"1..{gpd} or a multiple of {gpd}",
        )
    domains_for(spec, spec.default_gpus, source=source, field="default_gpus")


def _uplinks_at_most(spec: TopologySpec) -> int:
    """Leaf-spine links of the topology built with ``max_gpus`` (as topologies/build.py
    lays them out), so that no GPU count a file allows builds a graph too big to hold."""
    fabric = spec.fabric
    assert fabric.domains_per_leaf is not None
    domains = -(-spec.max_gpus // spec.gpus_per_domain)
    leaves_per_rail = -(-domains // fabric.domains_per_leaf)
    leaves = min(fabric.rails, spec.max_gpus) * leaves_per_rail
    if fabric.kind == "multi-plane":
        return leaves * (fabric.spines_per_plane or 0) if leaves_per_rail > 1 else 0
    return leaves * (fabric.spines or 0) if leaves > 1 else 0


def domains_for(spec: TopologySpec, gpus: Any, *, source: str | None, field: str = "gpus") -> int:
    """How many domains ``gpus`` GPUs take; an InputError when the topology cannot hold them."""
    gpd, most = spec.gpus_per_domain, spec.max_gpus
    allowed = f"1..{most}" if most <= gpd else f"1..{gpd} or a multiple of {gpd} up to {most}"
    if isinstance(gpus, bool) or not isinstance(gpus, typing.SupportsIndex):
        raise InputError(
            f"must be a whole number, got {gpus!r}", field=field, allowed=allowed, source=source
        )
    gpus = int(gpus)
    if gpus < 1:
        raise InputError(
            f"must be at least 1, got {gpus}", field=field, allowed=allowed, source=source
        )
    if gpus > most:
        raise InputError(
            f"{gpus} GPUs is more than the topology has ({most})",
            field=field,
            allowed=f"1..{most}",
            source=source,
        )
    n_domains = -(-gpus // gpd)
    if n_domains > 1 and gpus % gpd:
        raise InputError(
            f"{gpus} GPUs would leave a partial domain ({gpus % gpd} of {gpd} GPUs); "
            "more than one domain needs whole domains",
            field=field,
            allowed=allowed,
            source=source,
        )
    return n_domains
