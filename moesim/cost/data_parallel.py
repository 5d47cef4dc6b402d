"""The end of a training step: data-parallel gradient reduction and the optimizer step.

Each pipeline stage's parameters are replicated over its data-parallel GPUs: the dense
ones (attention, norms, routers, shared experts, dense FFNs, and on the end stages the
embedding, LM head and MTP modules) over ``dp`` GPUs, the routed experts over the
``expert_dp = stage_gpus / ep`` GPUs that hold the same expert slots. After the last
backward the gradients are reduced over those groups: with the distributed optimizer
(Megatron-LM's, as ZeRO stage 1) a reduce-scatter of the gradients, the optimizer
updating its shard, then an all-gather of the BF16 parameters; without it an
all-reduce and every GPU updating all its parameters. The collectives are NCCL rings
(:func:`moesim.comm.collectives.collective_time`); a strided group (the expert-DP ranks
are ``ep`` GPUs apart) crosses NVLink domains whenever the stage does.

The optimizer (Adam) is memory-bound: per parameter it updates it reads the gradient,
reads and writes the FP32 master copy and the two moments, and writes the BF16
parameter, at the GPU's HBM bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.comm.collectives import collective_time, spread_out
from moesim.config.scenario import Scenario
from moesim.config.training_layout import TrainingLayout, chunk_layers
from moesim.cost.compute import attention_projection_params

BF16, FP32 = 2, 4


@dataclass(frozen=True, kw_only=True)
class StageParams:
    """Parameters one GPU of a pipeline stage holds."""

    dense: float  # replicated over the stage's dp GPUs
    routed: float  # its routed expert slots, replicated over expert_dp GPUs


def layer_params(scenario: Scenario, layer: int) -> StageParams:
    """The parameters of model layer ``layer`` on one GPU (routed: the GPU's slots)."""
    m, p = scenario.model, scenario.parallel
    h, tp = m.hidden_size, p.tp
    norms = 2 * h + ((m.q_lora_rank or 0) + m.kv_lora_rank if m.attention == "mla" else 0)
    # Tensor parallelism splits the projections and FFN widths, not norms and routers.
    dense = attention_projection_params(m) / tp + norms
    if layer < m.first_dense_layers:
        return StageParams(dense=float(dense + 3 * h * m.dense_intermediate_size / tp),
                           routed=0.0)
    slots = -(-(m.routed_experts + scenario.placement.redundant_experts) // p.ep)
    expert = 3 * h * m.moe_intermediate_size
    return StageParams(dense=float(dense + h * m.routed_experts
                                   + m.shared_experts * expert / tp),
                       routed=float(slots * expert / p.moe_tp))


def stage_params(scenario: Scenario, layout: TrainingLayout) -> list[StageParams]:
    """[pp] what one GPU of each stage holds: its layers; the embedding with the first
    layer; the final norm, LM head and ``mtp_layers`` MTP modules (a projection of
    ``2 h x h``, two norms and one MoE layer each, DeepSeek-V3 report sec. 2.2) with the
    last."""
    m, tp = scenario.model, scenario.parallel.tp
    h, last = m.hidden_size, m.num_layers - 1
    mtp = layer_params(scenario, last)
    out = []
    for chunks in chunk_layers(layout, m):
        dense = routed = 0.0
        for layer in (layer for chunk in chunks for layer in chunk):
            part = layer_params(scenario, layer)
            dense, routed = dense + part.dense, routed + part.routed
            if layer == 0:
                dense += m.vocab_size * h / tp
            if layer == last:
                dense += (m.vocab_size * h / tp + h
                          + m.mtp_layers * (mtp.dense + 2 * h * h / tp + 2 * h))
                routed += m.mtp_layers * mtp.routed
        out.append(StageParams(dense=dense, routed=routed))
    return out


def _ring(scenario: Scenario, topology, *, op: str, size: float, n: int, stride: int) -> float:
    """One NCCL ``op`` over ``n`` GPUs ``stride`` apart within a stage's block of GPUs."""
    hw = scenario.hardware
    spans = n * stride > topology.gpus_per_domain and topology.n_domains > 1
    seen = spread_out(topology) if spans and n <= topology.gpus_per_domain else topology
    return float(collective_time(hw, seen, op=op, size=size, n=n))


@dataclass(frozen=True, kw_only=True)
class StepTail:
    """Per stage [pp]: seconds of the gradient reduction, the parameter all-gather
    (distributed optimizer; 0 without) and the optimizer step on one GPU."""

    grad_reduce_s: np.ndarray
    param_gather_s: np.ndarray
    optimizer_s: np.ndarray
    grad_bytes: np.ndarray  # gradient bytes one GPU sends into the reduction


def step_tail(scenario: Scenario, topology, layout: TrainingLayout) -> StepTail:
    """The data-parallel and optimizer costs of every stage (module doc)."""
    t, hw = scenario.training, scenario.hardware
    grad = FP32 if t.grad_dtype == "fp32" else BF16
    moments = FP32 if t.optimizer_state_dtype == "fp32" else BF16
    # grad read, master read+write, two moments read+write, BF16 parameter write
    per_param = grad + 2 * FP32 + 4 * moments + BF16
    groups = (("dense", layout.dp, layout.tp * layout.cp),
              ("routed", layout.expert_dp, layout.ep * scenario.parallel.moe_tp))
    reduce_s, gather_s, optimizer_s, grad_bytes = [], [], [], []
    for params in stage_params(scenario, layout):
        red = gat = updated = sent = 0.0
        for name, n, stride in groups:
            count = getattr(params, name)
            sent += count * grad
            if t.distributed_optimizer:
                red += _ring(scenario, topology, op="reduce_scatter", size=count * grad,
                             n=n, stride=stride)
                gat += _ring(scenario, topology, op="all_gather", size=count * BF16, n=n,
                             stride=stride)
                updated += count / n
            else:
                red += _ring(scenario, topology, op="all_reduce", size=count * grad, n=n,
                             stride=stride)
                updated += count
        reduce_s.append(red)
        gather_s.append(gat)
        optimizer_s.append(updated * per_param / (hw.hbm_GBps * 1e9 * hw.memory_efficiency))
        grad_bytes.append(sent)
    return StepTail(grad_reduce_s=np.array(reduce_s), param_gather_s=np.array(gather_s),
                    optimizer_s=np.array(optimizer_s), grad_bytes=np.array(grad_bytes))
