"""The whole training step: micro-batches through a pipeline, then DP and the optimizer.

1. One micro-batch of one pipeline stage's GPUs runs through every layer, forward and
   backward, on the op engine (:func:`moesim.simulation.simulate` of the micro-batch
   scenario): routing, dispatch, experts, combine, EP imbalance. Its per-layer times
   (:mod:`moesim.pipeline.layer_times`) become each (stage, chunk)'s costs, to which
   this module adds what the op program does not hold: the kernels between the GEMMs
   (:mod:`moesim.cost.elementwise`), the split of backward into input and weight
   gradients, recomputation, the MTP modules and, where a schedule overlaps a forward
   with a backward, the SMs the communication kernels take from compute.
2. The schedule runs those costs (:func:`moesim.pipeline.simulate_pipeline`), with the
   activations sent between stages over the topology.
3. Each stage then reduces its gradients over its data-parallel GPUs and steps the
   optimizer (:mod:`moesim.pipeline.data_parallel`); the step ends when every stage has.

docs/training.md describes the model and what it leaves out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from moesim.config.scenario import Scenario
from moesim.config.training_layout import (
    TrainingLayout,
    chunk_layers,
    training_layout,
    training_precision,
)
from moesim.cost import compute
from moesim.cost.sequence_parallel import layer_comm
from moesim.cost.training import mean_attention_seconds
from moesim.pipeline.data_parallel import StepTail, step_tail
from moesim.pipeline.layer_times import LayerTimes, layer_times
from moesim.pipeline.simulate import ChunkCosts, PipelineTimeline, simulate_pipeline


def micro_batch_scenario(scenario: Scenario, layout: TrainingLayout) -> Scenario:
    """One micro-batch on one pipeline stage's GPUs, in the EP form of a training step
    (the GEMMs in the training precision's type)."""
    p, t, m = scenario.parallel, scenario.training, scenario.model
    parallel = dataclasses.replace(
        p, gpus=layout.stage_gpus, tokens_per_gpu=layout.tokens_per_microbatch,
        micro_batches=1, seq_len=layout.seq_len, pp=1, vp=1, tp=1, cp=1)
    model = m if t.precision is None else dataclasses.replace(
        m, gemm_dtype=compute.gemm_dtype_for(t.precision))
    # The schedule, recomputation and precision's kernels are the whole step's to add.
    training = dataclasses.replace(t, global_batch=None, precision=None, recompute="none",
                                   schedule="1f1b")
    return dataclasses.replace(scenario, parallel=parallel, model=model, training=training)


@dataclass(frozen=True, kw_only=True)
class LayerParts:
    """Per model layer ``[L + 1]`` (index ``L``: the LM head), seconds of one
    micro-batch added to or split off the op engine's times."""

    elementwise_fwd_s: np.ndarray  # kernels between the GEMMs, forward
    elementwise_bwd_s: np.ndarray  # and backward
    weight_grad_s: np.ndarray  # the weight-gradient half of the backward GEMMs
    recompute_s: np.ndarray  # what recomputation adds to the backward
    parallel_fwd_s: np.ndarray  # tensor- and context-parallel communication, forward
    parallel_bwd_s: np.ndarray  # and backward (moesim.cost.sequence_parallel)


def _span_max(spans, phase: str, backward: bool, n: int) -> np.ndarray:
    """[n] per layer: the longest ``phase`` op over the GPUs (0 where none)."""
    rows = spans[(spans["phase"] == phase) & (spans["backward"] == backward)]
    d = (rows["end_s"] - rows["start_s"]).groupby(rows["layer"]).max()
    return d.reindex(range(n), fill_value=0.0).to_numpy()


def layer_parts(scenario: Scenario, inner: Scenario, layout: TrainingLayout, spans,
                times: LayerTimes, topology) -> LayerParts:
    """:class:`LayerParts` of the micro-batch scenario ``inner`` (module doc)."""
    from moesim.cost.elementwise import layer_kernels

    m, hw, t = inner.model, inner.hardware, scenario.training
    n, tokens = m.num_layers + 1, layout.tokens_per_microbatch
    precision = training_precision(scenario)
    fwd, bwd, cheap = np.zeros(n), np.zeros(n), np.zeros(n)
    for layer in range(m.num_layers):
        moe = layer >= m.first_dense_layers
        rows = tokens * m.top_k if moe else 0
        for out, backward in ((fwd, False), (bwd, True)):
            kernels = layer_kernels(m, hw, tokens=tokens, routed_rows=rows,
                                    precision=precision, backward=backward, moe=moe)
            out[layer] = sum(kernels.values())
            if not backward:
                cheap[layer] = sum(v for k, v in kernels.items() if k in SELECTIVE_KERNELS)
    # Attention as the op program has it: the mean over full and sliding-window layers.
    # At the forward's efficiency a weight gradient is its projections' forward time.
    attention = mean_attention_seconds(m, hw, tokens=tokens, seq_len=layout.seq_len)
    as_forward = dataclasses.replace(hw, backward_gemm_efficiency=1.0)
    projections = mean_attention_seconds(m, as_forward, tokens=tokens,
                                         seq_len=layout.seq_len, grad="weight")
    core = max(attention - projections, 0.0)
    # Every GEMM's two gradients do the same work (moesim.cost.compute), so the weight
    # gradient is half of each backward GEMM op; attention's core has no weights.
    halves = sum(_span_max(spans, phase, True, n)
                 for phase in ("shared", "dense_ffn", "experts", "lm_head"))
    layers = np.arange(n) < m.num_layers
    wgrad = layers * mean_attention_seconds(m, hw, tokens=tokens, seq_len=layout.seq_len,
                                            grad="weight") + 0.5 * halves
    comm = layer_comm(m, hw, topology, tokens=tokens, tp=layout.tp, cp=layout.cp,
                      attention_core_s=core)
    parallel_fwd, parallel_bwd = layers * comm.forward_s, layers * comm.backward_s
    if t.recompute == "full":
        recompute = times.forward_s + fwd + parallel_fwd
    elif t.recompute == "selective":
        # What the memory model drops (docs/memory.md): norm and SwiGLU outputs, and
        # MLA's up-projected queries, keys and values.
        recompute = cheap + layers * mla_up_projection_seconds(m, hw, tokens=tokens)
    else:
        recompute = np.zeros(n)
    recompute[m.num_layers] = 0.0  # the LM head's logits are never recomputed
    return LayerParts(elementwise_fwd_s=fwd, elementwise_bwd_s=bwd, weight_grad_s=wgrad,
                      recompute_s=recompute, parallel_fwd_s=parallel_fwd,
                      parallel_bwd_s=parallel_bwd)


# The kernels between the GEMMs whose outputs selective recomputation drops.
SELECTIVE_KERNELS = ("rmsnorm", "mla_latent_norm", "swiglu_routed", "swiglu_shared",
                     "swiglu_dense")


def mla_up_projection_seconds(m, hw, *, tokens: int) -> float:
    """Forward seconds of MLA's up-projections (queries from their latent, keys and
    values from theirs) for ``tokens`` tokens; 0 for other attention."""
    if m.attention != "mla":
        return 0.0
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    shapes = [(m.kv_lora_rank, m.num_heads * (m.qk_nope_head_dim + m.v_head_dim))]
    if m.q_lora_rank:
        shapes.append((m.q_lora_rank, m.num_heads * qk))
    return sum(float(compute.gemm_time(hw, groups=1, m=tokens, n=n, k=k, dtype=m.gemm_dtype))
               for k, n in shapes)


def send_seconds(scenario: Scenario, topology, layout: TrainingLayout) -> float:
    """One micro-batch's activation (or its gradient) from a stage to the next: BF16
    hidden states of the GPU's tokens, GPU ``g`` to GPU ``g + stage_gpus`` (over the
    NICs when any such pair sits in two NVLink domains)."""
    nbytes = layout.tokens_per_microbatch * scenario.model.hidden_size * compute.ACT_BYTES
    domain = np.asarray(topology.domain_of)
    peers = np.arange(layout.gpus - layout.stage_gpus)
    across = bool((domain[peers] != domain[peers + layout.stage_gpus]).any())
    if across and topology.nic_bw > 0:
        return topology.nic_latency + nbytes / topology.nic_bw
    return topology.nvlink_latency + nbytes / topology.nvlink_bw


def chunk_costs(scenario: Scenario, layout: TrainingLayout, times: LayerTimes,
                parts: LayerParts, send_s: float) -> ChunkCosts:
    """The (stage, chunk) costs of the pipeline from per-layer times (module doc)."""
    m, p, hw = scenario.model, scenario.parallel, scenario.hardware
    last = m.num_layers - 1
    fwd = times.forward_s + parts.elementwise_fwd_s + parts.parallel_fwd_s
    bwd = (times.backward_s + parts.elementwise_bwd_s + parts.recompute_s
           + parts.parallel_bwd_s)
    per_layer = {"forward_s": fwd, "backward_s": bwd, "weight_s": parts.weight_grad_s,
                 "forward_comm_s": times.forward_comm_s,
                 "backward_comm_s": times.backward_comm_s
                 + (times.forward_comm_s if scenario.training.recompute == "full" else 0.0)}
    # The LM head, and each MTP module (one more layer of the last kind plus a head
    # pass, DeepSeek-V3 report sec. 2.2), run with the last layer.
    for key, values in per_layer.items():
        values = values.copy()
        values[last] += values[m.num_layers] + m.mtp_layers * (values[last] + values[m.num_layers])
        per_layer[key] = values[: m.num_layers]
    layers = chunk_layers(layout, m)
    shape = (layout.pp, len(layers[0]))
    summed = {key: np.zeros(shape) for key in per_layer}
    for s, chunks in enumerate(layers):
        for c, chunk in enumerate(chunks):
            for key, values in per_layer.items():
                summed[key][s, c] = values[list(chunk)].sum()
    if layout.schedule == "dualpipe":
        # A forward overlapped with a backward shares the GPU with the communication
        # kernels' SMs all along: compute runs on the rest.
        slowdown = hw.sms / (hw.sms - p.comm_sms)
        for key, comm in (("forward_s", "forward_comm_s"), ("backward_s", "backward_comm_s")):
            summed[key] = summed[comm] + (summed[key] - summed[comm]) * slowdown
        summed["weight_s"] = summed["weight_s"] * slowdown
    weight = np.minimum(summed["weight_s"], summed["backward_s"] - summed["backward_comm_s"])
    return ChunkCosts(forward_s=summed["forward_s"],
                      backward_input_s=summed["backward_s"] - weight,
                      backward_weight_s=weight,
                      forward_comm_s=summed["forward_comm_s"],
                      backward_comm_s=summed["backward_comm_s"],
                      send_s=send_s)


@dataclass(frozen=True, kw_only=True)
class WholeStep:
    """The whole step: the pipeline's timeline, each stage's DP/optimizer tail and when
    each stage ends."""

    layout: TrainingLayout
    pipeline: PipelineTimeline
    costs: ChunkCosts
    parts: LayerParts
    times: LayerTimes
    tail: StepTail
    grad_exposed_s: np.ndarray  # [pp] gradient reduction not hidden by the backward
    gather_exposed_s: np.ndarray  # [pp] parameter all-gather not hidden by the forward
    end_s: np.ndarray  # [pp]

    @property
    def step_s(self) -> float:
        return float(self.end_s.max())


def whole_step(scenario: Scenario, topology, spans) -> WholeStep:
    """Assemble the whole step of ``scenario`` from its micro-batch's ``spans`` (the op
    engine's table for :func:`micro_batch_scenario`) on the full ``topology``."""
    layout = training_layout(scenario)
    inner = micro_batch_scenario(scenario, layout)
    times = layer_times(spans, scenario.model.num_layers)
    parts = layer_parts(scenario, inner, layout, spans, times, topology)
    costs = chunk_costs(scenario, layout, times, parts, send_seconds(scenario, topology, layout))
    pipeline = simulate_pipeline(costs, schedule=layout.schedule, pp=layout.pp,
                                 vp=layout.vp, micro_batches=layout.micro_batches)
    tail = step_tail(scenario, topology, layout)
    if scenario.training.overlap_dp_comm:
        # Megatron's --overlap-grad-reduce reduces each gradient bucket while the last
        # micro-batch's backward goes on; --overlap-param-gather gathers the updated
        # parameters during the next step's first forward.
        backward = (costs.backward_input_s + costs.backward_weight_s).sum(axis=1)
        grad_exposed = np.maximum(tail.grad_reduce_s - backward, 0.0)
        gather_exposed = np.maximum(tail.param_gather_s - costs.forward_s.sum(axis=1), 0.0)
    else:
        grad_exposed, gather_exposed = tail.grad_reduce_s, tail.param_gather_s
    end = pipeline.end_s + grad_exposed + tail.optimizer_s + gather_exposed
    return WholeStep(layout=layout, pipeline=pipeline, costs=costs, parts=parts, times=times,
                     tail=tail, grad_exposed_s=grad_exposed, gather_exposed_s=gather_exposed,
                     end_s=end)
