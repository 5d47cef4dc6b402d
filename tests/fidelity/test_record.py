"""`moesim record`: everything but the CUDA timing runs on CPU; the GPU path is marked."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

import pytest
import typer
from typer.testing import CliRunner

from moesim.cli.record import NO_GPU, record
from moesim.errors import InputError
from moesim.fidelity import record as rec
from moesim.fidelity.runs import load_runs

app = typer.Typer()
app.command()(record)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_cuda(), reason="checks the message shown without a GPU")
def test_cli_without_gpu_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "run.yaml"
    result = CliRunner().invoke(app, ["--out", str(out)])
    assert result.exit_code == 2
    assert NO_GPU in result.output
    assert "Traceback" not in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_reports_bad_arguments_before_the_gpu(tmp_path):
    result = CliRunner().invoke(app, ["--out", str(tmp_path / "x.yaml"), "--models", "nope"])
    assert result.exit_code == 2
    assert "unknown model preset 'nope'" in result.output
    assert "deepseek-v3" in result.output  # the allowed names
    result = CliRunner().invoke(app, ["--out", str(tmp_path / "x.yaml"),
                                      "--tokens-per-expert", "64,abc"])
    assert result.exit_code == 2 and "--tokens-per-expert" in result.output
    assert list(tmp_path.iterdir()) == []


def test_deepseek_v3_shapes():
    shapes = rec.gemm_shapes(["deepseek-v3"], [128], groups=8)
    assert [(s.op, s.k, s.n, s.m_per_group, s.groups) for s in shapes] == [
        ("gate-up", 7168, 2 * 2048, 128, 8),
        ("down", 2048, 7168, 128, 8),
    ]
    assert shapes[0].flops == 2 * 8 * 128 * 4096 * 7168


def test_shape_and_list_errors_are_input_errors():
    with pytest.raises(InputError, match="--models"):
        rec.gemm_shapes(["no-such-model"], [64])
    with pytest.raises(InputError, match="--tokens-per-expert"):
        rec.parse_int_list("64,0", "--tokens-per-expert")
    assert rec.parse_int_list("64, 128,", "--x") == (64, 128)


def test_written_yaml_loads_and_round_trips(tmp_path):
    shapes = rec.gemm_shapes(["deepseek-v3", "deepseek-v2"], [64, 1024], groups=4)
    timed = [(s, rec.Timing(1e-4 * (i + 1), repeats=20, warmup=5, kernel="fake"))
             for i, s in enumerate(shapes)]
    when = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    prov = rec.provenance(["moesim", "record", "--out", "a b.yaml"], now=when,
                          notes=[rec.ALLTOALL_SKIPPED])
    prov = replace(prov, gpu="NVIDIA H100 80GB HBM3", driver="550.1", cuda="12.8",
                   torch="2.13.0")
    topology = rec.topology_for_gpu(prov.gpu)
    doc = rec.recorded_document(rec.gemm_runs(timed, topology=topology), prov)
    path = tmp_path / "run.yaml"
    path.write_text(rec.dump_document(doc, prov), encoding="utf-8")

    loaded = load_runs(path)
    assert len(loaded.runs) == len(shapes) == 8
    for run, (shape, timing) in zip(loaded.runs, timed, strict=True):
        assert run.id == shape.run_id
        assert run.topology == "dgx-h100-superpod" and run.gpus == 1
        assert (run.workload.kind, run.workload.dtype) == ("grouped-gemm", "bf16")
        assert (run.workload.groups, run.workload.m_per_group, run.workload.n,
                run.workload.k) == (shape.groups, shape.m_per_group, shape.n, shape.k)
        expected = shape.flops / timing.seconds / 1e12
        assert run.measured["tflops"].value == pytest.approx(expected, rel=1e-4)
        assert run.tolerance == rec.DEFAULT_TOLERANCE
    note = loaded.source.note
    for fact in ("NVIDIA H100", "550.1", "cuda: 12.8", "torch: 2.13.0",
                 "2025-01-02T03:04:05Z", "moesim record --out 'a b.yaml'",
                 rec.TOLERANCE_NOTE, "all-to-all not recorded"):
        assert fact in note
    assert path.read_text().startswith("# Recorded with `moesim record`")


def test_topology_for_gpu():
    assert rec.topology_for_gpu("NVIDIA H800") == "h800-node"
    assert rec.topology_for_gpu("NVIDIA GB200") == "gb200-nvl72"
    assert rec.topology_for_gpu("Some GPU") == rec.FALLBACK_TOPOLOGY


def test_layer_shape_fits_budget():
    hidden, inter = rec.layer_shape(7168, 2048, 256, budget_bytes=4e9)
    assert 3 * 256 * hidden * inter * 4 <= 4e9
    assert (hidden, inter) == (7168 // 4, 2048 // 4)
    assert rec.layer_shape(2048, 1408, 8, budget_bytes=1e12) == (2048, 1408)


def test_tokens_per_expert_ignores_dropped_slots():
    mean, peak = rec.tokens_per_expert([[0, 1], [1, -1]], num_experts=4)
    assert (mean, peak) == (0.75, 2)


@pytest.mark.gpu
def test_records_a_tiny_shape_on_gpu(tmp_path):
    shape = rec.GemmShape("tiny", "gate-up", groups=2, m_per_group=128, n=256, k=256)
    timing = rec.time_grouped_gemm(shape, repeats=3, warmup=1)
    assert timing.seconds > 0
    prov = rec.device_provenance(rec.provenance(["moesim", "record"]))
    assert prov.gpu and prov.cuda
    doc = rec.recorded_document(
        rec.gemm_runs([(shape, timing)], topology=rec.topology_for_gpu(prov.gpu)), prov)
    path = tmp_path / "gpu.yaml"
    path.write_text(rec.dump_document(doc, prov), encoding="utf-8")
    assert load_runs(path).runs[0].measured["tflops"].value > 0
    layer = rec.time_moe_layer("deepseek-v2-lite", tokens=256, repeats=2, warmup=1,
                               memory_fraction=0.01)
    assert layer.seconds > 0 and layer.tokens == 256


def test_cli_writes_a_loadable_file_with_fake_timings(tmp_path, monkeypatch):
    # Everything but the CUDA calls: the CLI's own wiring from arguments to the file.
    monkeypatch.setattr(rec, "cuda_available", lambda: True)
    monkeypatch.setattr(rec, "device_provenance",
                        lambda prov: replace(prov, gpu="NVIDIA H800", driver="1", cuda="12",
                                             torch="2"))
    monkeypatch.setattr(rec, "time_grouped_gemm",
                        lambda shape, **_: rec.Timing(2e-4, 3, 1, "fake"))
    layer = rec.LayerTiming("deepseek-v3", 1792, 512, 256, 8, 1, 4096, 1e-3, "gate", 128.0, 170)
    monkeypatch.setattr(rec, "time_moe_layer", lambda *a, **k: layer)
    out = tmp_path / "run.yaml"
    result = CliRunner().invoke(app, ["--out", str(out), "--models", "deepseek-v3",
                                      "--tokens-per-expert", "64,128", "--repeats", "3"])
    assert result.exit_code == 0, result.output
    loaded = load_runs(out)
    assert [r.topology for r in loaded.runs] == ["h800-node"] * 4
    assert "moe-layer deepseek-v3" in loaded.source.note
