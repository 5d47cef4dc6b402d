"""Tensor and context parallelism in a training layer: the communication they add.

A GPU of a TP x CP group computes ``1 / (tp x cp)`` of a micro-batch's attention and
FFN work: with sequence parallelism (Megatron-LM's, required with MoE and TP) it holds
``tokens / (tp x cp)`` tokens between the blocks, the heads and FFN widths of
``1 / tp`` inside them, and the queries of ``1 / cp`` of every sequence. The op engine
therefore charges a GPU the compute of its ``tokens / (tp x cp)`` tokens over full
widths, which is the same FLOPs. What this module adds is the communication:

* **TP** (Korthikanti et al. 2022, arXiv 2205.05198, sec. 4.2.2): before the attention
  block and before the FFN block an all-gather of the block's input over the TP group,
  after each a reduce-scatter of its output: two all-gathers and two reduce-scatters of
  ``tokens / cp x hidden`` BF16 values per layer forward, the same with the roles
  swapped in the backward. They sit on the critical path (the next GEMM needs them).
* **CP** (ring attention, as Megatron-Core/Transformer Engine run it): every GPU needs
  the keys and values of the other ``cp - 1`` chunks of each sequence; they travel
  while the attention core of the chunks at hand computes, so only what the core does
  not cover is added. The backward sends the key and value gradients back as well
  (twice the bytes).

A TP group is ``tp`` consecutive GPUs (NVLink); a CP group is ``cp`` GPUs ``tp`` apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from moesim.comm.collectives import strided_collective_time
from moesim.config.model import ModelShape
from moesim.cost.compute import ACT_BYTES, BACKWARD_ATTENTION_CORE


@dataclass(frozen=True, kw_only=True)
class LayerComm:
    """Seconds one layer's TP and CP communication adds to a micro-batch, on one GPU."""

    forward_s: float
    backward_s: float


def kv_values_per_token(m: ModelShape, tp: int) -> int:
    """Key and value elements one token carries in a GPU's ``num_heads / tp`` heads (MLA
    in training is not absorbed: per-head keys and values)."""
    if m.attention == "mla":
        return m.num_heads // tp * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
    return max(m.kv_heads // tp, 1) * 2 * m.head_dim


def layer_comm(m: ModelShape, hw, topology, *, tokens: int, tp: int, cp: int,
               attention_core_s: float) -> LayerComm:
    """:class:`LayerComm` of a layer whose micro-batch puts ``tokens`` tokens on each GPU
    (``tokens x tp`` per CP rank); ``attention_core_s`` is the core's forward time that
    hides CP's key/value exchange (module doc)."""
    forward = backward = 0.0
    if tp > 1:
        block = tokens * tp * m.hidden_size * ACT_BYTES  # one CP rank's block input
        gather, scatter = (strided_collective_time(hw, topology, op=op, size=block, n=tp,
                                                   stride=1)
                           for op in ("all_gather", "reduce_scatter"))
        forward += 2 * (gather + scatter)
        backward += 2 * (gather + scatter)
    if cp > 1:
        kv = cp * tokens * tp * kv_values_per_token(m, tp) * ACT_BYTES
        ring = strided_collective_time(hw, topology, op="all_gather", size=kv, n=cp, stride=tp)
        forward += max(ring - attention_core_s, 0.0)
        backward += max(2 * ring - BACKWARD_ATTENTION_CORE * attention_core_s, 0.0)
    return LayerComm(forward_s=forward, backward_s=backward)
