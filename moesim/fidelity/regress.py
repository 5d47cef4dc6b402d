"""Regression against recorded GPU runs: simulate each run with moesim's own models and
compare every measured metric within the run's relative tolerance.

No model lives here: EP exchanges and all-to-alls go through the simulator's own routing,
traffic and exchange timing (:mod:`moesim.fidelity.benchmarks`), GEMMs through the
compute model's roofline with the GPU's efficiencies. What is defined here is only how
each benchmark counts its metric, so that the simulated number is the same quantity as
the measured one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moesim.config.kernels import DISPATCH_KERNELS
from moesim.config.loading import hardware_preset
from moesim.cost import compute
from moesim.errors import InputError
from moesim.fidelity.benchmarks import alltoall, ep_exchange
from moesim.fidelity.runs import (
    KNOWN_GAPS,
    AllToAll,
    DenseGemm,
    EpDispatchCombine,
    GroupedGemm,
    Run,
    TrainingStep,
    load_runs,
    resolve_topology,
)
from moesim.routing.batch import BatchCounts

# ------------------------------------------------------------------ simulation


def simulate_run(run: Run, file: str | os.PathLike[str] | None = None) -> dict[str, float]:
    """Simulated value of every metric ``run`` measured (same names, same units).

    ``file`` is the recorded-run file, to find a topology path given relative to it.
    """
    from moesim.topologies import load_topology

    topo = load_topology(resolve_topology(run, file), gpus=run.gpus)
    hw = hardware_preset(topo.gpu)
    w = run.workload
    if isinstance(w, EpDispatchCombine):
        values = _ep_dispatch_combine(run, w, topo, hw)
    elif isinstance(w, GroupedGemm):
        values = {"tflops": _gemm_tflops(hw, groups=w.groups, m=w.m_per_group, n=w.n, k=w.k,
                                         dtype=w.dtype, align=hw.grouped_gemm_align)}
    elif isinstance(w, DenseGemm):
        # A dense GEMM has no per-expert row padding (compute.ffn_seconds has none either).
        values = {"tflops": _gemm_tflops(hw, groups=1, m=w.m, n=w.n, k=w.k, dtype=w.dtype,
                                         align=1)}
    elif isinstance(w, AllToAll):
        values = _alltoall(run, w, topo, hw)
    elif isinstance(w, TrainingStep):
        values = _training_step(run, w, resolve_topology(run, file))
    else:  # pragma: no cover - the schema admits no other kind
        raise AssertionError(w)
    return {name: values[name] for name in run.measured}


def training_step_scenario(run: Run, w: TrainingStep, topology: str):
    """The scenario of a recorded training step: the model preset with its own routing
    gate, uniform random assignments, the run's layout and batch."""
    from moesim.config.feasibility import check_feasible
    from moesim.config.loading import scenario_from_dict

    schedule = w.schedule or ("interleaved" if w.vp > 1 else "1f1b")
    data = {
        "name": run.id, "mode": "train", "model": {"preset": w.model}, "topology": topology,
        "engine": "fast",
        "parallel": {"ep": w.ep, "gpus": run.gpus, "tp": w.tp, "pp": w.pp, "vp": w.vp,
                     "cp": w.cp, "moe_tp": w.moe_tp, "dispatch_kernel": w.dispatch_kernel},
        "training": {"global_batch": w.global_batch, "micro_batch": w.micro_batch,
                     "seq_len": w.seq_len, "precision": w.precision, "schedule": schedule},
        "routing": {"assignment": w.routing},
    }
    scenario = scenario_from_dict(data, source=f"run {run.id}", overrides=w.overrides)
    check_feasible(scenario)
    return scenario


def _training_step(run: Run, w: TrainingStep, topology: str) -> dict[str, float]:
    from moesim.simulation import simulate

    summary = simulate(training_step_scenario(run, w, topology)).summary
    return {"tokens_per_s_per_gpu": summary["tokens_per_s_per_gpu"],
            "model_tflops_per_gpu": summary["model_tflops_per_gpu"]}


def _ep_dispatch_combine(run: Run, w: EpDispatchCombine, topo, hw) -> dict[str, float]:
    ex = ep_exchange(topo, hw=hw, kernel=w.kernel, tokens_per_rank=w.tokens_per_rank,
                     hidden=w.hidden, experts=w.experts, top_k=w.top_k,
                     topk_groups=w.topk_groups, dispatch_dtype=w.dispatch_dtype,
                     combine_dtype=w.combine_dtype, nvlink=w.nvlink, comm_sms=w.comm_sms)
    out: dict[str, float] = {}
    for name, m in run.measured.items():
        phase, _, what = name.partition("_")
        if what == "latency_us":
            out[name] = ex.seconds[phase] * 1e6
        else:
            copies_r0 = _benchmark_copies(ex.counts, w.kernel, m.link or "nvlink") * ex.scale
            out[name] = copies_r0 * ex.bytes_per_copy[phase] / ex.seconds[phase] / 1e9
    return out


def _benchmark_copies(counts: BatchCounts, kernel: str, link: str) -> float:
    """Token copies of rank 0 that the kernel's own benchmark divides by its time.

    DeepEP counts what the kernel moves *including rank 0's own tokens*, which never
    cross a link: ``recv_x.numel()`` for NVLink (tests/test_intranode.py and
    test_internode.py), the (token, node) pairs including its own node for RDMA
    (test_internode.py), every (token, expert) selection for low-latency
    (test_low_latency.py). The simulated bandwidth must count the same bytes, or it
    would be a different quantity from the measured one.
    """
    route = DISPATCH_KERNELS[kernel].route
    if route == "per-expert":
        return float(counts.pairs_sg[0].sum())
    if route == "per-gpu":
        return float(counts.reach_gpu_sg[0].sum())
    if link == "rdma":
        return float(counts.reach_node_sn[0].sum())
    return float(counts.reach_gpu_sg[:, 0].sum())


def _gemm_tflops(hw, *, groups: int, m: int, n: int, k: int, dtype: str, align: int) -> float:
    """DeepGEMM's TFLOPS (2 G m n k / t) with t from the compute model's roofline.

    The benchmark times one GEMM per group, not a SwiGLU FFN, so the roofline gets that
    GEMM's work: rows padded to the kernel's alignment, ``dtype`` inputs, BF16 output.
    """
    seconds = compute.gemm_seconds(hw, groups=groups, m=m, n=n, k=k, dtype=dtype, align=align)
    return 2.0 * groups * m * n * k / seconds / 1e12


def _alltoall(run: Run, w: AllToAll, topo, hw) -> dict[str, float]:
    """nccl-tests all-to-all: every rank sends ``bytes_per_rank / n`` to every rank."""
    seconds = alltoall(topo, hw=hw, gpus=run.gpus, bytes_per_rank=w.bytes_per_rank)
    algbw = w.bytes_per_rank / seconds / 1e9
    return {"algbw_GBps": algbw, "busbw_GBps": algbw * (run.gpus - 1) / run.gpus}


# ------------------------------------------------------------------ comparison


@dataclass(frozen=True, kw_only=True)
class RegressRow:
    file: str
    run: str
    metric: str
    op: str  # op class: dispatch, combine, grouped-gemm, dense-gemm, alltoall
    measured: float
    simulated: float
    rel_error: float  # (simulated - measured) / measured
    tolerance: float
    passed: bool


@dataclass(frozen=True, kw_only=True)
class RegressReport:
    rows: tuple[RegressRow, ...]

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows)

    @property
    def mape(self) -> float:
        """Mean absolute relative error over all rows (a fraction, not percent)."""
        return _mape(self.rows)

    @property
    def mape_by_op(self) -> dict[str, float]:
        ops = sorted({row.op for row in self.rows})
        return {op: _mape([row for row in self.rows if row.op == op]) for op in ops}

    @property
    def failed(self) -> tuple[RegressRow, ...]:
        return tuple(row for row in self.rows if not row.passed)


def _mape(rows: Sequence[RegressRow]) -> float:
    return float(np.mean([abs(row.rel_error) for row in rows])) if rows else float("nan")


def _op_class(run: Run, metric: str) -> str:
    if isinstance(run.workload, EpDispatchCombine):
        return metric.partition("_")[0]
    return run.workload.kind


def recorded_files(
    paths: Iterable[str | os.PathLike[str]], *, include_known_gaps: bool = False
) -> list[Path]:
    """Files named, and the ``*.yaml`` and ``*.parquet`` (recorded-run tables) of folders
    named; a folder's ``known_gaps.yaml`` only with ``include_known_gaps`` (naming that
    file directly always runs it)."""
    allowed = "recorded-run YAML or Parquet files, or folders of them"
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = [f for f in sorted([*p.glob("*.yaml"), *p.glob("*.parquet")])
                     if include_known_gaps or f.name != KNOWN_GAPS]
            if not found:  # nothing compared must not read as "all passed"
                other = "" if include_known_gaps else f" other than {KNOWN_GAPS}"
                raise InputError(f"a folder without recorded runs (*.yaml or *.parquet{other})",
                                 source=str(p), allowed=allowed)
            files += found
        elif p.is_file():
            files.append(p)
        elif p.exists():
            raise InputError("not a regular file or a folder", source=str(p), allowed=allowed)
        else:
            raise InputError("no such file or folder", source=str(p), allowed=allowed)
    return files


def regress(
    paths: Iterable[str | os.PathLike[str]], *, include_known_gaps: bool = False
) -> RegressReport:
    """Simulate every run of the recorded-run files (or folders) and compare."""
    rows: list[RegressRow] = []
    for file in recorded_files(paths, include_known_gaps=include_known_gaps):
        if file.suffix == ".parquet":
            continue  # recorded-run tables: regress_tables
        recorded = load_runs(file)
        for run in recorded.runs:
            simulated = simulate_run(run, file)
            for metric, m in run.measured.items():
                sim = simulated[metric]
                rel = (sim - m.value) / m.value
                rows.append(RegressRow(
                    file=str(file), run=run.id, metric=metric, op=_op_class(run, metric),
                    measured=m.value, simulated=sim, rel_error=rel,
                    tolerance=run.tolerance, passed=abs(rel) <= run.tolerance))
    return RegressReport(rows=tuple(rows))


def regress_tables(
    paths: Iterable[str | os.PathLike[str]], *, include_known_gaps: bool = False
) -> list:
    """:func:`moesim.fidelity.perfdb.regress.regress_table` on every recorded-run table among
    ``paths`` (files or folders)."""
    from moesim.fidelity.perfdb.regress import regress_table
    from moesim.fidelity.perfdb.table import read_table

    reports = []
    for file in recorded_files(paths, include_known_gaps=include_known_gaps):
        if file.suffix == ".parquet":
            table, _ = read_table(file)
            reports.append(regress_table(table, file=str(file)))
    return reports
