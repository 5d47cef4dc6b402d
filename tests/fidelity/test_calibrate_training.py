"""`moesim calibrate --what training`: the shipped backward GEMM efficiencies are what the
fit gives on the shipped training steps, not numbers set by hand."""

from __future__ import annotations

import pytest

from moesim.config.loading import hardware_preset
from moesim.errors import InputError
from moesim.fidelity.calibrate_training import PARAM, calibrate_training, training_runs
from moesim.fidelity.runs import gpu_runs_dir

RUNS = gpu_runs_dir() / "megatron_bridge_training.yaml"


def test_refitting_h100_gives_the_shipped_value_and_lowers_the_error():
    shipped = hardware_preset("h100")
    start = shipped.__class__(**{**shipped.__dict__, PARAM: 1.0})
    fitted, fit = calibrate_training([RUNS], base=start)
    assert getattr(fitted, PARAM) == getattr(shipped, PARAM) == fit.after
    assert fit.mape_after < fit.mape_before
    assert {r.run for r in fit.rows} == {run.id for run, _, _ in training_runs([RUNS], "h100")}


def test_a_gpu_without_training_steps_cannot_be_fitted():
    with pytest.raises(InputError) as err:
        calibrate_training([RUNS], base=hardware_preset("h800"))
    assert err.value.field == "--base"
