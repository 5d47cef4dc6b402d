"""PlacementConfig: which GPU holds each expert, and how many replicas each expert gets."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from moesim.validation import STRICT, Checked

PlacementPolicy = Literal["contiguous", "eplb-hierarchical", "eplb-global"]


@dataclass(frozen=True, kw_only=True, config=STRICT)
class PlacementConfig(Checked):
    """Where the routed experts live in each EP group (docs/routing.md section 6).

    ``contiguous``: expert ``e`` on GPU ``e // (E / ep)``, no replicas (``ep`` divides
    ``E``). ``eplb-hierarchical`` and ``eplb-global`` place ``E + redundant_experts``
    physical slots, ``(E + R) / ep`` per GPU, by DeepSeek's EPLB heuristics
    (:mod:`moesim.placement.eplb`) from expert loads: hierarchical keeps each expert group
    (the units a device limit ``M`` selects) on one node, global places replicas
    anywhere. Any expert count works whose slots split evenly over the GPUs.

    ``loads`` are the expert loads the placement is computed from: ``window`` (default)
    routes an earlier, independent window of the same layer (as a serving or training
    system rebalances from recent statistics); ``trace`` counts every token of the
    scenario's trace; anything else is a CSV file with one row per trace layer and one
    column per logical expert, no header.

    ``replica_split`` says how the tokens of a replicated expert divide among its
    replicas: ``source-rank`` (each source rank sends all its tokens of that expert to
    one replica: on its own GPU or node when there is one, else replicas in turn by
    rank, as serving systems' static dispatch maps) or ``even`` (tokens in turn over the
    replicas).
    """

    policy: PlacementPolicy = "contiguous"
    redundant_experts: int = Field(default=0, ge=0, le=16_384)
    loads: str = Field(default="window", min_length=1)
    replica_split: Literal["source-rank", "even"] = "source-rank"

    @property
    def rebalanced(self) -> bool:
        return self.policy != "contiguous"
