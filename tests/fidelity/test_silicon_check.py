"""bench/silicon_check.py and moesim.fidelity.silicon: the end-to-end check against
aiconfigurator-core's measured serving runs, on a 3-row CSV with the real header (no
package needed)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from moesim.fidelity import silicon

REPO = Path(__file__).resolve().parents[2]

# The header of aiconfigurator-core 0.12.0's systems/silicon_sample.csv.
HEADER = (
    "id,silicon_data_source,backend,backend_version,model_path,system,precision,mode,isl,osl,"
    "gemm_quant_mode,moe_quant_mode,batch_size,tp_size,pp_size,attention_dp_size,moe_tp_size,"
    "moe_ep_size,prefill_batch_size,prefill_num_workers,prefill_tp_size,prefill_pp_size,"
    "prefill_attention_dp_size,prefill_moe_tp_size,prefill_moe_ep_size,decode_batch_size,"
    "decode_num_workers,decode_tp_size,decode_pp_size,decode_attention_dp_size,"
    "decode_moe_tp_size,decode_moe_ep_size,silicon_ttft_ms,silicon_tpot_ms"
)
ROWS = [
    # DeepSeek-V3 FP8 disagg on H200: decode worker TP8 x DP1, MoE EP8, 4 requests per rank.
    "dsr1_h200_trtllm_fp8_disagg_1024x1024_c36_cfg303,db-dump/2026-04-27; config_id=303; "
    "silicon_concurrency=36,trtllm,0.8.1.post1,deepseek-ai/DeepSeek-V3,h200_sxm,fp8,disagg,"
    "1024,1024,fp8,fp8,,,,,,,1,1,8,1,1,1,8,4,9,8,1,1,1,8,673.2395802514576,13.39021889249814",
    # DeepSeek-R1 FP4: not modelled, skipped with the reason.
    "2026_03_25_deepseek_r1_b200_sxm_sglang_fp4_disagg_1024x1024_c512_tp4_0_ep4_0_783,"
    "source_file=2026-03-25.csv; silicon_concurrency=512,sglang,0.5.8.post1,"
    "deepseek-ai/DeepSeek-R1,b200_sxm,fp4,disagg,1024,1024,nvfp4,nvfp4,,,,,,,,,4,1,1,1,4,,,8,"
    "1,1,2,4,1267.241996218968,12.291863604603272",
    # Another model: ignored.
    "qwen3_32b_qwen3_32b_gb200_trtllm_agg_4000x1000_c_tp1_epnone_1,measured=2026-01-25,trtllm,"
    "1.2.0rc6.post1,Qwen/Qwen3-32B,gb200,fp4,agg,4000,1000,nvfp4,nvfp4,144,1,1,,1,0,,,,,,,,,,,"
    ",,,,17542.628978365312,47.96115344137303",
]


@pytest.fixture(scope="module")
def silicon_check():
    spec = importlib.util.spec_from_file_location(
        "silicon_check", REPO / "bench" / "silicon_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["silicon_check"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("silicon_check", None)


def test_header_matches_the_row_width():
    width = len(HEADER.split(","))
    assert all(len(row.split(",")) == width for row in ROWS)


def test_simulates_the_deepseek_fp8_row_and_skips_the_rest(silicon_check, tmp_path, capsys):
    path = tmp_path / "silicon_sample.csv"
    path.write_text("\n".join([HEADER, *ROWS]) + "\n", encoding="utf-8")

    assert silicon_check.main(["--csv", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)

    (row,) = out["rows"]
    assert row["id"] == "dsr1_h200_trtllm_fp8_disagg_1024x1024_c36_cfg303"
    assert (row["system"], row["backend"], row["mode"]) == ("h200_sxm", "trtllm", "disagg")
    assert row["decode"] == {"tp": 8, "dp": 1, "ep": 8, "moe_tp": 1}  # 8 GPUs
    assert row["batch"] == 4
    assert row["tpot_ms"] == pytest.approx(13.39021889249814)
    assert row["sim_tpot_ms"] > 0
    assert row["error"] == pytest.approx((row["sim_tpot_ms"] - row["tpot_ms"]) / row["tpot_ms"])
    assert row["sim_ttft_ms"] > 0  # the prefill step of one prefill worker, reported beside

    summary = out["summary"]
    assert summary["simulated"] == 1
    assert summary["ignored_other_models"] == 1
    assert summary["tpot_mape_overall_pct"] == pytest.approx(100 * abs(row["error"]))
    assert [(g["system"], g["backend"], g["mode"], g["rows"]) for g in summary["tpot_mape"]] \
        == [("h200_sxm", "trtllm", "disagg", 1)]
    (skip,) = out["skipped"]
    assert skip["id"].startswith("2026_03_25_deepseek_r1_b200_sxm_sglang_fp4")
    assert "precision fp4" in skip["reason"] and "not modelled" in skip["reason"]


def test_text_report_names_the_row_and_the_mape(silicon_check, tmp_path, capsys):
    path = tmp_path / "silicon_sample.csv"
    path.write_text("\n".join([HEADER, *ROWS]) + "\n", encoding="utf-8")
    assert silicon_check.main(["--csv", str(path)]) == 0
    text = capsys.readouterr().out
    assert "dsr1_h200_trtllm_fp8_disagg_1024x1024_c36_cfg303" in text
    assert "TPOT MAPE" in text and "overall" in text
    assert "precision fp4: not modelled" in text


def test_layout_reading():
    """tp_size is the attention TP of one DP rank: GPUs = tp x attention_dp."""
    row = dict(zip(HEADER.split(","), ROWS[0].split(","), strict=True))
    row.update(decode_tp_size="1.0", decode_attention_dp_size="32.0",
               decode_moe_ep_size="32.0", decode_batch_size="64.0")
    case, why = silicon.case_from_row(row)
    assert why is None
    assert (case.decode.gpus, case.decode.tp, case.decode.ep, case.batch) == (32, 1, 32, 64)
    row.update(decode_batch_size="", decode_num_workers="")
    case, why = silicon.case_from_row(row)
    assert case is None and "batch per rank unknown" in why


def test_missing_csv_exits_2(silicon_check, tmp_path, capsys):
    missing = tmp_path / "nope.csv"
    assert silicon_check.main(["--csv", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "no such file" in err and "--csv" in err


def test_without_the_package_exits_2_with_the_install_hint(silicon_check, monkeypatch, capsys):
    import moesim.fidelity.perfdb.importer as importer
    from moesim.errors import InputError

    def absent():
        raise InputError("aiconfigurator-core is not installed", field="--root",
                         allowed=importer.INSTALL_HINT)

    monkeypatch.setattr(importer, "find_data_root", absent)
    assert silicon_check.main([]) == 2
    err = capsys.readouterr().err
    assert "aiconfigurator-core is not installed" in err and "pip install" in err
