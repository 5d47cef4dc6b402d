"""SimResult: what one simulation returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from moesim.config.scenario import Scenario
    from moesim.output.summary import Summary


@dataclass(frozen=True, kw_only=True)
class SimResult:
    """The summary of one step plus its tables (see docs/metrics.md).

    * ``spans``: gpu, ep_group, layer, microbatch, phase, stream, backward, arrive_s,
      start_s, end_s (one row per op and GPU; ``start_s - arrive_s`` is time spent
      waiting for slower peers in a collective)
    * ``links``: link, src, dst, kind, bytes, busy_s, utilization (per directed link)
    * ``experts``: layer, expert, tokens, dropped (forward assignments per MoE layer)
    * ``pipeline`` (the whole training step only; the other tables are then one
      micro-batch on one pipeline stage's GPUs): stage, order, kind, microbatch,
      chunk, bwd_microbatch, bwd_chunk, start_s, end_s (one row per schedule item)
    """

    scenario: Scenario
    summary: Summary  # a dict with the keys of moesim.output.summary.Summary
    spans: pd.DataFrame
    links: pd.DataFrame
    experts: pd.DataFrame
    pipeline: pd.DataFrame | None = None  # the whole training step's schedule
    balance: pd.DataFrame | None = None  # the balance policy's steps (routing.balance)
    warnings: tuple[str, ...] = ()  # what the user should know about these numbers
