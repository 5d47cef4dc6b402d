"""Which :class:`~moesim.cost.step.StepCosts` each scenario mode uses."""

from __future__ import annotations

from moesim.config.scenario import Scenario
from moesim.cost.serving import ServingCosts
from moesim.cost.step import StepCosts
from moesim.cost.training import TrainingCosts

MODES: dict[str, type[StepCosts]] = {
    "train": TrainingCosts,
    "inference": TrainingCosts,
    "prefill": ServingCosts,
    "decode": ServingCosts,
}


def step_costs(scenario: Scenario, topology) -> StepCosts:
    """The per-GPU costs of one step of ``scenario`` in its mode."""
    return MODES[scenario.mode](scenario, topology)
