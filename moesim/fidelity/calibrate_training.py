"""Fit a GPU's backward GEMM efficiency to recorded training steps
(``moesim calibrate --what training``).

The GEMM efficiency curves stay those of the GPU preset (fitted on kernel
measurements); what a whole training step adds is the backward pass, whose GEMMs run
below the forward ones in practice and which the kernel tables do not time. One
parameter per GPU, ``backward_gemm_efficiency`` (:class:`HardwareSpec`), is fitted to
the measured tokens/s of every ``training-step`` run on that GPU: the value in
``[0.3, 1.0]`` that minimises the sum of squared log relative errors, by a grid of
0.05 and then of 0.01 around the best point (deterministic; a step is simulated once
per grid point and run).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moesim.config.hardware import HardwareSpec
from moesim.errors import InputError
from moesim.fidelity.runs import Run, TrainingStep, load_runs, resolve_topology

PARAM = "backward_gemm_efficiency"
_COARSE = np.round(np.arange(0.30, 1.0001, 0.05), 2)


@dataclass(frozen=True, kw_only=True)
class TrainingFitRow:
    run: str
    measured: float  # tokens/s per GPU
    before: float
    after: float


@dataclass(frozen=True, kw_only=True)
class TrainingFit:
    gpu: str
    before: float
    after: float
    rows: tuple[TrainingFitRow, ...]

    @property
    def mape_before(self) -> float:
        return float(np.mean([abs(r.before / r.measured - 1) for r in self.rows]))

    @property
    def mape_after(self) -> float:
        return float(np.mean([abs(r.after / r.measured - 1) for r in self.rows]))


def training_runs(files: Iterable[str | os.PathLike[str]], gpu: str
                  ) -> list[tuple[Run, TrainingStep, str]]:
    """The training-step runs of ``files`` on GPU preset ``gpu``: (run, workload, topology)."""
    from moesim.topologies import load_topology

    found = []
    for file in map(Path, files):
        if file.suffix != ".yaml":
            continue
        for run in load_runs(file).runs:
            if not isinstance(run.workload, TrainingStep):
                continue
            topology = resolve_topology(run, file)
            if load_topology(topology, gpus=run.gpus).gpu == gpu:
                found.append((run, run.workload, topology))
    return found


def _tokens_per_s(run: Run, w: TrainingStep, topology: str, hw: HardwareSpec) -> float:
    from moesim.fidelity.regress import training_step_scenario
    from moesim.simulation import simulate

    scenario = training_step_scenario(run, w, topology)
    scenario = dataclasses.replace(scenario, hardware=hw)
    return simulate(scenario).summary["tokens_per_s_per_gpu"]


def calibrate_training(files: Iterable[str | os.PathLike[str]], *, base: HardwareSpec
                       ) -> tuple[HardwareSpec, TrainingFit]:
    """Fit :data:`PARAM` of ``base`` to the training-step runs on its GPU (module doc)."""
    runs = training_runs(files, base.name)
    if not runs:
        raise InputError(f"no training-step runs on GPU {base.name!r} to fit",
                         field="--base", allowed="a GPU preset that recorded training "
                         "steps ran on (moesim/fidelity/gpu_runs/megatron_bridge_training.yaml)")
    measured = np.array([run.measured["tokens_per_s_per_gpu"].value for run, _, _ in runs])
    cache: dict[float, np.ndarray] = {}

    def predicted(value: float) -> np.ndarray:
        if value not in cache:
            hw = dataclasses.replace(base, **{PARAM: float(value)})
            cache[value] = np.array([_tokens_per_s(run, w, topo, hw) for run, w, topo in runs])
        return cache[value]

    def loss(value: float) -> float:
        return float((np.log(predicted(value) / measured) ** 2).sum())

    best = min(_COARSE, key=loss)
    fine = np.round(np.arange(best - 0.05, best + 0.0501, 0.01), 2)
    best = float(min(fine[(fine >= 0.3) & (fine <= 1.0)], key=loss))
    fitted = dataclasses.replace(base, **{PARAM: best}, source=(
        f"{base.source}; {PARAM} fitted by moesim calibrate --what training on "
        f"{len(runs)} training step(s)").lstrip("; "))
    before = predicted(getattr(base, PARAM)) if getattr(base, PARAM) in cache else np.array(
        [_tokens_per_s(run, w, topo, base) for run, w, topo in runs])
    rows = tuple(TrainingFitRow(run=run.id, measured=float(m), before=float(b), after=float(a))
                 for (run, _, _), m, b, a in zip(runs, measured, before, predicted(best),
                                                 strict=True))
    return fitted, TrainingFit(gpu=base.name, before=getattr(base, PARAM), after=best,
                               rows=rows)
