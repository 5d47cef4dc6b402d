"""Fit one system's free parameters to its recorded-run table (``moesim perfdb fit``).

The fit runs in stages, one per op class, each on the rows that may inform it and with
the earlier stages' parameters held fixed::

    gemm        gemm_efficiency, fp8_gemm_efficiency, gemm_m_half, fp8_gemm_m_half,
                memory_efficiency, memory_bytes_half, kernel_overhead_us  <- dense GEMMs
    attention   attention_efficiency, attention_keys_half,
                attention_overhead_us                           <- context attention + MLA
    decode      decode_overhead_us, decode_query_head_ns        <- decode attention + MLA
    moe         moe_gemm_efficiency, moe_m_half, moe_memory_efficiency,
                moe_overhead_us                                 <- balanced MoE rows only
    nccl        nccl_latency_us, NVLink efficiency, nccl_gpus_half  <- one-node NCCL rows
    deepep      deepep_overhead_us, deepep_sms_full             <- DeepEP normal, 1 node only
    deepep_ll   deepep_ll_overhead_us                           <- DeepEP LL, 1 node only

Each stage minimises the robust (soft-L1) sum of squared log errors
``log(predicted / measured)`` with scipy's bounded least squares.
Power-law MoE and multi-node DeepEP rows are never fitted: they are predicted from the
fitted parameters, moesim's load model, topology and bytes, and reported as
out-of-sample.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd

from moesim.errors import InputError
from moesim.fidelity.perfdb.predict import SystemModel, modeled, predict

NVLINK = "nvlink_efficiency"  # lives on SystemModel (the topology), not on the GPU


@dataclass(frozen=True)
class Stage:
    name: str
    ops: tuple[str, ...]
    params: tuple[tuple[str, float, float], ...]  # (field, lower, upper)


STAGES = (
    Stage("gemm", ("gemm",), (
        ("gemm_efficiency", 0.2, 1.0), ("fp8_gemm_efficiency", 0.2, 1.0),
        ("gemm_m_half", 0.0, 4096.0), ("fp8_gemm_m_half", 0.0, 4096.0),
        ("memory_efficiency", 0.2, 1.0),
        ("memory_bytes_half", 0.0, 1e9), ("kernel_overhead_us", 0.0, 50.0))),
    Stage("attention", ("attention_context", "mla_context"), (
        ("attention_efficiency", 0.05, 1.0), ("attention_keys_half", 0.0, 1e5),
        ("attention_overhead_us", 0.0, 100.0))),
    Stage("decode", ("attention_generation", "mla_generation"), (
        ("decode_overhead_us", 0.0, 100.0), ("decode_query_head_ns", 0.0, 1000.0))),
    Stage("moe", ("moe",), (
        ("moe_gemm_efficiency", 0.1, 1.0), ("moe_m_half", 0.0, 4096.0),
        ("moe_memory_efficiency", 0.2, 1.0), ("moe_overhead_us", 0.0, 500.0))),
    Stage("nccl", ("nccl",), (("nccl_latency_us", 0.0, 100.0), (NVLINK, 0.1, 1.0),
                              ("nccl_gpus_half", 0.0, 16.0))),
    Stage("deepep", ("deepep_normal",), (
        ("deepep_overhead_us", 0.0, 500.0), ("deepep_sms_full", 0.0, 48.0))),
    Stage("deepep_ll", ("deepep_ll",), (("deepep_ll_overhead_us", 0.0, 500.0),)),
)
FITTED = tuple(name for stage in STAGES for name, _, _ in stage.params)


def in_sample(df: pd.DataFrame) -> pd.Series:
    """Rows the fit may use: dense ops as they are, MoE only ``balanced``, DeepEP only
    one node. Everything else is kept out for the out-of-sample report."""
    moe_ok = (df["op"] != "moe") | (df["distribution"] == "balanced")
    deepep = df["op"].isin(["deepep_normal", "deepep_ll"])
    one_node = ~deepep | (df["nodes"] == 1).fillna(False)
    return (modeled(df) == "") & moe_ok & one_node


def _get(model: SystemModel, name: str) -> float:
    if name == NVLINK:
        return model.nvlink_efficiency
    value = getattr(model.hardware, name)
    if value is None:  # an optional curve not set yet starts from the dense one
        value = {"nccl_latency_us": model.hardware.comm_overhead_us,
                 "deepep_overhead_us": model.hardware.comm_overhead_us,
                 "deepep_ll_overhead_us": model.hardware.comm_overhead_us,
                 "moe_m_half": model.hardware.gemm_m_half,
                 "moe_memory_efficiency": model.hardware.memory_efficiency,
                 "fp8_gemm_m_half": model.hardware.gemm_m_half}.get(
            name, model.hardware.gemm_efficiency)
    return float(value)


def _set(model: SystemModel, values: dict[str, float]) -> SystemModel:
    hw_values = {k: v for k, v in values.items() if k != NVLINK}
    hardware = dataclasses.replace(model.hardware, **hw_values)
    nvlink = values.get(NVLINK, model.nvlink_efficiency)
    return dataclasses.replace(model, hardware=hardware, nvlink_efficiency=nvlink)


@dataclass(frozen=True, kw_only=True)
class StageResult:
    stage: str
    rows: int
    params: dict[str, float]
    mape_before: float
    mape_after: float


def fit_system(df: pd.DataFrame, model: SystemModel, *, max_rows: int = 1500,
               seed: int = 0) -> tuple[SystemModel, list[StageResult]]:
    """Fit ``model`` stage by stage on ``df``'s in-sample rows of its system.

    A stage with more than ``max_rows`` rows fits a seeded random sample of them; a stage
    whose fit would raise the MAPE keeps its starting values."""
    try:
        from scipy.optimize import least_squares
    except ImportError:
        raise InputError("fitting needs scipy, which is not installed", field="perfdb fit",
                         allowed="pip install 'moesim[perfdb]'") from None

    rows = df[(df["system"] == model.system) & in_sample(df)]
    results = []
    for stage in STAGES:
        sub = rows[rows["op"].isin(stage.ops)]
        if sub.empty:
            continue
        if len(sub) > max_rows:
            sub = sub.sample(max_rows, random_state=seed)
        measured = sub["latency_us"].to_numpy()
        names = [name for name, _, _ in stage.params]
        lo = np.array([b for _, b, _ in stage.params])
        hi = np.array([b for _, _, b in stage.params])
        # Fit in units of each bound's span so that one step size suits every parameter.
        span = hi - lo

        def residuals(z, sub=sub, measured=measured, names=names, lo=lo, span=span,
                      model=model):
            trial = _set(model, dict(zip(names, lo + z * span, strict=True)))
            return np.log(predict(sub, {model.system: trial}) / measured)

        x0 = np.array([_get(model, n) for n in names])
        z0 = np.clip((x0 - lo) / span, 1e-3, 1 - 1e-3)
        before = float(np.mean(np.abs(np.expm1(residuals(z0)))))
        # An SM count is a step function of the kernel's time (max(1, full / sms) over
        # the swept counts): gradients see flats, so it is searched on whole SMs (4-48),
        # the other parameters fitted at each.
        at = names.index("deepep_sms_full") if "deepep_sms_full" in names else None
        grid = [None] if at is None else [(sms - lo[at]) / span[at] for sms in range(4, 49)]
        best = min((_solve(least_squares, residuals, z0, at, fixed) for fixed in grid),
                   key=lambda cost_z: cost_z[0])
        after = float(np.mean(np.abs(np.expm1(residuals(best[1])))))
        if after > before:  # the robust cost is not the MAPE: never hand back a worse spec
            best, after = (np.nan, z0), before
        values = dict(zip(names, lo + best[1] * span, strict=True))
        model = _set(model, values)
        results.append(StageResult(stage=stage.name, rows=len(sub), params=values,
                                   mape_before=before, mape_after=after))
    if not results:
        raise InputError(f"no rows of {model.system} that a fit stage uses",
                         field="--system", allowed="a table with in-sample rows of the system "
                         "(dense ops, balanced MoE, one-node DeepEP; see docs/perfdb.md)")
    return model, results


def _solve(least_squares, residuals, z0, at, fixed):
    """(cost, z): bounded robust least squares on ``z`` in [0, 1], with ``z[at]`` held
    at ``fixed`` when ``at`` is not None."""
    options = {"bounds": (0.0, 1.0), "loss": "soft_l1", "f_scale": 0.1, "diff_step": 1e-3,
               "max_nfev": 200}
    if at is None:
        sol = least_squares(residuals, z0, **options)
        return sol.cost, sol.x
    sol = least_squares(lambda z: residuals(np.insert(z, at, fixed)), np.delete(z0, at),
                        **options)
    return sol.cost, np.insert(sol.x, at, fixed)


FITTED_SCHEMA = "moesim.fitted-system/1"
FITTED_NOTE = "efficiencies and overheads fitted by `moesim perfdb fit` on"


def fitted_document(model: SystemModel, results: list[StageResult], *,
                    provenance: dict) -> dict:
    """The YAML-ready fitted spec: the GPU's :class:`HardwareSpec`, the NVLink
    efficiency its node topology should carry, and how each stage fitted."""
    hw = dataclasses.asdict(model.hardware)
    datasheet = hw["source"].split(FITTED_NOTE)[0].rstrip("; ")
    source = (f"{datasheet}; {FITTED_NOTE} {provenance.get('package', 'aiconfigurator-core')} "
              f"{provenance.get('package_version', '')} {model.system} (fields under `fit`)")
    return {
        "schema": FITTED_SCHEMA,
        "system": model.system,
        "nvlink_efficiency": round(float(model.nvlink_efficiency), 4),
        "hardware": {**{k: _plain(v) for k, v in hw.items()}, "source": source},
        "fit": [{"stage": r.stage, "rows": r.rows,
                 "params": {k: _plain(v) for k, v in r.params.items()},
                 "mape_before": round(r.mape_before, 4), "mape_after": round(r.mape_after, 4)}
                for r in results],
        "data": {k: provenance[k] for k in ("package", "package_version") if k in provenance},
    }


def _plain(value):
    """numpy scalars -> rounded Python numbers (YAML-friendly, stable diffs)."""
    if isinstance(value, (float, np.floating)):
        return float(f"{float(value):.6g}")
    if isinstance(value, np.integer):
        return int(value)
    return value
