"""One expert-parallel dispatch and combine as the kernels' own benchmarks run them.

Every rank holds ``tokens_per_rank`` tokens, each routed uniformly at random to
``top_k`` distinct experts (optionally within ``topk_groups`` nodes, as DeepSeek-V3's
node-limited routing); the routing goes through :func:`sample_topk`, the bytes through
:mod:`moesim.comm.traffic` and the time through the analytical network model. Shared by
``moesim regress`` (DeepEP's published tables) and the perfdb predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.comm.traffic import bytes_per_copy, dispatch_loads
from moesim.config.kernels import DISPATCH_KERNELS
from moesim.network.analytical import exchange_time
from moesim.routing.batch import BatchCounts, RoutedBatch, count_batch
from moesim.routing.synthetic import expert_popularity, sample_topk

SEED = 0  # one fixed routing draw: reproducible to the last digit
SAMPLED_TOKENS = 2048  # per rank; larger batches are this draw scaled (loads are linear)


def sms_stretch(hw, kernel: str, sms) -> float:
    """How much longer (>= 1) DeepEP's normal kernels move their bytes on ``sms`` SMs than
    on the ``deepep_sms_full`` it takes to saturate the links (1 when not fitted)."""
    if not DISPATCH_KERNELS[kernel].sm_bound or not sms or not hw.deepep_sms_full:
        return 1.0
    return max(1.0, hw.deepep_sms_full / sms)


@dataclass(frozen=True, kw_only=True)
class EpExchange:
    counts: BatchCounts  # of the sampled tokens
    scale: float  # real tokens per sampled token
    seconds: dict[str, float]  # dispatch, combine
    bytes_per_copy: dict[str, float]  # dispatch, combine


def ep_exchange(
    topology, *, overhead_s: float, kernel: str, tokens_per_rank: int, hidden: int,
    experts: int, top_k: int, topk_groups: int | None = None, dispatch_dtype: str = "fp8",
    combine_dtype: str = "bf16", nvlink: bool = True,
) -> EpExchange:
    """Dispatch and combine seconds of one exchange over all GPUs of ``topology``, each
    ``overhead_s`` plus hop latencies plus the busiest link's time."""
    ep = topology.n_gpus
    per_node = min(ep, topology.gpus_per_domain)
    nodes = ep // per_node
    rng = np.random.default_rng(SEED)
    # DeepEP's tests draw |N(0,1)| + 1 scores per (token, expert) and take the top-k:
    # every K-of-E set is equally likely, i.e. uniform popularity without replacement.
    pop_e = expert_popularity(experts, assignment="uniform", zipf_exponent=0.0, rng=rng)
    limit = topk_groups if topk_groups is not None and topk_groups < nodes else None
    sampled = min(tokens_per_rank, SAMPLED_TOKENS)
    ids_tk = sample_topk(pop_e, n_tokens=ep * sampled, top_k=top_k, rng=rng,
                         unit_size=experts // nodes if limit else None, max_units=limit)
    batch = RoutedBatch(ids_tk=ids_tk, kept_tk=np.ones(ids_tk.shape, dtype=bool),
                        tokens_per_rank=sampled)
    counts = count_batch(batch, n_experts=experts, ep=ep, gpus_per_node=per_node)
    scale = tokens_per_rank / sampled
    copies = dispatch_loads(counts, kernel=kernel, topology=topology, first_gpu=0,
                            gpus_per_node=per_node, ll_nvlink=nvlink).scaled(scale)
    size = {
        "dispatch": bytes_per_copy(kernel, hidden=hidden, dtype=dispatch_dtype, dispatch=True),
        "combine": bytes_per_copy(kernel, hidden=hidden, dtype=combine_dtype, dispatch=False),
    }
    seconds = {
        "dispatch": exchange_time(copies.scaled(size["dispatch"]), topology, overhead_s=0.0),
        "combine": exchange_time(copies.reversed().scaled(size["combine"]), topology,
                                 overhead_s=0.0),
    }
    return EpExchange(
        counts=counts, scale=scale, bytes_per_copy=size,
        seconds={phase: overhead_s + t.seconds for phase, t in seconds.items()},
    )
