"""The whole training step as a SimResult: the micro-batch's tables, the step's summary.

The summary's times are per GPU per step. The phase times of the op engine
(``attention_time_s``, ``dispatch_time_s``, ...) are one micro-batch through every
layer on one stage's GPUs; a GPU runs ``1 / pp`` of the layers for every micro-batch,
so the step's share is ``micro_batches / pp`` times that (DualPipe: half the
micro-batches through each of a GPU's two stages, the same share).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moesim.config.scenario import Scenario
from moesim.config.training_layout import training_layout, training_precision
from moesim.cost import compute
from moesim.output.result import SimResult
from moesim.output.summary import check_summary
from moesim.pipeline.whole_step import WholeStep, micro_batch_scenario, whole_step

# Per-GPU seconds of the micro-batch summary that scale to the step.
PHASE_KEYS = ("dispatch_time_s", "combine_time_s", "expert_compute_time_s",
              "expert_compute_max_time_s", "attention_time_s", "shared_expert_time_s",
              "dense_ffn_time_s", "lm_head_time_s", "comm_exposed_time_s",
              "comm_wait_time_s")
COUNT_KEYS = ("nvlink_bytes", "rdma_bytes", "tokens_dispatched", "tokens_computed",
              "tokens_dropped")


def model_flops(scenario: Scenario, tokens: int) -> float:
    """Useful FLOPs of a training step of ``tokens`` tokens: forward and the two
    gradients (3x forward) of every layer's GEMMs over the routed top-k and shared
    experts, causal attention, the LM head, and each MTP module (one more MoE layer and
    head pass); no recomputation, no padding (docs/training.md)."""
    seq = training_layout(scenario).seq_len
    return 3.0 * compute.model_flops_per_token(scenario.model, seq, mtp=True) * tokens


def layer_breakdown(step: WholeStep, spans, layer: int) -> dict[str, float]:
    """One micro-batch through model ``layer`` on the stage's critical GPU, seconds per
    part, forward and backward."""
    out = {}
    for backward, tag in ((False, "fwd"), (True, "bwd")):
        rows = spans[(spans["layer"] == layer) & (spans["backward"] == backward)]
        longest = (rows["end_s"] - rows["start_s"]).groupby(rows["phase"], observed=True).max()
        for phase in ("attention", "shared", "experts", "dispatch", "combine", "dense_ffn"):
            if phase in longest.index:
                out[f"{phase}_{tag}"] = float(longest[phase])
    parts, times = step.parts, step.times
    out["elementwise_fwd"] = float(parts.elementwise_fwd_s[layer])
    out["elementwise_bwd"] = float(parts.elementwise_bwd_s[layer])
    out["weight_grad"] = float(parts.weight_grad_s[layer])
    out["recompute"] = float(parts.recompute_s[layer])
    out["layer_fwd"] = float(times.forward_s[layer] + parts.elementwise_fwd_s[layer])
    out["layer_bwd"] = float(times.backward_s[layer] + parts.elementwise_bwd_s[layer]
                             + parts.recompute_s[layer])
    # Communication the layer waited for: the layer's time beyond its compute ops.
    compute_ops = sum(v for k, v in out.items()
                      if k.split("_")[0] in ("attention", "shared", "experts", "dense"))
    comm = sum(v for k, v in out.items() if k.split("_")[0] in ("dispatch", "combine"))
    spent = float(times.forward_s[layer] + times.backward_s[layer])
    out["comm_exposed"] = max(min(spent - compute_ops, comm), 0.0)
    return out


def simulate_whole_step(scenario: Scenario, trace, topology, memory, *, simulate_ep
                        ) -> SimResult:
    """The whole step of ``scenario`` (checked, on its ``topology``): ``simulate_ep``
    runs the micro-batch scenario through the op engine (module doc)."""
    from moesim.memory import summary_keys
    from moesim.topologies import load_topology

    layout = training_layout(scenario)
    inner = micro_batch_scenario(scenario, layout)
    stage_topology = load_topology(inner.topology, gpus=layout.stage_gpus)
    micro = simulate_ep(inner, trace, stage_topology, memory)
    step = whole_step(scenario, topology, micro.spans)
    step_s = step.step_s
    tokens = layout.tokens_per_step
    flops = model_flops(scenario, tokens)
    gpus, hw = layout.gpus, scenario.hardware
    share = layout.micro_batches / layout.pp
    summary = dict(micro.summary)
    for key in PHASE_KEYS:
        summary[key] *= share
    for key in COUNT_KEYS:  # every stage's GPUs, every micro-batch
        summary[key] = type(summary[key])(summary[key] * layout.micro_batches)
    first_moe = scenario.model.first_dense_layers
    costs = step.costs
    summary |= {
        "scenario": scenario.name,
        "gpus": gpus,
        "ep_groups": gpus // layout.ep,
        "nodes": int(topology.n_domains),
        "step_time_s": step_s,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / step_s,
        "tokens_per_s_per_gpu": tokens / step_s / gpus,
        "mfu": flops / (step_s * gpus * hw.peak_flops(inner.model.gemm_dtype)),
        "model_tflops_per_gpu": flops / (step_s * gpus) / 1e12,
        "pp": layout.pp,
        "vp": layout.vp,
        "dp": layout.dp,
        "micro_batches": layout.micro_batches,
        "tokens_per_microbatch": layout.tokens_per_microbatch,
        "schedule": layout.schedule,
        "recompute": scenario.training.recompute,
        "precision": training_precision(scenario),
        "pipeline_time_s": float(step.pipeline.step_s),
        "pipeline_bubble_fraction": float(step.pipeline.bubble_fraction),
        "p2p_send_time_s": float(np.atleast_1d(costs.send_s)[0]),
        "elementwise_time_s": float((step.parts.elementwise_fwd_s
                                     + step.parts.elementwise_bwd_s).sum() * share),
        "recompute_time_s": float(step.parts.recompute_s.sum() * share),
        "dp_grad_reduce_time_s": float(step.tail.grad_reduce_s.max()),
        "dp_param_gather_time_s": float(step.tail.param_gather_s.max()),
        "dp_exposed_time_s": float((step.grad_exposed_s + step.gather_exposed_s).max()),
        "optimizer_time_s": float(step.tail.optimizer_s.max()),
        "moe_layer_breakdown_s": layer_breakdown(step, micro.spans, first_moe),
        **summary_keys(memory),
    }
    # The micro-batch run was given the whole step's memory: its warnings stand.
    return dataclasses.replace(micro, scenario=scenario, summary=check_summary(summary),
                               pipeline=step.pipeline.items)
