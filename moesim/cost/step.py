"""What one mode's step costs on each GPU, in the one shape the step assembly reads.

Every mode answers the same questions (:class:`StepCosts`): which passes run, what the
routing sees, the seconds of the ops that do not depend on the routing, the seconds of
one MoE layer's expert GEMMs from the tokens each GPU received, and the step's tokens
and useful FLOPs. Every cost is a pair: compute seconds, which lose the SMs given to
communication, and communication seconds that follow them on the compute stream (a
tensor-parallel all-reduce), which do not. :func:`moesim.cost.modes.step_costs` picks
the mode's implementation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from moesim.config.scenario import Scenario

Cost = tuple[float | np.ndarray, float | np.ndarray]  # (compute s, communication s), per GPU


class StepCosts(ABC):
    """One mode's per-GPU costs of a step of ``scenario`` on ``topology``."""

    passes: tuple[bool, ...]  # the backward flags of the passes that run: (False,) forward

    def __init__(self, scenario: Scenario, topology) -> None:
        self.scenario, self.topology = scenario, topology

    @property
    def train(self) -> bool:
        return True in self.passes

    @abstractmethod
    def routed_scenario(self) -> Scenario:
        """The scenario as the routing sees it (``tokens_per_gpu``: the tokens each GPU
        dispatches per step)."""

    @abstractmethod
    def fixed(self) -> dict[tuple[str, bool], Cost]:
        """Per (phase, backward): one micro-batch's attention, shared experts, dense FFN and
        LM head, whose cost does not depend on the routing."""

    @abstractmethod
    def experts(self, tokens_ge: np.ndarray, received_g: np.ndarray, *,
                backward: bool) -> tuple[np.ndarray, np.ndarray]:
        """One MoE layer and micro-batch's expert GEMMs per GPU, from the assignments
        ``tokens_ge`` [gpus, local experts] and the tokens ``received_g`` [gpus] each
        GPU's dispatch delivered: (compute s, communication s), each [gpus]."""

    @abstractmethod
    def step_tokens(self) -> int:
        """Tokens the step processes, all GPUs."""

    @abstractmethod
    def model_flops(self) -> float:
        """Useful FLOPs of the step, all GPUs (for MFU)."""

    def summary_keys(self, step_s: float, *, expert_comm_s: float) -> dict:
        """The mode's own summary keys (docs/metrics.md); ``expert_comm_s`` is the mean
        per-GPU communication seconds of the expert ops over the step."""
        return {}
