"""Figures people can read: a title, axis labels with units and a one-line reading aid
on every figure; colour scales and axes anchored so that noise does not look like
structure (heat maps from 0 or around the mean, utilization from 0 to 100 %)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moesim.reports import figures

RNG = np.random.default_rng(0)
GPUS, LAYERS, EXPERTS = 8, 3, 16


def spans() -> pd.DataFrame:
    """Forward expert spans with 3 % noise around 1 ms per GPU and layer."""
    rows = []
    for layer in range(1, LAYERS + 1):
        for gpu in range(GPUS):
            for backward in (False, True):
                rows.append(("experts", backward, 0.0, 1e-3 * (1 + 0.03 * RNG.random()),
                             layer, gpu))
    return pd.DataFrame(rows, columns=["phase", "backward", "start_s", "end_s", "layer",
                                       "gpu"])


def experts(noise: float = 0.03, hot: float = 1.0) -> pd.DataFrame:
    tokens = 1000 * (1 + noise * RNG.uniform(-1, 1, size=(LAYERS, EXPERTS)))
    tokens[0, 0] *= hot
    layer, expert = np.meshgrid(np.arange(1, LAYERS + 1), np.arange(EXPERTS), indexing="ij")
    return pd.DataFrame({"layer": layer.ravel(), "expert": expert.ravel(),
                         "tokens": tokens.round().astype(np.int64).ravel()})


def links(low: float = 0.37, high: float = 0.40) -> pd.DataFrame:
    kind = ["nvlink"] * 16 + ["nic"] * 16
    return pd.DataFrame({"kind": kind, "utilization": RNG.uniform(low, high, size=32)})


SUMMARY = {"attention_time_s": 1e-3, "expert_compute_time_s": 2e-3,
           "shared_expert_time_s": 3e-4, "dense_ffn_time_s": 2e-4, "lm_head_time_s": 1e-4,
           "comm_exposed_time_s": 4e-4, "step_time_s": 4.5e-3}
BALANCE = pd.DataFrame({"step": [0, 1, 2], "expert_max_over_mean": [1.6, 1.3, 1.1],
                        "gpu_max_over_mean": [1.3, 1.2, 1.05],
                        "step_time_s": [np.nan, np.nan, 4e-3]})


def pipeline_items() -> pd.DataFrame:
    from moesim.pipeline import ChunkCosts, simulate_pipeline

    ones = np.ones((4, 1))
    costs = ChunkCosts(forward_s=ones, backward_input_s=ones, backward_weight_s=ones,
                       forward_comm_s=0 * ones, backward_comm_s=0 * ones, send_s=0.1)
    return simulate_pipeline(costs, schedule="1f1b", pp=4, micro_batches=8).items


def drawn():
    """(name, figure) of every figure function."""
    return [
        ("pipeline_schedule", figures.pipeline_schedule(pipeline_items())),
        ("step_breakdown", figures.step_breakdown(SUMMARY)),
        ("expert_time_heatmap", figures.expert_time_heatmap(spans())),
        ("link_utilization", figures.link_utilization(links())),
        ("expert_load", figures.expert_load(experts())),
        ("gpu_load", figures.gpu_load(spans(), "contiguous")),
        ("balance_series", figures.balance_series(BALANCE)),
    ]


@pytest.fixture
def close_all():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def test_every_figure_has_a_title_labels_with_units_and_a_reading_aid(close_all):
    found = drawn()
    assert {name for name, _ in found} == set(figures.READING)
    for name, fig in found:
        ax = fig.axes[0]
        assert ax.get_title(), name
        assert ax.get_xlabel() and ax.get_ylabel(), name
        assert "(" in ax.get_xlabel() + ax.get_ylabel(), f"{name}: no unit in the labels"
        aid = figures.READING[name]
        assert aid in [t.get_text() for t in ax.texts], name
        assert "\n" not in aid and len(aid) < 130, name
        for other in fig.axes[1:]:  # colour bars and twin axes are labelled too
            assert other.get_ylabel(), name


def test_expert_load_noise_stays_pale_around_the_mean(close_all):
    fig = figures.expert_load(experts(noise=0.03))
    image = fig.axes[0].images[0]
    low, high = image.get_clim()
    assert low == 0 and high >= 2  # 3 % noise spans a sliver of the scale
    assert image.norm(1.0) == pytest.approx(0.5)  # the layer mean sits at the centre
    hot = figures.expert_load(experts(noise=0.03, hot=5.0)).axes[0].images[0]
    assert hot.get_clim()[1] > 3.5  # a hot expert (5x, 4x the mean) widens the scale


def test_expert_time_colour_scale_starts_at_zero(close_all):
    image = figures.expert_time_heatmap(spans()).axes[0].images[0]
    low, high = image.get_clim()
    assert low == 0 and high == pytest.approx(np.nanmax(image.get_array()))
    assert (high - low) / high > 0.25


def test_link_utilization_axis_spans_0_to_100_percent(close_all):
    ax = figures.link_utilization(links(0.37, 0.40)).axes[0]
    assert ax.get_xlim() == (0, 100)
    # Busier than the step (rounding) still shows every link.
    assert figures.link_utilization(links(0.9, 1.1)).axes[0].get_xlim()[1] >= 110


def test_bar_axes_start_at_zero(close_all):
    assert figures.gpu_load(spans(), "contiguous").axes[0].get_ylim()[0] == 0
    assert figures.step_breakdown(SUMMARY).axes[0].get_xlim()[0] == 0
    left, right = figures.balance_series(BALANCE).axes[:2]
    assert left.get_ylim()[0] == 1 and right.get_ylim()[0] == 0


def test_the_plan_frontier_leaves_out_infinite_costs_and_draws_an_empty_frontier(close_all):
    from moesim.reports import planning_figures

    points = pd.DataFrame({"cost": [np.inf, 2.0, np.nan], "tokens_per_s": [5.0, 6.0, 1.0]})
    fig = planning_figures.frontier(points, points, points.iloc[0], x="cost",
                                    y="tokens_per_s", x_label="cost", y_label="tokens/s",
                                    target=np.inf)
    assert np.isfinite(fig.axes[0].get_xlim()).all()
    empty = planning_figures.frontier(points, pd.DataFrame([]), None, x="cost",
                                      y="tokens_per_s", x_label="cost", y_label="tokens/s")
    assert empty.axes[0].get_title()
