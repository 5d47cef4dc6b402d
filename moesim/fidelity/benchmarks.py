"""The kernels' own benchmarks in the simulator's terms: the routing they draw and the
exchange they time, through the same routing and exchange functions ``simulate`` uses.

``ep_exchange`` is one expert-parallel dispatch and combine as DeepEP's tests run it:
every rank holds ``tokens_per_rank`` tokens, each routed uniformly at random to
``top_k`` distinct experts (optionally within ``topk_groups`` nodes, as DeepSeek-V3's
node-limited routing). ``alltoall`` is nccl-tests' ``alltoall_perf``. Shared by
``moesim regress`` and the perfdb predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.comm.traffic import bytes_per_copy
from moesim.config.hardware import HardwareSpec
from moesim.network.exchange import FORWARD, exchange_phases, group_traffic, time_exchange
from moesim.network.models import NETWORK_MODELS
from moesim.routing.batch import BatchCounts, count_batch
from moesim.routing.synthetic import expert_popularity
from moesim.routing.synthetic_layers import draw_batch

SEED = 0  # one fixed routing draw: reproducible to the last digit
SAMPLED_TOKENS = 2048  # per rank; larger batches are this draw scaled (loads are linear)
_ANALYTICAL = NETWORK_MODELS["analytical"]


def sampled_picks(gpus, tokens_per_rank, top_k):
    """(token, expert) picks the routing draw of an exchange benchmark makes: every
    rank's sampled tokens (scalars or arrays alike)."""
    return gpus * np.minimum(tokens_per_rank, SAMPLED_TOKENS) * top_k


@dataclass(frozen=True, kw_only=True)
class EpExchange:
    counts: BatchCounts  # of the sampled tokens
    scale: float  # real tokens per sampled token
    seconds: dict[str, float]  # dispatch, combine
    bytes_per_copy: dict[str, float]  # dispatch, combine


def ep_exchange(
    topology, *, hw: HardwareSpec, kernel: str, tokens_per_rank: int, hidden: int,
    experts: int, top_k: int, topk_groups: int | None = None, dispatch_dtype: str = "fp8",
    combine_dtype: str = "bf16", nvlink: bool = True, comm_sms: int | None = None,
    overhead_s: float | None = None,
) -> EpExchange:
    """Dispatch and combine seconds of one exchange over all GPUs of ``topology`` (the
    analytical network model: the kernel's fixed cost, hop latencies and the busiest
    link). ``overhead_s`` replaces the hardware's fixed cost (0: the links alone)."""
    ep = topology.n_gpus
    per_node = min(ep, topology.gpus_per_domain)
    nodes = ep // per_node
    rng = np.random.default_rng(SEED)
    # DeepEP's tests draw |N(0,1)| + 1 scores per (token, expert) and take the top-k:
    # every K-of-E set is equally likely, i.e. uniform popularity without replacement.
    pop_e = expert_popularity(experts, assignment="uniform", zipf_exponent=0.0, rng=rng)
    limit = topk_groups if topk_groups is not None and topk_groups < nodes else None
    sampled = min(tokens_per_rank, SAMPLED_TOKENS)
    batch = draw_batch(pop_e, n_tokens=ep * sampled, tokens_per_rank=sampled, top_k=top_k,
                       rng=rng, unit_size=experts // nodes if limit else None,
                       max_units=limit)
    counts = count_batch(batch, n_experts=experts, ep=ep, gpus_per_node=per_node)
    scale = tokens_per_rank / sampled
    timed = exchange_phases(
        [counts], kernel=kernel, topology=topology, hw=hw, comm_sms=comm_sms, hidden=hidden,
        dispatch_dtype=dispatch_dtype, combine_dtype=combine_dtype, network=_ANALYTICAL,
        gpus_per_node=per_node, phases=FORWARD, copies_scale=scale, ll_nvlink=nvlink,
        overhead_s=overhead_s)
    size = {
        "dispatch": bytes_per_copy(kernel, hidden=hidden, dtype=dispatch_dtype, dispatch=True),
        "combine": bytes_per_copy(kernel, hidden=hidden, dtype=combine_dtype, dispatch=False),
    }
    return EpExchange(counts=counts, scale=scale, bytes_per_copy=size,
                      seconds={phase: ex.times[0].seconds for (phase, _), ex in timed.items()})


def alltoall(topology, *, hw: HardwareSpec, gpus: int, bytes_per_rank: float) -> float:
    """Seconds of nccl-tests' all-to-all: every rank sends ``bytes_per_rank / gpus`` to
    every rank (itself included), NCCL's fixed cost included."""
    n = gpus
    per_node = min(n, topology.gpus_per_domain)
    ones = np.ones((n, n))
    # One copy per (source, destination) pair; the per-gpu route carries it (NVLink in a
    # node, the NIC with PXN between nodes), the network model times it.
    counts = BatchCounts(routed=n * n, kept_e=np.zeros(n), dropped_e=np.zeros(n),
                         kept_s=np.zeros(n), dropped_unknown=0, pairs_sg=ones, reach_gpu_sg=ones,
                         reach_node_sn=np.full((n, n // per_node), per_node))
    (copies,), _ = group_traffic([counts], kernel="nccl-alltoall", topology=topology,
                                 network=_ANALYTICAL, gpus_per_node=per_node)
    bytes_ = copies.scaled(bytes_per_rank / n)
    exchange = time_exchange([bytes_], bytes_, topology=topology, network=_ANALYTICAL,
                             overhead_s=hw.comm_overhead_s("nccl-alltoall"))
    return exchange.times[0].seconds
