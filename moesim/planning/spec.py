"""A plan file: a base scenario, the space to search, a target, constraints and a cost.

Schema ``moesim.plan/1``::

    base: scenario.yaml            # or a mapping; omitted: the embedded default
    set: [parallel.gpus=256]       # overrides applied to the base first
    search:                        # scenario field -> values to try (a grid)
      parallel.ep: [8, 16, 32, 64, 128, 256]
      routing.max_devices: [1, 2, 4, 8]
    zip: []                        # search fields that vary together
    seeds: 2                       # runs per simulated point: mean and spread
    engine: fast                   # as in a sweep file
    target:                        # what the setup must reach (all optional)
      tokens_per_s: 1.0e6          # at least
      tokens_per_s_per_gpu: 3000   # at least
      step_time_s: 2.0             # at most; likewise ttft_s and tpot_s when serving
    constraints:
      memory: true                 # drop setups that do not fit in GPU memory
      max_gpus: 512
      max_nodes: 64
      topologies: [h800-cluster]   # allowed topologies (default: any)
    cost:
      metric: gpu_hours            # gpus | gpu_hours | dollars
      token_budget: 1.0e12         # tokens to process (gpu_hours, dollars)
      price_per_gpu_hour: 2.0      # dollars
    top: 5                         # runners-up to list
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from moesim.config.parallel import MAX_GPUS
from moesim.errors import InputError
from moesim.sweep.spec import Grid, parse_file
from moesim.validation import STRICT, Checked

SCHEMA = "moesim.plan/1"
AT_LEAST = ("tokens_per_s", "tokens_per_s_per_gpu")
AT_MOST = ("step_time_s", "ttft_s", "tpot_s")


@dataclass(frozen=True, kw_only=True, config=STRICT)
class Target(Checked):
    """Bounds the winner must meet: throughputs at least, times at most."""

    # Finite, sensible ranges: a cost or a figure built from 1e308 overflows to inf.
    tokens_per_s: float | None = Field(default=None, ge=1e-6, le=1e15)
    tokens_per_s_per_gpu: float | None = Field(default=None, ge=1e-6, le=1e10)
    step_time_s: float | None = Field(default=None, ge=1e-9, le=1e7)  # 1e7 s: 4 months
    ttft_s: float | None = Field(default=None, ge=1e-9, le=1e7)
    tpot_s: float | None = Field(default=None, ge=1e-9, le=1e7)

    def given(self) -> dict[str, float]:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True, kw_only=True, config=STRICT)
class Constraints(Checked):
    memory: bool = True
    max_gpus: int | None = Field(default=None, gt=0, le=MAX_GPUS)
    max_nodes: int | None = Field(default=None, gt=0, le=MAX_GPUS)
    topologies: list[str] | None = Field(default=None, min_length=1)


@dataclass(frozen=True, kw_only=True, config=STRICT)
class Cost(Checked):
    metric: Literal["gpus", "gpu_hours", "dollars"] = "gpus"
    # 1e18 tokens is 100,000 times a frontier model's training; with 65,536 GPUs and
    # the price bound every cost stays finite.
    token_budget: float | None = Field(default=None, ge=1, le=1e18)
    price_per_gpu_hour: float | None = Field(default=None, ge=1e-6, le=1e6)

    @property
    def unit(self) -> str:
        return {"gpus": "GPUs", "gpu_hours": "GPU-hours", "dollars": "$"}[self.metric]

    def of(self, gpus: int, tokens_per_s: float) -> float:
        """The cost of a setup of ``gpus`` GPUs that processes ``tokens_per_s``."""
        if self.metric == "gpus":
            return float(gpus)
        hours = gpus * self.token_budget / tokens_per_s / 3600
        return hours if self.metric == "gpu_hours" else hours * self.price_per_gpu_hour


@dataclass(frozen=True, kw_only=True, config=STRICT)
class PlanFile(Grid):
    """The fields of a plan file (module doc): a sweep file's, the axes named ``search``,
    and what makes a setup the best."""

    axes_key: ClassVar[str] = "search"

    search: dict[str, list[Any]] = Field(min_length=1)
    target: Target = Field(default_factory=Target)
    constraints: Constraints = Field(default_factory=Constraints)
    cost: Cost = Field(default_factory=Cost)
    top: int = Field(default=5, ge=1, le=1000)


def parse_plan(data: Any, *, source: str) -> PlanFile:
    """Validate a plan mapping as read from YAML."""
    plan = parse_file(data, PlanFile, schema=SCHEMA, source=source, what="plan")
    for i, name in enumerate(plan.constraints.topologies or ()):
        from pathlib import Path

        from moesim.topologies import preset_names

        if name not in preset_names() and not Path(name).is_file():
            raise InputError(f"unknown topology {name!r}", field=f"constraints.topologies[{i}]",
                             source=source, allowed=", ".join(preset_names()) + ", or a file")
    cost = plan.cost
    if cost.metric != "gpus" and cost.token_budget is None:
        raise InputError(f"cost.metric {cost.metric} needs the tokens to process",
                         field="cost.token_budget", source=source,
                         allowed="a number of tokens, e.g. 1.0e12")
    if cost.metric == "dollars" and cost.price_per_gpu_hour is None:
        raise InputError("cost.metric dollars needs a price", field="cost.price_per_gpu_hour",
                         source=source, allowed="dollars per GPU-hour, e.g. 2.0")
    return plan
