"""Cluster topologies: GPUs, NVSwitch domains and leaf/spine fabrics as networkx graphs.

>>> from moesim.topologies import load_topology
>>> topo = load_topology("h800-cluster", gpus=64)
>>> topo.n_domains, topo.rails, round(topo.nvlink_bw / 1e9)
(8, 8, 160)

Presets live next to this file as ``<name>.yaml`` (schema ``moesim.topology/1``); any
YAML file of the same schema can be loaded by path. Drawing is in
:mod:`moesim.topologies.draw` so that matplotlib is imported only when asked for.
"""

from __future__ import annotations

import os

from .analysis import bisection_bandwidth
from .build import Topology, build_topology
from .spec import TopologySpec, domains_for, preset_names, read_spec

__all__ = ["Topology", "TopologySpec", "bisection_bandwidth", "load_topology", "preset_names",
           "read_spec"]


def load_topology(name_or_path: str | os.PathLike[str], *, gpus: int | None = None) -> Topology:
    """Build a preset (by name) or a topology YAML file (by path) for ``gpus`` GPUs.

    The result has ``ceil(gpus / gpus_per_domain)`` NVLink domains and exactly ``gpus``
    GPUs: more than one domain must be whole domains, a single domain may be partial.
    ``gpus=None`` takes the file's ``default_gpus``. Mistakes raise
    :class:`moesim.errors.InputError` naming the source, the field and what is allowed.
    """
    spec, source = read_spec(name_or_path)
    if gpus is None:
        gpus = spec.default_gpus
    domains_for(spec, gpus, source=source)
    return build_topology(spec, int(gpus))
