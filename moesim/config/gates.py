"""The gate catalogue: every MoE gate moesim knows, one row each.

Scenarios (``routing.gate``), the torch routing layers of :mod:`moesim.traces` and the
``capture`` command all take their gate names and properties from :data:`GATES`; adding
a gate is a row here plus its selection rule in ``traces/gates.py``. The rules are
stated in docs/routing.md (sections 1-3 and 5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, kw_only=True)
class Gate:
    """One gate's name and the properties the rest of moesim asks about."""

    name: str
    summary: str  # one line, for help texts
    scores: Literal["softmax", "sigmoid"]  # what turns router logits into affinities
    # Re-routes stored scores under a device limit M: the DeepSeek family, the only gates
    # a scenario's `routing.gate` may name (the simulator replays their selection).
    scenario: bool
    group_rule: Literal["max", "top2sum"] = "max"  # a group's score under a group limit
    fixed_top_k: int | None = None  # the gate's paper fixes K
    fixed_weights: bool = False  # no route scale, no renormalisation knob


GATES: dict[str, Gate] = {gate.name: gate for gate in (
    Gate(name="softmax-topk", summary="DeepSeekMoE / V1: softmax, top-K", scores="softmax",
         scenario=True),
    Gate(name="device-limited", summary="DeepSeek-V2: top-K within the M best devices",
         scores="softmax", scenario=True),
    Gate(name="group-limited-sigmoid",
         summary="DeepSeek-V3: sigmoid, top-2-sum groups, aux-loss-free bias",
         scores="sigmoid", scenario=True, group_rule="top2sum"),
    Gate(name="switch-top1", summary="Switch Transformer: top-1", scores="softmax",
         scenario=False, fixed_top_k=1, fixed_weights=True),
    Gate(name="gshard-top2", summary="GShard: top-2, first choices first", scores="softmax",
         scenario=False, fixed_top_k=2, fixed_weights=True),
    Gate(name="noisy-topk", summary="Shazeer et al. 2017: noisy top-K", scores="softmax",
         scenario=False, fixed_weights=True),
)}

GATE_NAMES: tuple[str, ...] = tuple(GATES)
SCENARIO_GATES: tuple[str, ...] = tuple(name for name, g in GATES.items() if g.scenario)
