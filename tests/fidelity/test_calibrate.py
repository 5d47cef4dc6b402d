"""GEMM efficiency curves and `moesim calibrate`."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import yaml

from moesim.config.loading import hardware_preset, load_scenario
from moesim.cost import compute
from moesim.errors import InputError
from moesim.fidelity.calibrate import calibrate, gemm_cases, hardware_yaml
from moesim.fidelity.regress import recorded_files
from moesim.fidelity.runs import gpu_runs_dir

H800 = hardware_preset("h800")
SHAPES = [(1, 64, 7168, 2048), (1, 128, 24576, 1536), (1, 4096, 4096, 7168),
          (4, 256, 4096, 7168), (2, 512, 7168, 2048), (8, 4096, 7168, 2048),
          (1, 64, 2112, 7168), (1, 4096, 32768, 512), (4, 32, 4096, 7168)]


def test_curve_reduces_to_constant_model_when_halves_are_zero():
    curved = dataclasses.replace(H800, gemm_m_half=0.0, memory_bytes_half=0.0)
    for g, m, n, k in SHAPES:
        flops = 2.0 * g * m * n * k
        nbytes = g * (m * k + k * n + m * n * 2)
        const = max(flops / (H800.peak_flops("fp8") * H800.gemm_efficiency),
                    nbytes / (H800.hbm_GBps * 1e9 * H800.memory_efficiency))
        got = compute.gemm_seconds(curved, groups=g, m=m, n=n, k=k, dtype="fp8")
        assert got == pytest.approx(const, rel=1e-12)
    assert compute.compute_efficiency(curved, 64) == H800.gemm_efficiency


def test_efficiency_rises_with_rows_and_bytes():
    hw = dataclasses.replace(H800, gemm_m_half=128.0, memory_bytes_half=4e6)
    eff = compute.compute_efficiency(hw, [16, 64, 256, 4096])
    assert np.all(np.diff(eff) > 0) and eff[-1] < hw.gemm_efficiency
    assert eff[2] == pytest.approx(hw.gemm_efficiency * 256 / 384)
    assert np.all(np.diff(compute.memory_efficiency(hw, [1e6, 1e7, 1e8])) > 0)
    small = compute.gemm_seconds(hw, groups=1, m=128, n=7168, k=7168, dtype="fp8")
    assert small > compute.gemm_seconds(H800, groups=1, m=128, n=7168, k=7168, dtype="fp8")


def test_grouped_experts_pay_the_curve_per_expert():
    from moesim.config.loading import model_preset

    m = model_preset("deepseek-v3")
    hw = dataclasses.replace(H800, gemm_m_half=256.0, grouped_gemm_align=1)
    balanced = np.array([[256, 256, 256, 256]])
    skewed = np.array([[1021, 1, 1, 1]])
    t_bal, t_skew = (compute.grouped_expert_seconds(m, hw, t)[0] for t in (balanced, skewed))
    assert t_bal == pytest.approx(t_skew)  # same rows, same non-empty experts
    fewer = compute.grouped_expert_seconds(m, hw, np.array([[1024, 0, 0, 0]]))[0]
    assert fewer < t_bal  # each non-empty expert costs gemm_m_half rows
    assert compute.grouped_expert_seconds(m, hw, np.zeros((1, 4), int))[0] == 0.0


def _synthetic_runs(tmp_path, hw):
    runs = []
    for i, (g, m, n, k) in enumerate(SHAPES):
        s = compute.gemm_seconds(hw, groups=g, m=m, n=n, k=k, dtype="fp8", align=1)
        runs.append({"id": f"syn-{i}", "topology": "h800-node", "gpus": 1,
                     "workload": {"kind": "dense-gemm", "m": m * g, "n": n, "k": k}
                     if g == 1 else {"kind": "grouped-gemm", "groups": g, "m_per_group": m,
                                     "n": n, "k": k, "layout": "masked"},
                     "measured": {"tflops": {"value": 2.0 * g * m * n * k / s / 1e12}},
                     "tolerance": 0.1})
    path = tmp_path / "syn.yaml"
    path.write_text(yaml.safe_dump({"schema": "moesim.recorded-run/1",
                                    "source": {"repo": "x", "path": "y"}, "runs": runs}))
    return path


def test_calibrate_recovers_known_parameters(tmp_path):
    truth = dataclasses.replace(H800, gemm_efficiency=0.72, gemm_m_half=96.0,
                                memory_efficiency=0.75, memory_bytes_half=3e6,
                                grouped_gemm_align=1)
    base = dataclasses.replace(H800, grouped_gemm_align=1)
    fitted, report = calibrate([_synthetic_runs(tmp_path, truth)], base=base)
    assert fitted.gemm_efficiency == pytest.approx(0.72, rel=0.02)
    assert fitted.gemm_m_half == pytest.approx(96.0, rel=0.1)
    assert fitted.memory_efficiency == pytest.approx(0.75, rel=0.02)
    assert fitted.memory_bytes_half == pytest.approx(3e6, rel=0.15)
    assert report.mape_after < 0.01 < report.mape_before
    assert fitted.hbm_GBps == base.hbm_GBps and fitted.name == base.name


def test_calibrating_on_shipped_data_lowers_gemm_mape():
    files = recorded_files([gpu_runs_dir()], include_known_gaps=True)
    fitted, report = calibrate(files, base=H800)
    assert report.skipped > 0  # DeepEP / NCCL runs are not used
    assert len(report.rows) == len(gemm_cases(files, base=H800)[0]) >= 20
    assert report.mape_after < report.mape_before
    assert report.before["gemm_m_half"] == 0.0 and fitted.gemm_m_half > 0


def _scenario(hardware):
    from importlib import resources

    text = resources.files("moesim.config.presets").joinpath("default-scenario.yaml")
    data = yaml.safe_load(text.read_text())
    return {**data, "hardware": str(hardware)}


def test_scenario_hardware_may_be_a_yaml_file(tmp_path):
    hw = dataclasses.replace(H800, gemm_m_half=64.0, gemm_efficiency=0.7)
    path = tmp_path / "hw.yaml"
    path.write_text(hardware_yaml(hw))
    scenario = tmp_path / "s.yaml"
    scenario.write_text(yaml.safe_dump(_scenario(path)))
    loaded = load_scenario(scenario)
    assert loaded.hardware.gemm_m_half == 64.0 and loaded.hardware.gemm_efficiency == 0.7


@pytest.mark.parametrize("text", ["gemm_efficiency: [1", "- a list", "name: x\nbogus: 1\n"])
def test_bad_hardware_file_names_the_file(tmp_path, text):
    path = tmp_path / "bad-hw.yaml"
    path.write_text(text)
    scenario = tmp_path / "s.yaml"
    scenario.write_text(yaml.safe_dump(_scenario(path)))
    with pytest.raises(InputError) as err:
        load_scenario(scenario)
    assert "bad-hw.yaml" in str(err.value)


def test_missing_hardware_file_names_it(tmp_path):
    scenario = tmp_path / "s.yaml"
    scenario.write_text(yaml.safe_dump(_scenario(tmp_path / "nope.yaml")))
    with pytest.raises(InputError, match="nope.yaml"):
        load_scenario(scenario)


def test_cli_writes_fitted_yaml(tmp_path):
    import typer
    from typer.testing import CliRunner

    from moesim.cli.calibrate import calibrate as cmd

    app = typer.Typer()
    app.command()(cmd)
    app.command("x")(lambda: None)
    out = tmp_path / "runs" / "fit.yaml"
    result = CliRunner().invoke(app, ["calibrate", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "MAPE" in result.output
    assert yaml.safe_load(out.read_text())["gemm_m_half"] > 0
    bad = CliRunner().invoke(app, ["calibrate", str(tmp_path / "none.yaml"), "--out", str(out)])
    assert bad.exit_code == 2
