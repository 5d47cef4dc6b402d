"""What a scenario may ask for: finite numbers, numbers that are numbers, sizes one
simulation can hold (README: Limits). Each refusal is one InputError naming the field."""

from __future__ import annotations

import pytest

from moesim.config.feasibility import MAX_ASSIGNMENTS, MAX_BATCH_PAIRS, MAX_OP_ROWS
from moesim.config.loading import load_scenario
from moesim.errors import InputError

SMALL = ["model.num_layers=4", "parallel.tokens_per_gpu=64"]


def refusal(*overrides: str) -> InputError:
    with pytest.raises(InputError) as err:
        load_scenario(None, overrides=[*SMALL, *overrides])
    return err.value


@pytest.mark.parametrize("text", [
    "routing.capacity_factor=.inf", "hardware.bf16_tflops=.inf", "routing.zipf_exponent=.nan",
    "hardware.hbm_GB=-.inf",
])
def test_infinite_and_nan_numbers_are_refused(text):
    err = refusal(text)
    assert err.field == text.split("=")[0] and "finite" in err.problem


@pytest.mark.parametrize("text", ["seed=true", "parallel.ep=true", "routing.capacity_factor=false",
                                  "hardware.sms=true"])
def test_true_or_false_is_not_a_number(text):
    err = refusal(text)
    assert err.field == text.split("=")[0] and "not true/false" in err.problem


@pytest.mark.parametrize(("text", "field"), [
    ("parallel.tokens_per_gpu=2147483648", "parallel.tokens_per_gpu"),
    ("model.routed_experts=1099511627776", "model.routed_experts"),
    ("model.num_layers=1000000000", "model.num_layers"),
    ("parallel.gpus=1000000000000", "parallel.gpus"),
    ("routing.capacity_factor=1.0e300", "routing.capacity_factor"),
    ("routing.zipf_exponent=1000", "routing.zipf_exponent"),
    ("hardware.bf16_tflops=1.0e-300", "hardware.bf16_tflops"),
])
def test_absurd_sizes_are_refused_before_anything_is_allocated(text, field):
    assert refusal(text).field == field


def test_a_step_too_large_for_one_simulation_names_its_size():
    # Every field in range, the product not: 2048 GPUs x 1M tokens x top-8.
    err = refusal("parallel.gpus=2048", "parallel.ep=256", "parallel.tokens_per_gpu=1048576")
    assert err.field == "parallel.tokens_per_gpu"
    assert f"{MAX_ASSIGNMENTS:,}" in err.allowed
    err = refusal("parallel.gpus=2048", "parallel.ep=256", "model.num_layers=1024",
                  "parallel.micro_batches=64")
    assert err.field == "model.num_layers" and f"{MAX_OP_ROWS:,}" in err.allowed


def test_the_largest_shipped_case_stays_inside_the_limits():
    # DeepSeek-V3, 2048 GPUs, 4096 tokens per GPU, every MoE layer routed on its own:
    # what `make bench` runs.
    load_scenario(None, overrides=["parallel.gpus=2048", "parallel.ep=256",
                                   "routing.layer_samples=null"])


def test_an_ep_group_too_wide_for_its_traffic_matrices_names_the_ep_size():
    # Few tokens, so the assignments are in range: 13 MoE layers x 2 micro-batches of
    # 4096 x 4096 pairs are not.
    err = refusal("topology=dgx-b300-superpod", "parallel.gpus=4096", "parallel.ep=4096",
                  "model.routed_experts=4096", "parallel.tokens_per_gpu=16",
                  "model.num_layers=16", "routing.layer_samples=null")
    assert err.field == "parallel.ep" and f"{MAX_BATCH_PAIRS:,}" in err.allowed
    load_scenario(None, overrides=[*SMALL, "parallel.gpus=2048", "parallel.ep=2048",
                                   "model.routed_experts=2048", "parallel.tokens_per_gpu=16"])


def test_a_whole_step_with_too_many_micro_batches_names_the_global_batch():
    from moesim.config.feasibility import MAX_PIPELINE_ITEMS

    # 64 replicas of 4 stages: 2^18 micro-batches each, 2^21 schedule items.
    err = refusal("parallel.gpus=256", "parallel.pp=4", "training.global_batch=16777216")
    assert err.field == "training.global_batch"
    assert f"{MAX_PIPELINE_ITEMS:,}" in err.allowed
