"""Fit a GPU's GEMM efficiency curves to recorded GEMM runs (``moesim calibrate``).

The free parameters are those of :mod:`moesim.cost.compute`'s GEMM roofline:
``gemm_efficiency``, ``gemm_m_half``, ``memory_efficiency`` and ``memory_bytes_half``;
every other field is kept from the base :class:`HardwareSpec`. The fit minimises the
sum of squared log relative errors ``log(simulated / measured)`` of the runs' TFLOPS by
a deterministic grid search (a coarse grid, then two finer grids around the best
point) in numpy. Only the GEMM runs (``grouped-gemm``, ``dense-gemm``) of the files
given are used: communication runs (DeepEP, NCCL) say nothing about GEMMs and are
skipped. Calibrate on the shared reference data (the shipped ``moesim/fidelity/gpu_runs`` files,
``known_gaps.yaml`` included), not on DeepEP internode or low-latency data.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from moesim.config.hardware import HardwareSpec
from moesim.cost import compute
from moesim.errors import InputError
from moesim.fidelity.runs import DenseGemm, GroupedGemm, load_runs

PARAMS = ("gemm_efficiency", "gemm_m_half", "memory_efficiency", "memory_bytes_half")

# Coarse grids; the two refinements search +-1 coarse step around the best point.
_EFF = np.linspace(0.30, 1.0, 36)
_M_HALF = np.concatenate([[0.0], np.geomspace(1.0, 4096.0, 37)])
_BYTES_HALF = np.concatenate([[0.0], np.geomspace(1e5, 1e9, 41)])


@dataclass(frozen=True, kw_only=True)
class GemmCase:
    """One recorded GEMM run reduced to what the roofline needs."""

    file: str
    run: str
    groups: int
    m: int
    n: int
    k: int
    dtype: str
    align: int
    measured_tflops: float

    def tflops(self, hw: HardwareSpec) -> float:
        """Simulated TFLOPS (2 G m n k / t) with ``compute.gemm_seconds``, as regress."""
        seconds = compute.gemm_seconds(hw, groups=self.groups, m=self.m, n=self.n, k=self.k,
                                       dtype=self.dtype, align=self.align)
        return 2.0 * self.groups * self.m * self.n * self.k / seconds / 1e12


@dataclass(frozen=True, kw_only=True)
class FitRow:
    file: str
    run: str
    measured: float
    before: float  # simulated TFLOPS with the base spec
    after: float  # simulated TFLOPS with the fitted spec


@dataclass(frozen=True, kw_only=True)
class FitReport:
    before: dict[str, float]
    after: dict[str, float]
    rows: tuple[FitRow, ...]
    skipped: int  # non-GEMM runs in the files, not used

    @property
    def mape_before(self) -> float:
        return _mape(self.rows, "before")

    @property
    def mape_after(self) -> float:
        return _mape(self.rows, "after")

    def mape_by_file(self) -> dict[str, tuple[float, float]]:
        """(before, after) MAPE per file."""
        files = sorted({r.file for r in self.rows})
        return {f: (_mape([r for r in self.rows if r.file == f], "before"),
                    _mape([r for r in self.rows if r.file == f], "after")) for f in files}


def _mape(rows, which: str) -> float:
    if not rows:
        return float("nan")
    return float(np.mean([abs(getattr(r, which) / r.measured - 1) for r in rows]))


def gemm_cases(
    run_files: Iterable[str | os.PathLike[str]], *, base: HardwareSpec
) -> tuple[list[GemmCase], int]:
    """The GEMM runs of the files (rows padded as regress does), and how many runs were
    not GEMMs."""
    cases: list[GemmCase] = []
    skipped = 0
    for file in run_files:
        if str(file).endswith(".parquet"):
            continue  # a recorded-run table: `moesim perfdb fit` fits those
        for run in load_runs(file).runs:
            w = run.workload
            if "tflops" not in run.measured or not isinstance(w, GroupedGemm | DenseGemm):
                skipped += 1
                continue
            grouped = isinstance(w, GroupedGemm)
            cases.append(GemmCase(
                file=str(file), run=run.id, groups=w.groups if grouped else 1,
                m=w.m_per_group if grouped else w.m, n=w.n, k=w.k, dtype=w.dtype,
                align=base.grouped_gemm_align if grouped else 1,
                measured_tflops=run.measured["tflops"].value))
    return cases, skipped


def _log_times(cases: list[GemmCase], base: HardwareSpec):
    """log of measured time, and the roofline's work terms per case."""
    g = np.array([c.groups for c in cases], float)
    rows = np.array([-(-c.m // c.align) * c.align for c in cases], float)
    n = np.array([c.n for c in cases], float)
    k = np.array([c.k for c in cases], float)
    wb = np.array([compute.dtype_bytes(c.dtype) for c in cases], float)
    peak = np.array([base.peak_flops(c.dtype) for c in cases])
    useful = 2.0 * g * np.array([c.m for c in cases], float) * n * k
    t_meas = useful / (np.array([c.measured_tflops for c in cases]) * 1e12)
    flops = 2.0 * g * rows * n * k
    extra = 2.0 * g * n * k
    nbytes = g * (rows * k * wb + k * n * wb + rows * n * compute.ACT_BYTES)
    return np.log(t_meas), flops / peak, extra / peak, nbytes


def _grid_fit(cases, base, eff, m_half, mem_eff, bytes_half):
    log_t, flops_s, extra_s, nbytes = _log_times(cases, base)
    e, mh = (a.ravel() for a in np.meshgrid(eff, m_half, indexing="ij"))
    me, bh = (a.ravel() for a in np.meshgrid(mem_eff, bytes_half, indexing="ij"))
    lc = np.log((flops_s + mh[:, None] * extra_s) / e[:, None]) - log_t  # [C, runs]
    lm = np.log((nbytes + bh[:, None]) / (base.hbm_GBps * 1e9 * me[:, None])) - log_t
    best = (np.inf, 0, 0)
    for i in range(len(e)):  # loop over compute points; all memory points at once
        loss = (np.maximum(lc[i], lm) ** 2).sum(axis=1)
        j = int(np.argmin(loss))
        if loss[j] < best[0] - 1e-12:
            best = (float(loss[j]), i, j)
    _, i, j = best
    return float(e[i]), float(mh[i]), float(me[j]), float(bh[j])


def _around(grid: np.ndarray, value: float, lo: float, hi: float, points: int = 11):
    idx = int(np.argmin(abs(grid - value)))
    a = grid[max(idx - 1, 0)]
    b = grid[min(idx + 1, len(grid) - 1)]
    return np.clip(np.linspace(a, b, points), lo, hi)


def calibrate(
    run_files: Iterable[str | os.PathLike[str]], *, base: HardwareSpec
) -> tuple[HardwareSpec, FitReport]:
    """Fit the GEMM efficiency parameters (:data:`PARAMS`) to the GEMM runs of
    ``run_files``; every other field stays as in ``base``."""
    files = [Path(f) for f in run_files]
    cases, skipped = gemm_cases(files, base=base)
    if not cases:
        raise InputError("no GEMM runs (grouped-gemm or dense-gemm with tflops) to fit",
                         source=", ".join(map(str, files)) or "<none>",
                         allowed="recorded-run files with DeepGEMM runs")
    grids = (_EFF, _M_HALF, _EFF, _BYTES_HALF)
    fit = _grid_fit(cases, base, *grids)
    for _ in range(2):
        grids = tuple(_around(g, v, lo, hi) for g, v, (lo, hi) in zip(
            grids, fit, [(1e-3, 1.0), (0.0, np.inf), (1e-3, 1.0), (0.0, np.inf)], strict=True))
        fit = _grid_fit(cases, base, *grids)
    after = dict(zip(PARAMS, (round(fit[0], 4), round(fit[1], 2), round(fit[2], 4),
                              round(fit[3], -3)), strict=True))
    names = ", ".join(sorted({Path(c.file).name for c in cases}))
    fitted = dataclasses.replace(base, **after, source=(
        f"{base.source}; GEMM efficiencies fitted by moesim calibrate on {len(cases)} "
        f"GEMM run(s) of {names}").lstrip("; "))
    rows = tuple(FitRow(file=c.file, run=c.run, measured=c.measured_tflops,
                        before=c.tflops(base), after=c.tflops(fitted)) for c in cases)
    report = FitReport(before={p: getattr(base, p) for p in PARAMS}, after=after, rows=rows,
                       skipped=skipped)
    return fitted, report


def hardware_yaml(hw: HardwareSpec) -> str:
    """``hw`` as a hardware YAML file (a mapping of HardwareSpec fields)."""
    return yaml.safe_dump(dataclasses.asdict(hw), sort_keys=False, width=1000)
