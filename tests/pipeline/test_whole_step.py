"""The whole training step: a micro-batch through the op engine, the pipeline, DP and the
optimizer, told as small stories on a 9-layer DeepSeek-V3-shaped model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from moesim import load_scenario, simulate
from moesim.config.training_layout import chunk_layers, training_layout
from moesim.errors import InputError
from moesim.pipeline.data_parallel import stage_params, step_tail
from moesim.pipeline.layer_times import layer_times
from moesim.pipeline.whole_step import micro_batch_scenario, whole_step
from moesim.topologies import load_topology

SMALL = ["model.num_layers=9", "parallel.ep=32", "parallel.tokens_per_gpu=null",
         "parallel.micro_batches=1", "training.seq_len=4096", "training.micro_batch=1",
         "engine=fast"]


def scenario(*extra: str):
    return load_scenario(overrides=[*SMALL, *extra])


def step_of(s):
    """The WholeStep of ``s`` and the micro-batch run it was built from."""
    inner = micro_batch_scenario(s, training_layout(s))
    micro = simulate(inner)
    topology = load_topology(s.topology, gpus=s.parallel.total_gpus)
    return whole_step(s, topology, micro.spans), micro


def test_a_pipeline_of_four_stages_runs_every_micro_batch_through_every_layer():
    s = scenario("parallel.gpus=128", "parallel.pp=4", "training.global_batch=256")
    layout = training_layout(s)
    assert (layout.dp, layout.micro_batches, layout.stage_gpus) == (32, 8, 32)
    result = simulate(s)
    summary = result.summary
    assert summary["tokens_per_step"] == 256 * 4096
    assert summary["tokens_per_s_per_gpu"] == pytest.approx(
        256 * 4096 / summary["step_time_s"] / 128)
    # Every stage runs F and a backward of every micro-batch once.
    items = result.pipeline
    assert len(items) == 4 * 8 * 2
    assert (items.groupby("stage").size() == 16).all()
    # The step is the pipeline plus what DP and the optimizer leave exposed.
    assert summary["step_time_s"] >= summary["pipeline_time_s"] + summary["optimizer_time_s"]
    # One micro-batch's assignments, scaled to the step: every token reaches top-k
    # experts in each of the 6 MoE layers.
    assert summary["tokens_dispatched"] == 256 * 4096 * 8 * 6


def test_the_chunks_of_a_stage_add_up_to_the_micro_batch():
    s = scenario("parallel.gpus=128", "parallel.pp=4", "training.global_batch=256")
    step, micro = step_of(s)
    times = layer_times(micro.spans, s.model.num_layers)
    # The forward of every chunk together is the micro-batch's forward through the model,
    # plus the kernels between the GEMMs that the op program does not hold.
    total = times.forward_s.sum() + step.parts.elementwise_fwd_s.sum()
    assert step.costs.forward_s.sum() == pytest.approx(total)
    assert times.forward_s.sum() == pytest.approx(
        micro.spans.loc[~micro.spans["backward"], "end_s"].max())
    # Nine layers and the LM head as a tenth: 3 + 3 + 2 + 2 slots.
    assert [list(c[0]) for c in chunk_layers(training_layout(s), s.model)] == [
        [0, 1, 2], [3, 4, 5], [6, 7], [8]]


def test_full_recomputation_adds_one_forward_of_every_layer_but_the_head_to_the_backward():
    plain, _ = step_of(scenario("parallel.gpus=64", "parallel.pp=2",
                                "training.global_batch=128"))
    full, _ = step_of(scenario("parallel.gpus=64", "parallel.pp=2",
                               "training.global_batch=128", "training.recompute=full"))
    backward = plain.costs.backward_input_s + plain.costs.backward_weight_s
    again = full.costs.backward_input_s + full.costs.backward_weight_s
    # The LM head's logits are not recomputed: the last stage's forward less the head.
    forward = plain.costs.forward_s.copy()
    forward[-1, 0] -= plain.times.forward_s[-1]
    np.testing.assert_allclose(again - backward, forward, rtol=1e-9)
    selective, _ = step_of(scenario("parallel.gpus=64", "parallel.pp=2",
                                    "training.global_batch=128",
                                    "training.recompute=selective"))
    middle = selective.costs.backward_input_s + selective.costs.backward_weight_s
    assert (backward < middle).all() and (middle < again).all()


def test_doubling_data_parallelism_doubles_the_gradient_bytes_of_a_step():
    small = scenario("parallel.gpus=64", "parallel.pp=2", "training.global_batch=64")
    large = scenario("parallel.gpus=128", "parallel.pp=2", "training.global_batch=128")
    per_gpu = []
    for s in (small, large):
        layout = training_layout(s)
        topology = load_topology(s.topology, gpus=s.parallel.total_gpus)
        tail = step_tail(s, topology, layout)
        per_gpu.append(tail.grad_bytes)
        assert [training_layout(s).dp for s in (small, large)] == [32, 64]
    np.testing.assert_allclose(per_gpu[0], per_gpu[1])  # the same stage on every GPU
    assert 128 * per_gpu[1].mean() == pytest.approx(2 * 64 * per_gpu[0].mean())


def test_the_end_stages_hold_the_embedding_and_the_head():
    s = scenario("parallel.gpus=128", "parallel.pp=4", "training.global_batch=256")
    params = stage_params(s, training_layout(s))
    h, vocab = s.model.hidden_size, s.model.vocab_size
    # Stages hold layers [0, 1, 2] (dense), [3, 4, 5], [6, 7] and [8] with the head.
    moe_layer = params[2].dense / 2
    assert params[0].dense > vocab * h and params[0].routed == 0
    assert params[1].dense == pytest.approx(3 * moe_layer)
    assert params[3].dense == pytest.approx(moe_layer + vocab * h + h)
    assert params[3].routed == params[2].routed / 2 == params[1].routed / 3 > 0


def test_no_stage_is_left_without_a_layer():
    # Nine layers, the head and an MTP module in 9 chunks: the extra slots give way.
    s = scenario("parallel.gpus=288", "parallel.pp=9", "training.global_batch=288",
                 "model.mtp_layers=1")
    chunks = chunk_layers(training_layout(s), s.model)
    assert all(len(stage[0]) == 1 for stage in chunks)
    summary = simulate(dataclasses.replace(s, training=dataclasses.replace(
        s.training, recompute="full"))).summary
    assert summary["step_time_s"] > 0


def test_one_stage_runs_its_micro_batches_one_after_another():
    s = scenario("parallel.gpus=32", "training.global_batch=128")
    step, _ = step_of(s)
    m = training_layout(s).micro_batches
    assert m == 4
    one = step.costs.forward_s.sum() + (step.costs.backward_input_s
                                        + step.costs.backward_weight_s).sum()
    assert step.pipeline.step_s == pytest.approx(m * one)
    assert step.pipeline.bubble_fraction == pytest.approx(0.0, abs=1e-12)


def test_dualpipe_hides_the_all_to_all_behind_the_other_direction():
    base = ("parallel.gpus=128", "parallel.pp=4", "training.global_batch=256")
    one_f_one_b = simulate(scenario(*base)).summary
    dualpipe = simulate(scenario(*base, "training.schedule=dualpipe")).summary
    assert dualpipe["pipeline_time_s"] < one_f_one_b["pipeline_time_s"]
    # DualPipe keeps two stages' parameters on every GPU.
    assert (dualpipe["memory_breakdown_gib"]["routed_experts"]
            > one_f_one_b["memory_breakdown_gib"]["routed_experts"])


@pytest.mark.parametrize(("extra", "field"), [
    (("parallel.gpus=128", "parallel.pp=4", "training.global_batch=100"),
     "training.global_batch"),
    (("parallel.gpus=128", "parallel.pp=3", "training.global_batch=96"), "parallel.pp"),
    (("parallel.gpus=128", "parallel.pp=4", "training.global_batch=256",
      "training.schedule=interleaved"), "parallel.vp"),
    (("parallel.gpus=128", "parallel.pp=4", "parallel.vp=2", "training.global_batch=256"),
     "parallel.vp"),
    (("parallel.gpus=128", "parallel.pp=4", "training.global_batch=96",
      "training.schedule=dualpipe"), "training.global_batch"),
    (("parallel.gpus=512", "parallel.pp=16", "training.global_batch=512"), "parallel.pp"),
    (("parallel.gpus=128", "parallel.tp=3", "training.global_batch=256"), "parallel.tp"),
    (("parallel.gpus=128", "parallel.tp=2", "parallel.tokens_per_gpu=4096",
      "training.seq_len=null"), "parallel.tp"),
])
def test_layouts_that_cannot_run_name_their_field(extra, field):
    with pytest.raises(InputError) as err:
        scenario(*extra)
    assert err.value.field == field


def test_the_older_form_with_a_pipeline_takes_its_micro_batches():
    s = load_scenario(overrides=["model.num_layers=9", "parallel.ep=32", "parallel.gpus=64",
                                 "parallel.pp=2", "parallel.micro_batches=4", "engine=fast"])
    layout = training_layout(s)
    assert (layout.whole_step, layout.micro_batches, layout.tokens_per_microbatch) == (
        True, 4, 1024)
    # tokens_per_gpu is per data-parallel replica: 32 of them, two stages each.
    assert simulate(s).summary["tokens_per_step"] == 32 * 4096


def test_the_training_precision_sets_the_gemm_type():
    s = scenario("parallel.gpus=32", "training.global_batch=32", "training.precision=bf16")
    assert s.model.gemm_dtype == "fp8"  # the preset's
    assert micro_batch_scenario(s, training_layout(s)).model.gemm_dtype == "bf16"
    fp8 = simulate(dataclasses.replace(
        s, training=dataclasses.replace(s.training, precision="fp8-block"))).summary
    assert fp8["pipeline_time_s"] < simulate(s).summary["pipeline_time_s"]


@pytest.mark.parametrize("extra", [
    ("parallel.gpus=128", "parallel.pp=4", "training.global_batch=256"),
    ("parallel.gpus=128", "parallel.pp=4", "training.global_batch=256",
     "training.schedule=dualpipe"),
    ("parallel.gpus=64", "training.global_batch=128", "training.recompute=full"),
])
def test_the_planners_bound_never_exceeds_the_whole_step(extra):
    from moesim.planning.bounds import step_bound

    s = scenario(*extra)
    bound = step_bound(s)
    summary = simulate(s).summary
    assert bound.tokens == summary["tokens_per_step"]
    assert 0 < bound.step_s <= summary["step_time_s"]


def test_tensor_and_context_parallelism_split_the_tokens_and_add_their_collectives():
    from moesim.comm.collectives import collective_time
    from moesim.cost.sequence_parallel import layer_comm

    base = ("parallel.gpus=128", "parallel.pp=2", "training.global_batch=128",
            "training.micro_batch=2")
    plain, tp, cp = (scenario(*base, *extra) for extra in
                     ((), ("parallel.tp=2",), ("parallel.cp=2",)))
    for s in (tp, cp):
        layout = training_layout(s)
        assert layout.tokens_per_microbatch == training_layout(plain).tokens_per_microbatch // 2
        assert layout.dp == training_layout(plain).dp // 2
        assert layout.tokens_per_step == training_layout(plain).tokens_per_step
    topology = load_topology(tp.topology, gpus=128)
    m, hw = tp.model, tp.hardware
    comm = layer_comm(m, hw, topology, tokens=4096, tp=2, cp=1, attention_core_s=0.0)
    block = 4096 * 2 * m.hidden_size * 2  # the TP group's tokens, BF16
    one = sum(float(collective_time(hw, topology, op=op, size=block, n=2))
              for op in ("all_gather", "reduce_scatter"))
    assert comm.forward_s == pytest.approx(2 * one) == comm.backward_s
    # Context parallelism's key/value ring hides behind a long enough attention core.
    assert layer_comm(m, hw, topology, tokens=4096, tp=1, cp=2,
                      attention_core_s=1.0).forward_s == 0.0
    step, _ = step_of(tp)
    assert (step.parts.parallel_fwd_s[:9] == comm.forward_s).all()
    # Tensor parallelism splits the attention projections and the embedding, not the
    # experts.
    split, whole = stage_params(tp, training_layout(tp)), stage_params(
        plain, training_layout(plain))
    assert split[0].routed == whole[0].routed
    assert split[0].dense < whole[0].dense


def test_expert_tensor_parallelism_splits_the_experts_and_all_reduces_their_outputs():
    base = ("parallel.gpus=64", "parallel.ep=16", "routing.max_devices=2",
            "training.global_batch=128")
    plain, sharded = scenario(*base), scenario(*base, "parallel.moe_tp=2")
    assert training_layout(sharded).expert_dp == training_layout(plain).expert_dp // 2 == 2
    assert (stage_params(sharded, training_layout(sharded))[0].routed
            == stage_params(plain, training_layout(plain))[0].routed / 2)
    one, two = simulate(plain).summary, simulate(sharded).summary
    assert two["memory_breakdown_gib"]["routed_experts"] == pytest.approx(
        one["memory_breakdown_gib"]["routed_experts"] / 2)
    # The same expert FLOPs per GPU (twice the tokens at half the width) plus the
    # group's all-reduces.
    assert two["expert_compute_time_s"] > one["expert_compute_time_s"]
    assert two["tokens_dispatched"] == one["tokens_dispatched"]


def test_the_cli_writes_the_schedule_as_a_table_and_a_chrome_trace(tmp_path):
    import json

    import pandas as pd
    from typer.testing import CliRunner

    from moesim.cli.main import app

    out = tmp_path / "run"
    sets = [*SMALL, "parallel.gpus=128", "parallel.pp=4", "training.global_batch=256"]
    args = ["simulate", "--out", str(out), *[a for s in sets for a in ("--set", s)]]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "PP4 1f1b, EP32, DP32; 8 micro-batches" in " ".join(result.output.split())
    items = pd.read_parquet(out / "pipeline.parquet")
    assert len(items) == 4 * 8 * 2
    trace = json.loads((out / "pipeline_timeline.json").read_text())
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(slices) == len(items)
    assert {e["pid"] for e in slices} == {0, 1, 2, 3}
