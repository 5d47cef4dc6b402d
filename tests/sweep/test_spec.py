"""Sweep files: axes become a grid (zipped axes step together), mistakes name the field."""

from __future__ import annotations

import pytest

from moesim.errors import InputError
from moesim.sweep.spec import expand, grid, parse_sweep

BASE = {"model": {"preset": "deepseek-v3", "num_layers": 4}, "topology": "h800-cluster",
        "parallel": {"ep": 16, "tokens_per_gpu": 256}, "routing": {"max_devices": 2}}


def test_a_grid_crosses_the_axes_first_axis_slowest():
    points = grid({"a": [1, 2], "b": ["x", "y", "z"]})
    assert [(p["a"], p["b"]) for p in points] == [
        (1, "x"), (1, "y"), (1, "z"), (2, "x"), (2, "y"), (2, "z")]


def test_zipped_axes_step_together():
    points = grid({"e": [64, 128], "k": [4, 8], "m": [1, 2]}, [["e", "k"]])
    assert [(p["e"], p["k"], p["m"]) for p in points] == [
        (64, 4, 1), (64, 4, 2), (128, 8, 1), (128, 8, 2)]


def test_points_carry_resolved_scenarios_and_invalid_ones_their_error():
    spec = parse_sweep({"base": BASE, "axes": {"parallel.ep": [8, 16],
                                               "routing.max_devices": [1, 2]}},
                       source="s.yaml")
    points = expand(spec, source="s.yaml")
    assert len(points) == 4
    assert points[0].scenario["parallel"]["ep"] == 8
    assert points[3].scenario["routing"]["max_devices"] == 2
    # EP8 is one node of the H800 cluster: a node limit of 2 is impossible there.
    assert points[1].scenario is None and "max_devices" in points[1].error
    assert len({p.key for p in points}) == 4


def test_keep_active_params_narrows_experts_as_top_k_grows():
    spec = parse_sweep({"base": BASE, "axes": {"model.top_k": [4, 8, 16]},
                        "keep_active_params": True}, source="s.yaml")
    widths = [p.scenario["model"]["moe_intermediate_size"] for p in expand(spec, source="s")]
    assert widths == [4096, 2048, 1024]  # K x I stays 8 x 2048


@pytest.mark.parametrize(("data", "field"), [
    ({"axes": {"parallel.epp": [1]}}, "axes.parallel.epp"),
    ({"axes": {"parallel.ep": []}}, "axes.parallel.ep"),
    ({"axes": {"parallel.ep": [8]}, "zip": [["routing.max_devices"]]}, "zip[0]"),
    ({"axes": {"parallel.ep": [8, 16], "routing.max_devices": [1]},
      "zip": [["parallel.ep", "routing.max_devices"]]}, "zip[0]"),
    ({"axes": {"parallel.ep": [8]}, "seeds": 0}, "seeds"),
    ({"axes": {"parallel.ep": list(range(1000)), "seed": list(range(1000))}}, "axes"),
    ({"axis": {"parallel.ep": [8]}}, "axis"),
])
def test_mistakes_name_the_file_and_field(data, field):
    with pytest.raises(InputError) as err:
        parse_sweep(data, source="s.yaml")
    assert err.value.source == "s.yaml"
    assert err.value.field == field
