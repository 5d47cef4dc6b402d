"""Which measured rows stand for a system, and the small regression subset of them.

aiconfigurator-core measures most ops with several frameworks and releases. moesim fits
and regresses one consistent source per (system, op): TensorRT-LLM's newest release for
GEMM, MoE, attention and MLA (its MoE rows time only the local experts, unlike sglang's
Triton EP rows), the newest NCCL release for collectives, and every DeepEP table whose
``device`` is the system's GPU (the h200_sxm folder's legacy multi-node DeepEP table is
the h100_sxm one relabelled, so it counts once, as H100).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moesim.fidelity.perfdb.predict import modeled

COMPUTE_OPS = ("gemm", "moe", "attention_context", "attention_generation", "mla_context",
               "mla_generation")
GPU_NAMES = {"h100_sxm": "H100", "h200_sxm": "H200", "b200_sxm": "B200", "gb200": "GB200"}
SIZE_COLUMN = {  # the column whose range a subset must cover, per op class
    "gemm": "m", "moe": "tokens", "attention_context": "isl", "attention_generation": "step",
    "mla_context": "isl", "mla_generation": "step", "nccl": "bytes", "deepep_normal": "tokens",
    "deepep_ll": "tokens",
}
TOLERANCE_STEP = 0.05
# Tables that repeat another system's measurements under a new device name: the
# h200_sxm legacy DeepEP tables equal h100_sxm's row for row (same latencies).
RELABELLED = {"h200_sxm": "0.5.6.post2"}


def _version_key(version: str) -> tuple:
    parts = []
    for piece in version.replace("rc", ".").replace("post", ".").split("."):
        parts.append(int(piece) if piece.isdigit() else -1)
    return tuple(parts)


def representative(df: pd.DataFrame) -> pd.Series:
    """Rows of the one source moesim fits and regresses per (system, op) (module doc),
    among the rows moesim models: the newest release that has any."""
    keep = pd.Series(False, index=df.index)
    ok = modeled(df) == ""
    for (system, op), g in df[ok].groupby(["system", "op"]):
        if op in COMPUTE_OPS:
            g = g[g["framework"] == "trtllm"]
        elif op in ("deepep_normal", "deepep_ll"):
            gpu = GPU_NAMES.get(system, "")
            g = g[g["device"].str.contains(gpu, regex=False)] if gpu else g.iloc[:0]
            if system in RELABELLED:
                g = g[g["framework_version"] != RELABELLED[system]]
            keep[g.index] = True
            continue
        if g.empty:
            continue
        newest = max(g["framework_version"].unique(), key=_version_key)
        keep[g.index[g["framework_version"] == newest]] = True
    return keep


def stratified(df: pd.DataFrame, *, per_group: int, seed: int = 0) -> pd.DataFrame:
    """Up to ``per_group`` rows of every (system, op, phase, dtype, distribution, nodes), spread
    evenly over the size range (rows sorted by size, then every n-th), so small and
    large shapes are both covered."""
    picked = []
    keys = ["system", "op", "phase", "dtype", "distribution", "nodes"]
    for _, g in df.groupby(keys, dropna=False):
        size = g[SIZE_COLUMN[g["op"].iloc[0]]].to_numpy(dtype=float, na_value=0)
        # A seeded shuffle before the stable sort picks among rows of equal size.
        order = np.random.default_rng(seed).permutation(len(g))
        g = g.iloc[order].iloc[np.argsort(size[order], kind="stable")]
        take = np.unique(np.linspace(0, len(g) - 1, min(per_group, len(g))).round().astype(int))
        picked.append(g.iloc[take])
    return pd.concat(picked).sort_values("id").reset_index(drop=True)


def with_tolerances(subset: pd.DataFrame, predicted_us: np.ndarray) -> pd.DataFrame:
    """Each row's tolerance is its own measured error plus 5 points, rounded up to a
    multiple of 5%: a later model change that worsens any row by more fails regress."""
    err = np.abs(predicted_us / subset["latency_us"].to_numpy() - 1.0)
    out = subset.copy()
    tol = np.ceil((err + TOLERANCE_STEP) / TOLERANCE_STEP - 1e-9) * TOLERANCE_STEP
    out["tolerance"] = np.round(tol, 2)
    return out
