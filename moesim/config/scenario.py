"""Scenario: everything one simulation needs, fully resolved (no preset names left)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from moesim.config.hardware import HardwareSpec
from moesim.config.model import ModelShape
from moesim.config.parallel import ParallelConfig
from moesim.config.placement import PlacementConfig
from moesim.config.routing import RoutingPolicy
from moesim.config.serving import ServingConfig
from moesim.config.training import TrainingConfig
from moesim.validation import STRICT, Checked

SCHEMA = "moesim.scenario/1"
SERVING_MODES = ("prefill", "decode")  # the modes that take a `serving` section


@dataclass(frozen=True, kw_only=True, config=STRICT)
class Scenario(Checked):
    """A model on a cluster with a parallel layout and a routing policy.

    ``mode: train`` simulates forward and backward of one step; ``inference`` the
    forward pass only (of ``parallel.tokens_per_gpu`` tokens). The serving modes run one
    forward step of the request batch in ``serving`` (required there, refused
    elsewhere): ``prefill`` the whole prompts (time to first token), ``decode`` one new
    token per request over its KV cache (time per output token). ``topology`` is a
    preset name or a YAML path; ``trace`` a routing trace (``.npz``, schema
    ``moesim.trace/1``) to replay instead of synthetic routing. ``network`` picks the
    network model: ``analytical`` (latency plus the busiest link) or ``flow`` (max-min
    fair sharing among all concurrent flows). ``placement`` puts the experts (and
    redundant replicas) on the GPUs of every EP group. ``training`` holds the choices
    of a training step that set its memory (gradient and optimizer-state types, the
    distributed optimizer; docs/memory.md): used by ``mode: train``, ignored by the
    other modes. A later issue adds the pipeline and schedule fields to this section.
    ``engine`` computes the step's timeline: ``simpy``, the discrete-event engine (one
    process per GPU stream), or ``fast``, the same schedule evaluated op by op for all
    GPUs at once with numpy (:mod:`moesim.engine.recurrence`; identical timelines,
    tested; sweeps and plans use it by default).
    """

    name: str = "scenario"
    mode: Literal["train", "inference", "prefill", "decode"] = "train"
    seed: int = Field(default=0, ge=0)
    model: ModelShape
    hardware: HardwareSpec
    topology: str
    parallel: ParallelConfig
    routing: RoutingPolicy
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    trace: str | None = None
    network: Literal["analytical", "flow"] = "analytical"
    engine: Literal["simpy", "fast"] = "simpy"
    serving: ServingConfig | None = None
    training: TrainingConfig = Field(default_factory=TrainingConfig)

    def to_dict(self) -> dict:
        """Plain nested dict (YAML/JSON ready) that loads back to an equal scenario."""
        return {"schema": SCHEMA, **dataclasses.asdict(self)}
