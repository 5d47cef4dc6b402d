"""Serving steps (``mode: prefill`` / ``decode``): the layout of a request batch over
attention data/tensor parallelism and expert parallelism/tensor parallelism, and the
per-GPU cost of each layer's kernels, from the compute and collective models.

Layout (as SGLang's DP attention with DeepEP, and TensorRT-LLM's attention DP with
``moe_ep_size x moe_tp_size``):

* ``gpus / attention_tp`` attention data-parallel (DP) ranks of ``attention_tp``
  consecutive GPUs each hold ``serving.batch`` requests. A rank's ``attention_tp`` GPUs
  split the attention heads (and the dense FFN's width) and run every token of the
  rank; their partial outputs are summed by one all-reduce of ``tokens x hidden x 2``
  bytes per layer (SGLang splits it into a reduce-scatter before the MoE and an
  all-gather after it: the same bytes). Each TP rank then holds and dispatches
  ``ceil(tokens / attention_tp)`` of the rank's tokens (SGLang's scattered layout; when
  the tokens do not divide, the busiest rank's share, which sets the step time).
* Routed experts: ``ep x moe_tp`` GPUs form one MoE instance; its ``moe_tp`` slices are
  EP groups of ``ep`` consecutive GPUs (TensorRT-LLM's rank mapping: EP rank fastest)
  that dispatch and combine their own tokens with the scenario's dispatch kernel. The
  ``moe_tp`` GPUs holding the shards of one EP rank's experts (``ep`` apart) share the
  tokens they received and sum their partial outputs: each runs the grouped GEMMs of
  all those tokens at width ``moe_intermediate_size / moe_tp``, then one all-reduce of
  ``received tokens x hidden x 2`` bytes over the ``moe_tp`` GPUs.
* Shared experts are replicated: every GPU runs them on the tokens it dispatches
  (SGLang's DeepEP path). Dense FFN layers are split like attention (width /
  ``attention_tp``, all tokens of the rank, one more all-reduce). The LM head runs on
  one token per request (a prefill's last prompt token, a decode's new token), its
  vocabulary split over ``attention_tp``.

Costs per layer and micro-batch on each GPU:

* attention = projection GEMMs (:func:`moesim.cost.compute.gemm_time`; MLA's down-projections
  are replicated on every TP rank, the per-head up/output projections split) + the
  attention core (:func:`moesim.cost.compute.attention_prefill_time` over ``batch`` prompts
  of ``isl`` tokens, causal; :func:`moesim.cost.compute.attention_decode_time` of ``batch``
  queries over ``isl + osl / 2`` cached tokens, reading the KV cache) + the TP
  all-reduce (:func:`moesim.comm.collectives.collective_time`). Prefill runs MLA unabsorbed
  (per-head ``qk_nope + qk_rope`` scores, ``v_head_dim`` values); decode runs it
  absorbed over the cached latent (:func:`moesim.cost.compute.attention_dims`).
* KV cache read per token and layer on one GPU: MLA's latent
  (``kv_lora_rank + qk_rope_head_dim`` values) is replicated on every TP rank, so TP
  does not shrink it; GQA/MHA caches ``2 x kv_heads x head_dim`` values, of which a GPU
  holds ``max(1, kv_heads / attention_tp)`` heads.

Every GEMM's roofline charges its weight bytes, so a small decode batch is memory-bound:
the step reads the attention, shared and active expert weights once whatever the batch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from moesim.comm.collectives import collective_time, spread_out
from moesim.config.model import ModelShape
from moesim.config.scenario import Scenario
from moesim.cost import compute
from moesim.cost.step import Cost, StepCosts


@dataclass(frozen=True, kw_only=True)
class ServingLayout:
    """How one serving step's requests and tokens spread over the GPUs."""

    dp: int  # attention data-parallel ranks
    requests_mb: int  # requests per DP rank and micro-batch
    tokens_mb: int  # tokens per DP rank and micro-batch (requests x isl, or requests)
    routed_mb: int  # tokens each GPU dispatches per micro-batch (ceil(tokens_mb / tp))
    keys: float  # mean keys a token attends to (causal prompt, or the decode context)


def layout(scenario: Scenario) -> ServingLayout:
    p, sv = scenario.parallel, scenario.serving
    requests_mb = sv.batch // p.micro_batches
    prefill = scenario.mode == "prefill"
    tokens_mb = requests_mb * (sv.isl if prefill else 1)
    return ServingLayout(
        dp=p.total_gpus // p.attention_tp,
        requests_mb=requests_mb,
        tokens_mb=tokens_mb,
        routed_mb=math.ceil(tokens_mb / p.attention_tp),
        keys=float(compute.causal_keys(sv.isl)) if prefill else sv.decode_context,
    )


def routing_view(scenario: Scenario) -> Scenario:
    """The scenario as the routing sources see it: ``tokens_per_gpu`` = the tokens each
    GPU dispatches, ``seq_len`` = one request's tokens in this step."""
    p = scenario.parallel
    lay = layout(scenario)
    seq_len = scenario.serving.isl if scenario.mode == "prefill" else 1
    parallel = dataclasses.replace(p, tokens_per_gpu=lay.routed_mb * p.micro_batches,
                                   seq_len=seq_len)
    return dataclasses.replace(scenario, parallel=parallel)


# ---------------------------------------------------------------- attention


def _heads_per_gpu(m: ModelShape, tp: int) -> tuple[int, int]:
    """(query heads, KV heads) one GPU holds; KV heads are replicated when fewer than TP."""
    return m.num_heads // tp, max(1, m.kv_heads // tp)


def kv_bytes_per_token_per_gpu(m: ModelShape, kv_dtype: str, attention_tp: int) -> float:
    """KV-cache bytes one GPU reads per cached token and layer in a decode step.

    MLA caches one latent per token, replicated on every attention-TP rank; GQA/MHA
    cache keys and values of each KV head, split over the TP ranks (replicated once
    there are more ranks than KV heads)."""
    if m.attention == "mla":
        return float(compute.kv_cache_bytes_per_token(m, kv_dtype))
    _, kv_heads = _heads_per_gpu(m, attention_tp)
    return 2.0 * kv_heads * m.head_dim * compute.dtype_bytes(kv_dtype)


def projection_shapes(m: ModelShape, tp: int) -> list[tuple[int, int]]:
    """(k, n) of every attention projection GEMM on one GPU of an attention-TP group."""
    h = m.hidden_size
    heads, kv_heads = _heads_per_gpu(m, tp)
    if m.attention == "mla":
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        shapes = [(h, m.q_lora_rank), (m.q_lora_rank, heads * qk)] if m.q_lora_rank \
            else [(h, heads * qk)]
        return shapes + [
            (h, m.kv_lora_rank + m.qk_rope_head_dim),  # replicated down-projection
            (m.kv_lora_rank, heads * (m.qk_nope_head_dim + m.v_head_dim)),  # per head
            (heads * m.v_head_dim, h),  # output
        ]
    return [(h, (heads + 2 * kv_heads) * m.head_dim), (heads * m.head_dim, h)]


def projection_seconds(m: ModelShape, hw, *, tokens: int, tp: int) -> float:
    """Attention projection GEMMs of ``tokens`` tokens on one GPU (weights read once)."""
    return float(sum(compute.gemm_time(hw, groups=1, m=tokens, n=n, k=k, dtype=m.gemm_dtype)
                     for k, n in projection_shapes(m, tp)))


def attention_core_seconds(scenario: Scenario, *, requests: int, context=None) -> float:
    """The attention core of ``requests`` requests on one GPU (its heads only).

    ``context`` overrides the decode context (``isl + osl / 2``)."""
    m, hw, p, sv = scenario.model, scenario.hardware, scenario.parallel, scenario.serving
    heads, _ = _heads_per_gpu(m, p.attention_tp)
    if scenario.mode == "prefill":
        qk, v = ((m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim)
                 if m.attention == "mla" else (m.head_dim, m.head_dim))
        return float(compute.attention_prefill_time(
            hw, batch=requests, seq=sv.isl, heads=heads, score_dim=qk, value_dim=v))
    score, value, _ = compute.attention_dims(m)
    return float(compute.attention_decode_time(
        hw, batch=requests, context=sv.decode_context if context is None else context,
        heads=heads, score_dim=score, value_dim=value,
        kv_bytes_per_token=kv_bytes_per_token_per_gpu(m, sv.kv_dtype, p.attention_tp)))


# ---------------------------------------------------------------- collectives


def group_all_reduce(hw, topology, *, size, members_g: np.ndarray) -> np.ndarray:
    """[gpus] seconds of an all-reduce of ``size`` bytes (per GPU, broadcast) over each
    GPU's group ``members_g`` [gpus, n] (NVLink inside a domain, the NICs across)."""
    n = members_g.shape[1]
    if n == 1:
        return np.zeros(members_g.shape[0])
    domain = np.asarray(topology.domain_of)[members_g]
    spans = (domain != domain[:, :1]).any(axis=1)
    plain = collective_time(hw, topology, op="all_reduce", size=size, n=n)
    if n > topology.gpus_per_domain or not spans.any():
        return plain * np.ones(members_g.shape[0])
    across = collective_time(hw, spread_out(topology), op="all_reduce", size=size, n=n)
    return np.where(spans, across, plain) * np.ones(members_g.shape[0])


def attention_tp_members(scenario: Scenario) -> np.ndarray:
    """[gpus, attention_tp] the consecutive GPUs of each GPU's attention-TP group."""
    p = scenario.parallel
    g = np.arange(p.total_gpus)
    return (g // p.attention_tp * p.attention_tp)[:, None] + np.arange(p.attention_tp)


def moe_tp_members(scenario: Scenario) -> np.ndarray:
    """[gpus, moe_tp] the GPUs holding the shards of each GPU's experts (``ep`` apart)."""
    p = scenario.parallel
    g = np.arange(p.total_gpus)
    instance = p.ep * p.moe_tp
    return (g // instance * instance + g % p.ep)[:, None] + p.ep * np.arange(p.moe_tp)


# ---------------------------------------------------------------- per-op costs


def fixed_costs(scenario: Scenario, topology) -> dict[str, tuple[float, np.ndarray]]:
    """Per phase: (compute seconds, TP all-reduce seconds [gpus]) of one micro-batch on
    each GPU, for the phases whose cost does not depend on the routing."""
    m, hw, p = scenario.model, scenario.hardware, scenario.parallel
    lay = layout(scenario)
    tp = p.attention_tp
    act = lay.tokens_mb * m.hidden_size * compute.ACT_BYTES
    tp_ar = group_all_reduce(hw, topology, size=act, members_g=attention_tp_members(scenario))
    none = np.zeros(p.total_gpus)
    attention = (projection_seconds(m, hw, tokens=lay.tokens_mb, tp=tp)
                 + attention_core_seconds(scenario, requests=lay.requests_mb))
    dense = compute.ffn_seconds(m, hw, tokens=lay.tokens_mb,
                                intermediate=m.dense_intermediate_size // tp)
    shared = compute.ffn_seconds(m, hw, tokens=lay.routed_mb,
                                 intermediate=m.shared_experts * m.moe_intermediate_size)
    head = float(compute.gemm_time(hw, groups=1, m=lay.requests_mb,
                                   n=math.ceil(m.vocab_size / tp), k=m.hidden_size,
                                   dtype="bf16"))
    return {"attention": (attention, tp_ar), "dense_ffn": (dense, tp_ar),
            "shared": (shared, none), "lm_head": (head, none)}


def expert_seconds(scenario: Scenario, topology, tokens_ge: np.ndarray,
                   received_g: np.ndarray, *, backward: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(grouped GEMM seconds, MoE-TP all-reduce seconds), each [gpus], of one MoE layer
    and micro-batch from the assignments ``tokens_ge`` [gpus, local experts] and the
    tokens ``received_g`` [gpus] each GPU's dispatch delivered (``backward``: its
    backward pass).

    With ``moe_tp`` > 1 every GPU of a MoE-TP group computes its ``1 / moe_tp`` of the
    width for the tokens the group received, then the group all-reduces the outputs
    (the input gradients in the backward)."""
    m, hw, p = scenario.model, scenario.hardware, scenario.parallel
    if p.moe_tp == 1:
        return (compute.grouped_expert_seconds(m, hw, tokens_ge, backward=backward),
                np.zeros(p.total_gpus))
    shard = dataclasses.replace(m, moe_intermediate_size=m.moe_intermediate_size // p.moe_tp)
    instances = p.total_gpus // (p.ep * p.moe_tp)

    def pooled(a: np.ndarray) -> np.ndarray:  # summed over each GPU's moe_tp group
        a = a.reshape(instances, p.moe_tp, p.ep, -1)
        return np.broadcast_to(a.sum(axis=1, keepdims=True), a.shape).reshape(p.total_gpus, -1)

    gemm = compute.grouped_expert_seconds(shard, hw, pooled(tokens_ge), backward=backward)
    size = pooled(received_g)[:, 0] * m.hidden_size * compute.ACT_BYTES
    return gemm, group_all_reduce(hw, topology, size=size, members_g=moe_tp_members(scenario))


# ---------------------------------------------------------------- summary


def step_tokens(scenario: Scenario) -> int:
    """Tokens the step processes, all GPUs: prompt tokens (prefill) or new tokens."""
    lay = layout(scenario)
    return lay.dp * lay.tokens_mb * scenario.parallel.micro_batches


def model_flops(scenario: Scenario) -> float:
    """Useful forward FLOPs of the step: every token through every layer, attending to
    its keys (causal prompt, or the decode context), plus the LM head once per request."""
    m, sv = scenario.model, scenario.serving
    lay = layout(scenario)
    head = 2.0 * m.hidden_size * m.vocab_size
    per_key = compute.attention_core_flops(m, 1, 1)  # one token, one key, all layers below
    per_token = (compute.model_flops_per_token(m, 1) - head
                 + m.num_layers * per_key * (lay.keys - 1))
    return step_tokens(scenario) * per_token + lay.dp * sv.batch * head


def summary_keys(scenario: Scenario, step: float, *, fixed, moe_ar_s: float) -> dict:
    """The serving keys of the summary (docs/metrics.md)."""
    m, p, sv = scenario.model, scenario.parallel, scenario.serving
    lay = layout(scenario)
    prefill = scenario.mode == "prefill"
    tokens = step_tokens(scenario)
    tp_ar = float(fixed["attention"][1].mean()) * m.num_layers \
        + float(fixed["dense_ffn"][1].mean()) * m.first_dense_layers
    cached = sv.isl if prefill else sv.isl + sv.osl
    kv = (kv_bytes_per_token_per_gpu(m, sv.kv_dtype, p.attention_tp) * m.num_layers
          * sv.batch * cached)
    out = {"ttft_s": step} if prefill else {"tpot_s": step}
    per_gpu = tokens / step / p.total_gpus
    out["input_tokens_per_s_per_gpu" if prefill else "output_tokens_per_s_per_gpu"] = per_gpu
    out.update({
        "requests_per_step": lay.dp * sv.batch,
        "attention_dp": lay.dp,
        "attention_tp": p.attention_tp,
        "moe_tp": p.moe_tp,
        "isl": sv.isl,
        "osl": sv.osl,
        "kv_dtype": sv.kv_dtype,
        "attention_keys_per_token": lay.keys,
        "routed_tokens_per_gpu": lay.routed_mb * p.micro_batches,
        "kv_cache_bytes_per_gpu": kv,
        "attention_tp_allreduce_time_s": tp_ar * p.micro_batches,
        "moe_tp_allreduce_time_s": moe_ar_s,
    })
    return out


# ---------------------------------------------------------------- the mode's costs


class ServingCosts(StepCosts):
    """Prefill and decode steps: one forward pass of the request batch."""

    passes = (False,)

    def __init__(self, scenario: Scenario, topology) -> None:
        super().__init__(scenario, topology)
        self._fixed = fixed_costs(scenario, topology)

    def routed_scenario(self) -> Scenario:
        return routing_view(self.scenario)

    def fixed(self) -> dict[tuple[str, bool], Cost]:
        return {(phase, False): cost for phase, cost in self._fixed.items()}

    def experts(self, tokens_ge, received_g, *, backward):
        assert not backward, "serving steps run forward only"
        return expert_seconds(self.scenario, self.topology, tokens_ge, received_g)

    def step_tokens(self) -> int:
        return step_tokens(self.scenario)

    def model_flops(self) -> float:
        return model_flops(self.scenario)

    def summary_keys(self, step_s: float, *, expert_comm_s: float) -> dict:
        return summary_keys(self.scenario, step_s, fixed=self._fixed, moe_ar_s=expert_comm_s)
