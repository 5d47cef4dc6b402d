"""The end of a training step: data-parallel gradient reduction and the optimizer step.

Each pipeline stage's parameters are replicated over its data-parallel GPUs: the dense
ones (attention, norms, routers, shared experts, dense FFNs, and on the end stages the
embedding, LM head and MTP modules) over the ``dp x cp`` GPUs of its TP rank, the
routed experts over the ``expert_dp = stage_gpus / (ep x moe_tp)`` GPUs that hold the
same expert shards. After the last
backward the gradients are reduced over those groups: with the distributed optimizer
(Megatron-LM's, as ZeRO stage 1) a reduce-scatter of the gradients, the optimizer
updating its shard, then an all-gather of the BF16 parameters; without it an
all-reduce and every GPU updating all its parameters. The collectives are NCCL rings
(:func:`moesim.comm.collectives.collective_time`); a strided group (the expert-DP ranks
are ``ep`` GPUs apart) crosses NVLink domains whenever the stage does.

The optimizer (Adam) is memory-bound: per parameter it updates it reads the gradient,
reads and writes the FP32 master copy and the two moments, and writes the BF16
parameter, at the GPU's HBM bandwidth; an FP8 or FP4 recipe then casts every weight
the GPU holds to its GEMM format once
(:func:`moesim.cost.elementwise.weight_quantize_seconds`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.comm.collectives import strided_collective_time
from moesim.config.scenario import Scenario
from moesim.config.training_layout import TrainingLayout, training_precision
from moesim.cost.elementwise import weight_quantize_seconds

BF16, FP32 = 2, 4


@dataclass(frozen=True, kw_only=True)
class StageParams:
    """Parameters one GPU of a pipeline stage holds."""

    dense: float  # replicated over the stage's dp x cp GPUs
    routed: float  # its routed expert slots, replicated over expert_dp GPUs


def stage_params(scenario: Scenario, layout: TrainingLayout) -> list[StageParams]:
    """[pp] what one GPU of each stage holds, as the memory model counts it
    (:func:`moesim.memory.model.stage_param_counts`: its layers, the embedding with the
    first, the final norm, LM head and MTP modules with the last; DualPipe: both
    stages)."""
    from moesim.memory.model import stage_chunks, stage_param_counts

    out = []
    for chunks in stage_chunks(scenario, layout):
        counts = stage_param_counts(scenario, chunks)
        out.append(StageParams(dense=counts.dense, routed=counts.routed))
    return out


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
    # Megatron-LM reduces and shards the dense weights over the data- and
    # context-parallel GPUs together (its intra_dp_cp group), the experts over the
    # expert-data-parallel ones.
    groups = (("dense", layout.dp * layout.cp, layout.tp),
              ("routed", layout.expert_dp, layout.ep * scenario.parallel.moe_tp))
    precision = training_precision(scenario)
    reduce_s, gather_s, optimizer_s, grad_bytes = [], [], [], []
    for params in stage_params(scenario, layout):
        red = gat = updated = sent = 0.0
        for name, n, stride in groups:
            count = getattr(params, name)
            sent += count * grad

            def ring(op: str, size: float, n=n, stride=stride) -> float:
                return strided_collective_time(hw, topology, op=op, size=size, n=n,
                                               stride=stride)

            if t.distributed_optimizer:
                red += ring("reduce_scatter", count * grad)
                gat += ring("all_gather", count * BF16)
                updated += count / n
            else:
                red += ring("all_reduce", count * grad)
                updated += count
        reduce_s.append(red)
        gather_s.append(gat)
        # Low-precision recipes cast each updated weight once per step, for every
        # micro-batch's GEMMs (moesim.cost.elementwise).
        cast = weight_quantize_seconds(hw, weights=params.dense + params.routed,
                                       precision=precision)
        optimizer_s.append(updated * per_param / (hw.hbm_GBps * 1e9 * hw.memory_efficiency)
                           + cast)
        grad_bytes.append(sent)
    return StepTail(grad_reduce_s=np.array(reduce_s), param_gather_s=np.array(gather_s),
                    optimizer_s=np.array(optimizer_s), grad_bytes=np.array(grad_bytes))
