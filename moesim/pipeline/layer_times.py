"""Per-layer times of one micro-batch, read off a simulated expert-parallel step.

The whole training step simulates one micro-batch of one pipeline stage's GPUs through
every layer, forward and backward, on the op engine (routing, dispatch, experts,
combine and the waits of an imbalanced EP group included). Every collective
synchronises its EP group, so the latest end of a layer's last op over the GPUs is when
the layer is done for the stage; a chunk of layers takes the difference of two such
times. Communication ops are counted apart: that is the part a concurrent chunk's
compute can hide (DualPipe's forward/backward overlap).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True, kw_only=True)
class LayerTimes:
    """Per model layer ``[L + 1]`` (index ``L``: the LM head) of one micro-batch, seconds
    on the stage's critical path: forward and backward, and of each the communication
    ops' time."""

    forward_s: np.ndarray
    backward_s: np.ndarray
    forward_comm_s: np.ndarray
    backward_comm_s: np.ndarray


def layer_times(spans: pd.DataFrame, num_layers: int) -> LayerTimes:
    """:class:`LayerTimes` of a simulated one-micro-batch training step's ``spans``
    (``moesim.output.tables.spans_table``; layer ``num_layers`` is the LM head)."""
    assert (spans["microbatch"] == 0).all(), "one micro-batch"
    n = num_layers + 1
    done = spans.groupby(["backward", "layer"], observed=True)["end_s"].max()
    fwd_end = done.loc[False].reindex(range(n)).to_numpy()
    bwd_end = done.loc[True].reindex(range(n)).to_numpy()
    assert not np.isnan(fwd_end).any() and not np.isnan(bwd_end).any()
    # Forward runs layers 0..L (the head last), backward L..0 (the head first).
    forward = np.diff(np.concatenate(([0.0], fwd_end)))
    backward = np.empty(n)
    backward[num_layers] = bwd_end[num_layers] - fwd_end[num_layers]
    backward[:num_layers] = bwd_end[:num_layers] - bwd_end[1:]
    comm = spans[spans["stream"] == "comm"]
    comm_s = (comm.assign(d=comm["end_s"] - comm["start_s"])
              .groupby(["backward", "layer", "gpu"], observed=True)["d"].sum()
              .groupby(level=[0, 1]).max())

    def comm_of(backward: bool) -> np.ndarray:
        if backward not in comm_s.index.get_level_values(0):
            return np.zeros(n)
        return comm_s.loc[backward].reindex(range(n), fill_value=0.0).to_numpy()

    return LayerTimes(forward_s=forward, backward_s=backward,
                      forward_comm_s=comm_of(False), backward_comm_s=comm_of(True))
