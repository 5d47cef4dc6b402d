"""moesim: a cluster simulator and capacity planner for DeepSeekMoE-style MoE models.

The public names load lazily, so ``import moesim`` (and ``moesim --help``) stays
fast: nothing heavy is imported until it is used.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "load_scenario": "moesim.config.loading",
    "scenario_from_dict": "moesim.config.loading",
    "Scenario": "moesim.config.scenario",
    "ModelShape": "moesim.config.model",
    "HardwareSpec": "moesim.config.hardware",
    "ParallelConfig": "moesim.config.parallel",
    "RoutingPolicy": "moesim.config.routing",
    "ServingConfig": "moesim.config.serving",
    "simulate": "moesim.simulation",
    "SimResult": "moesim.output.result",
    "InputError": "moesim.errors",
    "RoutingTrace": "moesim.tracefile.format",
}

__all__ = [
    "HardwareSpec",
    "InputError",
    "ModelShape",
    "ParallelConfig",
    "RoutingPolicy",
    "RoutingTrace",
    "Scenario",
    "ServingConfig",
    "SimResult",
    "load_scenario",
    "scenario_from_dict",
    "simulate",
]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:
    from moesim.config.hardware import HardwareSpec
    from moesim.config.loading import load_scenario, scenario_from_dict
    from moesim.config.model import ModelShape
    from moesim.config.parallel import ParallelConfig
    from moesim.config.routing import RoutingPolicy
    from moesim.config.scenario import Scenario
    from moesim.config.serving import ServingConfig
    from moesim.errors import InputError
    from moesim.output.result import SimResult
    from moesim.simulation import simulate
    from moesim.tracefile.format import RoutingTrace


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moesim' has no attribute {name!r}")
