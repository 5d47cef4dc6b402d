"""moesim's prediction of every row of a recorded-run table, with moesim's own models.

Each op class goes through the model the simulator itself uses:

- ``gemm``: :func:`moesim.cost.compute.gemm_time` (roofline with the efficiency curves); FP8
  rows add :func:`moesim.cost.compute.quantize_time`, since the benchmark times the dynamic
  quantization of its BF16 input too.
- ``moe``: one fused MoE on the timed EP rank: its ``experts / moe_ep`` local experts' two
  grouped GEMMs (``inter / moe_tp`` wide) through the same roofline, plus
  ``moe_overhead_us`` for routing, quantisation and (un)permutation. ``balanced`` rows
  spread the ``tokens x topk`` picks evenly; ``power_law_<a>`` rows take the expert
  loads from :func:`moesim.routing.power_law.power_law_loads` (moesim's power-law model,
  five seeded draws) and time the most loaded rank, as the benchmark does.
- ``attention_context`` / ``mla_context``: :func:`moesim.cost.compute.attention_prefill_time`.
- ``attention_generation`` / ``mla_generation``: :func:`moesim.cost.compute.attention_decode_time`
  over ``step + 1`` cached tokens (MLA absorbed: 576-wide scores over the shared latent).
- ``nccl``: :func:`moesim.comm.collectives.collective_time` on the system's node topology.
- ``deepep_normal`` / ``deepep_ll``: :func:`moesim.fidelity.benchmarks.ep_exchange` (routing,
  traffic and the analytical network model) on the system's node (``nodes = 1``) or
  cluster topology, with DeepEP's FP8 dispatch and BF16 combine.

Rows whose dtype or kernel the models do not cover are not predicted (NaN) and
:func:`modeled` says why; nothing is fitted per row.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from moesim.comm.collectives import collective_time
from moesim.config.hardware import HardwareSpec
from moesim.config.kernels import DISPATCH_KERNELS
from moesim.cost import compute
from moesim.network.exchange import kernel_seconds, sms_stretch

# aiconfigurator system -> (GPU hardware preset, one-node topology, multi-node topology)
SYSTEMS: dict[str, tuple[str, str, str]] = {
    "h100_sxm": ("h100", "dgx-h100", "dgx-h100-superpod"),
    "h200_sxm": ("h200", "dgx-h200", "dgx-h200-superpod"),
    "b200_sxm": ("b200", "dgx-b200", "dgx-b200-superpod"),
    "gb200": ("gb200", "gb200-nvl72", "gb200-nvl72"),
}
GPUS_PER_NODE = 8  # DeepEP's tables: EP = 8 x node_num

# Table dtype -> moesim dtype. fp8_block is DeepSeek's 1x128 / 128x128 block-scaled FP8;
# per-tensor FP8, INT4 and FP4 kernels are not modelled.
DTYPES = {"bfloat16": "bf16", "float16": "bf16", "fp8_block": "fp8"}
KV_BYTES = {"bfloat16": 2, "float16": 2, "fp8": 1}
NCCL_BYTES = {"half": 2, "bfloat16": 2, "float": 4, "int8": 1, "fp8": 1}

# DeepSeek-V3 MLA (the tables' fixed shape): non-absorbed prefill, absorbed decode.
MLA_QK, MLA_V = 128 + 64, 128
MLA_LATENT = 512 + 64
MOE_DRAWS = 5  # the benchmark averages five power-law draws


@dataclass(frozen=True, kw_only=True)
class SystemModel:
    """What predicting one system needs: its GPU and the NVLink efficiency."""

    system: str
    hardware: HardwareSpec
    nvlink_efficiency: float

    def topology(self, gpus: int):
        return system_topology(self.system, self.nvlink_efficiency, gpus)


@functools.lru_cache(maxsize=256)
def system_topology(system: str, nvlink_efficiency: float, gpus: int):
    """The system's node (``gpus <= 8``) or cluster topology with this NVLink efficiency."""
    from moesim.topologies import load_topology

    _, node, cluster = SYSTEMS[system]
    topo = load_topology(node if gpus <= GPUS_PER_NODE else cluster, gpus=gpus)
    return dataclasses.replace(topo, nvlink_bw=topo.nvlink_bw_nominal * nvlink_efficiency)


@functools.cache
def base_model(system: str) -> SystemModel:
    """The system's presets as shipped (before any fit)."""
    from moesim.config.loading import hardware_preset
    from moesim.topologies import load_topology

    if system not in SYSTEMS:
        raise KeyError(system)
    gpu, node, _ = SYSTEMS[system]
    topo = load_topology(node, gpus=GPUS_PER_NODE)
    return SystemModel(system=system, hardware=hardware_preset(gpu),
                       nvlink_efficiency=topo.nvlink_bw / topo.nvlink_bw_nominal)


def modeled(df: pd.DataFrame) -> pd.Series:
    """Why each row is not predicted ("" when it is)."""
    why = pd.Series("", index=df.index)
    why[~df["system"].isin(list(SYSTEMS))] = "system without a moesim topology"
    dtype_ops = df["op"].isin(["gemm", "moe", "attention_context", "mla_context"])
    why[dtype_ops & ~df["dtype"].isin(list(DTYPES)) & (why == "")] = "dtype not modelled"
    kv_ops = df["op"].isin(["attention_generation", "mla_generation"])
    why[kv_ops & ~df["kv_dtype"].isin(list(KV_BYTES)) & (why == "")] = "KV dtype not modelled"
    moe = df["op"] == "moe"
    dist = df["distribution"].astype(str)
    why[moe & ~(dist.eq("balanced") | dist.str.startswith("power_law_")) & (why == "")] = (
        "routing distribution not modelled")
    # sglang's Triton MoE with EP > 1 also computes every remote slot on local expert 0
    # (weight 0): its EP rows time more work than the layer does.
    inflated = moe & df["kernel"].eq("sglang_fused_moe_triton") & (df["moe_ep"] > 1)
    why[inflated & (why == "")] = "sglang Triton EP>1 computes remote slots on expert 0"
    why[moe & df["kernel"].str.contains("nongated") & (why == "")] = (
        "non-gated (two-matrix) experts not modelled")
    bad_moe = moe & ((df["moe_ep"] < 1) | (df["moe_tp"] < 1) | (df["experts"] % df["moe_ep"] != 0)
                     | (df["topk"] > df["experts"]) | (df["tokens"] < 1))
    why[bad_moe.fillna(True) & moe & (why == "")] = (
        "MoE shape: experts not split over moe_ep, moe_tp < 1, or topk > experts")
    deepep = df["op"].isin(["deepep_normal", "deepep_ll"])
    ranks = GPUS_PER_NODE * df["nodes"]
    bad_ep = deepep & ((df["experts"] % ranks != 0) | (df["topk"] > df["experts"]))
    why[bad_ep.fillna(False) & (why == "")] = "experts not split over the ranks, or topk > experts"
    nccl = df["op"] == "nccl"
    why[nccl & ~df["dtype"].isin(list(NCCL_BYTES)) & (why == "")] = "dtype not modelled"
    return why


def _f(df: pd.DataFrame, col: str) -> np.ndarray:
    return df[col].to_numpy(dtype=float, na_value=np.nan)


def predict(df: pd.DataFrame, models: dict[str, SystemModel]) -> np.ndarray:
    """Predicted latency (µs) of every row; NaN where :func:`modeled` says it is not."""
    out = np.full(len(df), np.nan)
    ok = (modeled(df) == "").to_numpy()
    for (system, op), idx in df[ok].groupby(["system", "op"]).indices.items():
        rows = df[ok].iloc[idx]
        where = np.flatnonzero(ok)[idx]
        out[where] = _PREDICT[op](rows, models[system]) * 1e6
    return out


# ------------------------------------------------------------------ per op class


def _gemm(rows: pd.DataFrame, model: SystemModel) -> np.ndarray:
    out = np.empty(len(rows))
    for dtype, idx in rows.groupby("dtype").indices.items():
        r = rows.iloc[idx]
        out[idx] = compute.gemm_time(model.hardware, groups=1, m=_f(r, "m"), n=_f(r, "n"),
                                     k=_f(r, "k"), dtype=DTYPES[dtype])
        if DTYPES[dtype] == "fp8":  # the benchmark quantizes its BF16 input first
            out[idx] += compute.quantize_time(model.hardware, m=_f(r, "m"), k=_f(r, "k"))
    return out


def _moe(rows: pd.DataFrame, model: SystemModel) -> np.ndarray:
    hw = model.hardware
    loads = [_rank0_rows(str(r.distribution), int(r.tokens), int(r.topk), int(r.experts),
                         int(r.moe_ep), hw.grouped_gemm_align)
             for r in rows.itertuples()]
    rows_rd = np.array([rd for rd, _ in loads])  # [rows, draws] padded rows on rank 0
    active_rd = np.array([ad for _, ad in loads])  # [rows, draws] experts with rows
    inter = (_f(rows, "inter") / _f(rows, "moe_tp"))[:, None]
    hidden = _f(rows, "hidden")[:, None]
    out = np.empty(len(rows))
    for dtype, idx in rows.groupby("dtype").indices.items():
        t_rd = compute.expert_ffn_time(hw, hidden=hidden[idx], intermediate=inter[idx],
                                       rows=rows_rd[idx], active_experts=active_rd[idx],
                                       dtype=DTYPES[dtype])
        out[idx] = t_rd.mean(axis=1)
    return out


@functools.lru_cache(maxsize=1 << 16)
def _rank0_rows(distribution: str, tokens: int, topk: int, experts: int, ep: int,
                align: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Padded rows and active experts of the timed rank, per routing draw."""
    from moesim.routing.power_law import power_law_loads

    local = experts // ep
    if distribution == "balanced":
        draws = [balanced_loads(experts, tokens, topk)[:local]] * MOE_DRAWS
    else:
        alpha = float(distribution.removeprefix("power_law_"))
        # A seed from the shape alone: the same row gets the same draws in any table.
        seed = zlib.crc32(f"{distribution}/{tokens}/{topk}/{experts}/{ep}".encode())
        rng = np.random.default_rng(seed)
        draws = [_busiest_rank(power_law_loads(experts, tokens, topk, alpha, rng), ep)
                 for _ in range(MOE_DRAWS)]
    padded = tuple(float((-(-t // align) * align).sum()) for t in draws)
    active = tuple(float((t > 0).sum()) for t in draws)
    return padded, active


def balanced_loads(experts: int, tokens: int, topk: int) -> np.ndarray:
    """Per-expert rows when ``tokens x topk`` picks are spread as evenly as possible."""
    picks = tokens * topk
    base, extra = divmod(picks, experts)
    loads = np.full(experts, base, dtype=np.int64)
    # The remainder lands on every (experts / extra)-th expert, not the first ones.
    if extra:
        loads[np.linspace(0, experts, extra, endpoint=False).astype(int)] += 1
    return loads


def _busiest_rank(loads_e: np.ndarray, ep: int) -> np.ndarray:
    per_rank = loads_e.reshape(ep, -1)
    return per_rank[per_rank.sum(axis=1).argmax()]


def _attention_context(rows: pd.DataFrame, model: SystemModel) -> np.ndarray:
    out = np.empty(len(rows))
    for dtype, idx in rows.groupby("dtype").indices.items():
        r = rows.iloc[idx]
        hd = _f(r, "head_dim")
        out[idx] = compute.attention_prefill_time(
            model.hardware, batch=_f(r, "batch"), seq=_f(r, "isl"), heads=_f(r, "heads"),
            score_dim=hd, value_dim=hd, window=np.nan_to_num(_f(r, "window")),
            dtype=DTYPES[dtype])
    return out


def _cached(rows: pd.DataFrame) -> np.ndarray:
    """Tokens a decode step attends to: the ``step`` cached ones and itself."""
    context = _f(rows, "step") + 1
    window = np.nan_to_num(_f(rows, "window"))
    return np.where(window > 0, np.minimum(context, window), context)


def _attention_generation(rows: pd.DataFrame, model: SystemModel) -> np.ndarray:
    hd = _f(rows, "head_dim")
    kv_bytes = rows["kv_dtype"].map(KV_BYTES).to_numpy(dtype=float)
    return compute.attention_decode_time(
        model.hardware, batch=_f(rows, "batch"), context=_cached(rows), heads=_f(rows, "heads"),
        score_dim=hd, value_dim=hd, kv_bytes_per_token=2 * _f(rows, "kv_heads") * hd * kv_bytes)


def _mla_context(rows: pd.DataFrame, model: SystemModel) -> np.ndarray:
    return compute.attention_prefill_time(
        model.hardware, batch=_f(rows, "batch"), seq=_f(rows, "isl"), heads=_f(rows, "heads"),
        score_dim=MLA_QK, value_dim=MLA_V, dtype="bf16")


def _mla_generation(rows: pd.DataFrame, model: SystemModel) -> np.ndarray:
    kv_bytes = rows["kv_dtype"].map(KV_BYTES).to_numpy(dtype=float)
    return compute.attention_decode_time(
        model.hardware, batch=_f(rows, "batch"), context=_cached(rows), heads=_f(rows, "heads"),
        score_dim=MLA_LATENT, value_dim=512, kv_bytes_per_token=MLA_LATENT * kv_bytes)


def _nccl(rows: pd.DataFrame, model: SystemModel) -> np.ndarray:
    out = np.empty(len(rows))
    elem = rows["dtype"].map(NCCL_BYTES).to_numpy(dtype=float)
    for (op, gpus), idx in rows.groupby(["phase", "gpus"]).indices.items():
        topo = model.topology(int(gpus))
        out[idx] = collective_time(model.hardware, topo, op=op,
                                   size=_f(rows.iloc[idx], "bytes") * elem[idx], n=int(gpus))
    return out


def _deepep(kernel: str):
    def predict_rows(rows: pd.DataFrame, model: SystemModel) -> np.ndarray:
        hw = model.hardware
        link_s = np.array([
            _deepep_link_seconds(model.system, model.nvlink_efficiency, kernel, int(r.nodes),
                                 int(r.tokens), int(r.hidden), int(r.experts), int(r.topk),
                                 str(r.phase))
            for r in rows.itertuples()])
        sms = np.nan_to_num(_f(rows, "sms")).astype(int)
        stretch = np.array([sms_stretch(hw, kernel, n) for n in sms])
        return kernel_seconds(link_s, overhead_s=hw.comm_overhead_s(kernel), stretch=stretch)

    return predict_rows


@functools.lru_cache(maxsize=1 << 16)
def _deepep_link_seconds(system: str, nvlink_efficiency: float, kernel: str, nodes: int,
                         tokens: int, hidden: int, experts: int, topk: int, phase: str) -> float:
    """Hop latency plus busiest-link time of one DeepEP phase (no fixed cost, all SMs:
    those are the fitted parameters)."""
    from moesim.fidelity.benchmarks import ep_exchange

    topo = system_topology(system, nvlink_efficiency, GPUS_PER_NODE * nodes)
    low_latency = kernel == "deepep-low-latency"
    ex = ep_exchange(topo, hw=base_model(system).hardware, overhead_s=0.0, kernel=kernel,
                     tokens_per_rank=tokens,
                     hidden=hidden, experts=experts, top_k=topk,
                     topk_groups=None if low_latency else min(nodes, 4))
    return ex.seconds[phase]


_PREDICT = {
    "gemm": _gemm,
    "moe": _moe,
    "attention_context": _attention_context,
    "attention_generation": _attention_generation,
    "mla_context": _mla_context,
    "mla_generation": _mla_generation,
    "nccl": _nccl,
    **{k.perfdb_op: _deepep(k.name) for k in DISPATCH_KERNELS.values() if k.perfdb_op},
}
