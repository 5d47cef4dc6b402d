"""Fitted GPU specs, predictions and the committed regression subset of measured kernels."""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from moesim.cli.main import app
from moesim.comm.collectives import collective_time
from moesim.config.loading import hardware_preset
from moesim.cost import compute
from moesim.errors import InputError
from moesim.fidelity.perfdb.fit import fit_system, in_sample
from moesim.fidelity.perfdb.predict import SYSTEMS, balanced_loads, base_model, modeled, predict
from moesim.fidelity.perfdb.regress import regress_table
from moesim.fidelity.perfdb.table import (
    COLUMNS,
    DTYPES,
    read_table,
    table_to_parquet_bytes,
    validate_table,
)
from moesim.fidelity.runs import gpu_runs_dir
from moesim.routing.power_law import power_law_loads
from moesim.topologies import load_topology

SUBSET = gpu_runs_dir() / "perfdb_subset.parquet"
FITTED = Path(str(resources.files("moesim.config.presets").joinpath("gpus")))


@pytest.fixture(scope="module")
def subset():
    df, provenance = read_table(SUBSET)
    return df, provenance


# ------------------------------------------------------------------ the committed subset


def test_subset_is_small_and_covers_every_system_and_op(subset):
    df, provenance = subset
    assert SUBSET.stat().st_size < 5_000_000
    assert 1000 <= len(df) <= 10_000
    assert provenance["package"] == "aiconfigurator-core"
    ops = {"gemm", "moe", "attention_context", "attention_generation", "mla_context",
           "mla_generation", "nccl", "deepep_normal", "deepep_ll"}
    for system in SYSTEMS:
        assert set(df.loc[df["system"] == system, "op"]) == ops, system
    # Out-of-sample rows are there: multi-node DeepEP and power-law MoE.
    assert (df["nodes"] > 1).sum() > 20
    assert df["distribution"].str.startswith("power_law").sum() > 50
    # Small and large shapes of each op class.
    gemm_m = df.loc[df["op"] == "gemm", "m"]
    assert gemm_m.min() <= 8 and gemm_m.max() >= 8192


def test_subset_regresses_within_its_tolerances(subset):
    df, _ = subset
    report = regress_table(df, file=str(SUBSET))
    assert report.passed, report.failed.head()
    by = report.mape_by()
    assert set(by["sample"]) == {"in", "out"}
    # Fitted in-sample error stays far below the unfitted presets' (40-70%).
    in_rows = report.rows[report.rows["sample"] == "in"]
    assert in_rows["rel_error"].abs().mean() < 0.30


def test_regress_cli_fails_when_a_measurement_moves_beyond_tolerance(subset, tmp_path):
    df, provenance = subset
    row = df.index[df["op"] == "gemm"][0]
    simulated = regress_table(df.loc[[row]], file="one").rows["simulated_us"].iloc[0]
    moved = df.copy()
    # Measured 10 points beyond the tolerance: simulated / measured - 1 = tolerance + 0.1.
    moved.loc[row, "latency_us"] = simulated / (1.0 + df.loc[row, "tolerance"] + 0.1)
    path = tmp_path / "moved.parquet"
    path.write_bytes(table_to_parquet_bytes(moved, provenance))
    result = CliRunner().invoke(app, ["regress", str(path)])
    assert result.exit_code == 1, result.output
    assert df.loc[row, "id"] in result.output
    same = tmp_path / "same.parquet"
    same.write_bytes(table_to_parquet_bytes(df, provenance))
    assert CliRunner().invoke(app, ["regress", str(same)]).exit_code == 0


def test_a_table_without_tolerances_cannot_be_regressed(subset):
    df, _ = subset
    with pytest.raises(InputError, match="tolerance"):
        regress_table(df.assign(tolerance=np.nan), file="x.parquet")


# ------------------------------------------------------------------ fitted presets


@pytest.mark.parametrize("system", list(SYSTEMS))
def test_fitted_spec_and_its_topologies_agree(system):
    gpu, node, cluster = SYSTEMS[system]
    doc = yaml.safe_load((FITTED / f"{gpu}.yaml").read_text())
    assert doc["schema"] == "moesim.fitted-system/1" and doc["system"] == system
    for name in {node, cluster}:
        topo = load_topology(name, gpus=16 if name != node else None)
        assert topo.gpu == gpu
        assert topo.nvlink_bw / topo.nvlink_bw_nominal == pytest.approx(
            doc["nvlink_efficiency"], abs=5e-3), name


def _table(rows: int, /, **columns) -> pd.DataFrame:
    """A valid recorded-run table of ``rows`` rows: the given columns, the rest empty."""
    data = {}
    for name in COLUMNS:
        kind = DTYPES[name]
        default = "" if kind == "str" else (pd.NA if kind == "Int64" else np.nan)
        value = columns.get(name, default)
        data[name] = pd.array(value if isinstance(value, (list, np.ndarray)) else [value] * rows,
                              dtype=kind)
    data["id"] = pd.array([f"r{i}" for i in range(rows)], dtype="str")
    if "latency_us" not in columns:
        data["latency_us"] = pd.array([1.0] * rows, dtype="float64")
    return validate_table(pd.DataFrame(data), source="test")


def test_fit_keeps_out_of_sample_rows_out():
    df = _table(
        5, system="h100_sxm", kernel="k",
        op=["moe", "moe", "deepep_normal", "deepep_normal", "attention_generation"],
        phase=["", "", "dispatch", "dispatch", ""],
        distribution=["balanced", "power_law_1.2", "", "", ""],
        nodes=[pd.NA, pd.NA, 1, 2, pd.NA], dtype=["fp8_block", "fp8_block", "", "", "bfloat16"],
        kv_dtype=["", "", "", "", "bfloat16"], moe_ep=[1, 1, pd.NA, pd.NA, pd.NA],
        moe_tp=[1, 1, pd.NA, pd.NA, pd.NA], tokens=[16, 16, 16, 16, pd.NA],
        experts=[256, 256, 256, 256, pd.NA], topk=[8, 8, 8, 8, pd.NA])
    assert in_sample(df).tolist() == [True, False, True, False, True]


def test_fit_recovers_the_gemm_parameters_that_made_the_data():
    """A table predicted with known efficiencies is fitted back to them."""
    truth = base_model("h100_sxm")
    hw = dataclasses.replace(truth.hardware, gemm_efficiency=0.7, fp8_gemm_efficiency=0.55,
                             gemm_m_half=300.0, memory_efficiency=0.75,
                             memory_bytes_half=0.0, kernel_overhead_us=6.0)
    truth = dataclasses.replace(truth, hardware=hw)
    rng = np.random.default_rng(0)
    n = 120
    df = _table(n, system="h100_sxm", op="gemm", kernel="k",
                m=list(2 ** rng.integers(0, 15, n)), n=list(2 ** rng.integers(8, 15, n)),
                k=list(2 ** rng.integers(8, 15, n)),
                dtype=list(rng.choice(["bfloat16", "fp8_block"], n)))
    df["latency_us"] = predict(df, {"h100_sxm": truth})
    fitted, results = fit_system(df, base_model("h100_sxm"))
    assert [r.stage for r in results] == ["gemm"]
    assert results[0].mape_after < 0.01
    got = fitted.hardware
    assert got.gemm_efficiency == pytest.approx(0.7, rel=0.03)
    assert got.fp8_gemm_efficiency == pytest.approx(0.55, rel=0.03)
    assert got.kernel_overhead_us == pytest.approx(6.0, rel=0.05)


# ------------------------------------------------------------------ model pieces


def test_power_law_loads_are_whole_capped_and_skewed():
    rng = np.random.default_rng(0)
    loads = power_law_loads(256, 4096, 8, 1.2, rng)
    assert loads.sum() == 4096 * 8 and loads.max() <= 4096 and loads.min() >= 0
    mild = power_law_loads(256, 4096, 8, 0.5, np.random.default_rng(0))
    assert loads.max() / loads.mean() > mild.max() / mild.mean()
    few = power_law_loads(256, 4, 8, 1.2, np.random.default_rng(1))
    assert few.sum() == 32 and few.max() <= 4


def test_balanced_loads_spread_the_remainder():
    loads = balanced_loads(256, 10, 8)
    assert loads.sum() == 80 and set(loads) == {0, 1} and loads[:64].sum() == 20
    assert list(balanced_loads(8, 4, 2)) == [1] * 8


def test_allreduce_time_by_hand():
    hw = dataclasses.replace(hardware_preset("h100"), nccl_latency_us=10.0, nccl_gpus_half=0.0)
    topo = load_topology("dgx-h100")
    size = 64e6
    expected = 10e-6 + 2 * 7 / 8 * size / topo.nvlink_bw
    assert collective_time(hw, topo, op="all_reduce", size=size, n=8) == pytest.approx(expected)
    assert collective_time(hw, topo, op="all_gather", size=size, n=8) == pytest.approx(
        10e-6 + 7 / 8 * size / topo.nvlink_bw)
    assert collective_time(hw, topo, op="all_reduce", size=size, n=1) == 0.0
    # Fewer GPUs reach less of the link: n / (n + nccl_gpus_half) of it.
    curved = dataclasses.replace(hw, nccl_gpus_half=2.0)
    assert collective_time(curved, topo, op="all_gather", size=size, n=2) == pytest.approx(
        10e-6 + 1 / 2 * size / (topo.nvlink_bw * 2 / 4))


def test_decode_attention_reads_the_kv_cache_once():
    hw = dataclasses.replace(hardware_preset("h100"), memory_bytes_half=0.0,
                             kernel_overhead_us=0.0, decode_overhead_us=0.0,
                             decode_query_head_ns=0.0)
    # 64 requests x 4096 cached tokens x 8 KV heads x 128 x (K and V) x 2 bytes.
    kv = 64 * 4096 * 8 * 128 * 2 * 2
    t = compute.attention_decode_time(hw, batch=64, context=4096, heads=64, score_dim=128,
                                      value_dim=128, kv_bytes_per_token=8 * 128 * 2 * 2)
    queries = 64 * 64 * 256 * 2
    assert t == pytest.approx((kv + queries) / (hw.hbm_GBps * 1e9 * hw.memory_efficiency))
    # Each (request, head) pair adds its fixed cost: 64 x 64 x 10 ns.
    slow = dataclasses.replace(hw, decode_query_head_ns=10.0)
    t2 = compute.attention_decode_time(slow, batch=64, context=4096, heads=64, score_dim=128,
                                       value_dim=128, kv_bytes_per_token=8 * 128 * 2 * 2)
    assert t2 - t == pytest.approx(64 * 64 * 10e-9)


def test_fit_finds_the_sm_count_that_saturates_deepep():
    """DeepEP's SM count is searched on whole SMs: a table made with 20 is fitted back."""
    truth = base_model("h100_sxm")
    truth = dataclasses.replace(truth, hardware=dataclasses.replace(
        truth.hardware, deepep_sms_full=20.0, deepep_overhead_us=30.0))
    shapes = [(tokens, sms, phase) for tokens in (64, 512, 4096)
              for sms in (4, 8, 12, 16, 20, 24) for phase in ("dispatch", "combine")]
    df = _table(len(shapes), system="h100_sxm", op="deepep_normal", kernel="deepep",
                phase=[p for _, _, p in shapes], tokens=[t for t, _, _ in shapes],
                sms=[s for _, s, _ in shapes], nodes=1, hidden=7168, experts=256, topk=8)
    df["latency_us"] = predict(df, {"h100_sxm": truth})
    start = dataclasses.replace(base_model("h100_sxm"), hardware=dataclasses.replace(
        truth.hardware, deepep_sms_full=8.0, deepep_overhead_us=5.0))
    fitted, results = fit_system(df, start)
    assert [r.stage for r in results] == ["deepep"]
    assert fitted.hardware.deepep_sms_full == 20
    assert fitted.hardware.deepep_overhead_us == pytest.approx(30.0, rel=0.02)


def test_moe_shapes_moesim_cannot_place_are_not_predicted():
    df = _table(3, system="h100_sxm", op="moe", kernel="k", dtype="fp8_block",
                distribution="balanced", tokens=16, hidden=7168, inter=2048, topk=8,
                experts=[256, 60, 256], moe_ep=[8, 8, 8], moe_tp=[1, 1, 0])
    why = modeled(df).tolist()
    assert why[0] == "" and "moe_ep" in why[1] and "moe_tp" in why[2]


def test_fitting_a_table_without_in_sample_rows_is_refused():
    df = _table(2, system="h100_sxm", op="moe", kernel="k", dtype="fp8_block",
                distribution="power_law_1.2", tokens=64, hidden=7168, inter=2048, topk=8,
                experts=256, moe_ep=8, moe_tp=1)
    with pytest.raises(InputError, match="no rows"):
        fit_system(df, base_model("h100_sxm"))


def test_the_simulators_power_law_routing_loads_the_busiest_rank_like_the_load_model():
    """``routing.assignment: power-law`` samples tokens from the same load model the
    perfdb predictions use: the busiest of 8 GPUs carries about what the model gives it."""
    import moesim

    scenario = moesim.load_scenario(None, overrides=[
        "mode=inference", "model=deepseek-v3", "topology=h800-node", "parallel.ep=8",
        "parallel.gpus=8", "parallel.tokens_per_gpu=512", "parallel.micro_batches=1",
        "routing.assignment=power-law", "routing.power_law_alpha=1.2",
        "routing.max_devices=null", "routing.layer_samples=null"])
    simulated = moesim.simulate(scenario).summary["max_over_mean_gpu_load"]
    rng = np.random.default_rng(0)
    ranks = [power_law_loads(256, 4096, 8, 1.2, rng).reshape(8, -1).sum(axis=1)
             for _ in range(200)]
    model = float(np.mean([r.max() / r.mean() for r in ranks]))
    assert model > 1.5
    assert simulated == pytest.approx(model, rel=0.12)
    uniform = moesim.simulate(moesim.load_scenario(None, overrides=[
        "mode=inference", "model=deepseek-v3", "topology=h800-node", "parallel.ep=8",
        "parallel.gpus=8", "parallel.tokens_per_gpu=512", "parallel.micro_batches=1",
        "routing.max_devices=null"])).summary["max_over_mean_gpu_load"]
    assert uniform < 1.1
