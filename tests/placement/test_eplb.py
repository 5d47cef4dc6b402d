"""Stories about redundant-expert placement: DeepSeek's EPLB heuristics, a worked
example, and what every placement guarantees."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.placement.eplb import balanced_packing, gpu_loads, rebalance, replicate
from moesim.placement.layout import LayerPlacement


def test_the_published_example_is_reproduced():
    """deepseek-ai/EPLB README: 2 layers x 12 experts, 16 slots, 4 groups, 2 nodes, 8 GPUs."""
    weight = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                       [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
    placed = rebalance(weight, slots=16, groups=4, nodes=2, gpus=8)
    assert placed.phy2log_ls.tolist() == [
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
        [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def test_a_hot_expert_worked_by_hand():
    """Loads 6, 2, 2, 2 on 2 GPUs with 6 slots: both extra replicas go to expert 0 (6/1,
    then 6/2 = 3 > 2), every replica then carries 2, and packing in slot order alternates
    the GPUs: GPU 0 holds experts 0, 2, 0 and GPU 1 holds 1, 3, 0, 6 tokens each."""
    expert_s, rank_s, replicas = replicate(np.array([6.0, 2, 2, 2]), 6)
    assert expert_s.tolist() == [0, 1, 2, 3, 0, 0] and rank_s.tolist() == [0, 0, 0, 0, 1, 2]
    assert replicas.tolist() == [3, 1, 1, 1]
    placed = rebalance(np.array([[6.0, 2, 2, 2]]), slots=6, groups=1, nodes=1, gpus=2)
    assert placed.phy2log_ls.tolist() == [[0, 2, 0, 1, 3, 0]]
    assert gpu_loads([[6.0, 2, 2, 2]], placed.phy2log_ls, 2).tolist() == [[6.0, 6.0]]
    assert placed.log2phy_lex[0, 0].tolist() == [0, 2, 5]


def test_packing_puts_the_heaviest_first_into_the_lightest_pack():
    """5 -> pack 0; 4 -> pack 1 (empty); 2 -> pack 1 (4 < 5); 1 -> pack 0, the only one
    with room: 6 and 6."""
    pack, rank = balanced_packing(np.array([5.0, 1, 4, 2]), 2)
    assert pack.tolist() == [0, 0, 1, 1] and rank.tolist() == [0, 1, 0, 1]


@st.composite
def layouts(draw):
    nodes = draw(st.sampled_from([1, 2, 4]))
    gpus = nodes * draw(st.sampled_from([1, 2, 4]))
    groups = nodes * draw(st.sampled_from([1, 2]))
    experts = groups * draw(st.integers(1, 6))
    slots = gpus * draw(st.integers(-(-experts // gpus), -(-experts // gpus) + 3))
    weight = draw(st.lists(st.integers(0, 1000), min_size=experts, max_size=experts))
    return np.array([weight], dtype=float), slots, groups, nodes, gpus


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_every_expert_has_a_replica_every_gpu_its_slots_every_group_one_node(case):
    weight, slots, groups, nodes, gpus = case
    placed = rebalance(weight, slots=slots, groups=groups, nodes=nodes, gpus=gpus)
    phy2log = placed.phy2log_ls[0]
    experts = weight.shape[1]
    assert phy2log.shape == (slots,)
    assert (placed.replicas_le[0] >= 1).all() and placed.replicas_le[0].sum() == slots
    node_of_slot = np.arange(slots) // (slots // nodes)
    group_of_slot = phy2log // (experts // groups)
    for g in range(groups):
        assert len(set(node_of_slot[group_of_slot == g])) == 1
    # log2phy lists exactly the slots that hold each expert.
    for e in range(experts):
        listed = placed.log2phy_lex[0, e]
        assert sorted(listed[listed >= 0]) == np.flatnonzero(phy2log == e).tolist()
    # Replicas share their expert's load: the GPUs carry exactly the layer's load. (The
    # heuristics do not promise a busiest GPU below contiguous placement's: loads
    # 0,0,0,0,1,2,3,0 on 4 GPUs with 12 slots give 3.5 against 3.)
    assert gpu_loads(weight, placed.phy2log_ls, gpus).sum() == pytest.approx(weight.sum())


def test_source_rank_split_prefers_a_replica_on_the_senders_gpu_then_node():
    # 4 GPUs in 2 nodes, one slot each... two slots per GPU: expert 0 on GPUs 0 and 3.
    placement = LayerPlacement(phy2log_s=np.array([0, 1, 2, 3, 4, 5, 6, 0]), ep=4,
                               gpus_per_node=2)
    ids = np.array([[0], [0], [0], [0]])  # one token per rank, all picking expert 0
    assert placement.slots_of(ids, tokens_per_rank=1)[:, 0].tolist() == [0, 0, 7, 7]
    even = LayerPlacement(phy2log_s=placement.phy2log_s, ep=4, gpus_per_node=2,
                          replica_split="even")
    assert even.slots_of(ids, tokens_per_rank=1)[:, 0].tolist() == [0, 7, 0, 7]
    assert placement.slots_of(np.array([[-1]]), tokens_per_rank=1).tolist() == [[-1]]


@pytest.mark.parametrize("split", ["source-rank", "even"])
def test_slots_hold_the_expert_that_was_picked(split):
    rng = np.random.default_rng(0)
    placed = rebalance(rng.integers(1, 100, size=(1, 16)), slots=24, groups=4, nodes=2, gpus=8)
    placement = LayerPlacement(phy2log_s=placed.phy2log_ls[0], ep=8, gpus_per_node=4,
                               replica_split=split)
    ids = rng.integers(0, 16, size=(64, 3))
    slots = placement.slots_of(ids, tokens_per_rank=8)
    assert (placement.phy2log_s[slots] == ids).all()


def test_the_placement_command_prints_and_writes_the_placement(tmp_path):
    import json

    from typer.testing import CliRunner

    from moesim.cli.main import app

    loads = tmp_path / "loads.csv"
    loads.write_text("90,132,40,61,104,165,39,4,73,56,183,86\n"
                     "20,107,104,64,19,197,187,157,172,86,16,27\n")
    out = tmp_path / "placement.json"
    result = CliRunner().invoke(app, ["placement", str(loads), "--gpus", "8", "--slots", "16",
                                      "--nodes", "2", "--groups", "4", "--json",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document == json.loads(out.read_text())
    assert document["phy2log"][0] == [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]
    assert len(document["replicas"][1]) == 12 and sum(document["replicas"][1]) == 16
    assert document["gpu_load_max_over_mean_contiguous"] is None  # 12 experts, 8 GPUs
    bad = CliRunner().invoke(app, ["placement", str(loads), "--gpus", "8", "--slots", "12"])
    assert bad.exit_code == 2 and "--slots" in bad.output and "multiples of 8" in bad.output
    wrong = CliRunner().invoke(app, ["placement", str(loads), "--gpus", "8", "--slots", "16",
                                     "--nodes", "2", "--groups", "3"])
    assert wrong.exit_code == 2 and "--groups" in wrong.output


@pytest.mark.parametrize(("gpus", "slots", "allowed"), [
    ("8", "1000000000000", "multiples of 8 from 16 (one per expert) to 64 (4 per expert)"),
    ("8", "16777216", "to 64 (4 per expert)"),
    ("3200000000", "3200000000", "1 to 65,536"),
])
def test_placement_sizes_are_bounded_before_anything_is_allocated(tmp_path, gpus, slots,
                                                                  allowed, one_error_line):
    loads = tmp_path / "loads.csv"
    loads.write_text(",".join(["5"] * 16) + "\n")
    line = one_error_line(["placement", str(loads), "--gpus", gpus, "--slots", slots])
    assert allowed in line


def test_a_hot_expert_cannot_blow_up_the_log2phy_table(tmp_path, one_error_line):
    loads = tmp_path / "hot.csv"
    loads.write_text("1" + ",0" * 4095 + "\n")  # every extra slot goes to expert 0
    line = one_error_line(["placement", str(loads), "--gpus", "8", "--slots", "16384",
                            "--mode", "global"])
    assert "--slots" in line and "log2phy" in line


def test_a_loads_file_of_too_many_layers_is_refused_before_parsing(tmp_path, one_error_line):
    loads = tmp_path / "tall.csv"
    loads.write_text("1,2\n" * 1025)
    line = one_error_line(["placement", str(loads), "--gpus", "2", "--slots", "2"])
    assert line.endswith("1,025 rows (allowed: at most 1,024 rows, one per MoE layer)")


def test_the_heap_placement_matches_a_scan_of_every_pack():
    """Ties go to the lowest index, as the scan with argmin/argmax did."""
    rng = np.random.default_rng(7)
    for weight in (rng.integers(0, 3, 24).astype(float), np.zeros(24), rng.random(24)):
        pack_n, rank_n = balanced_packing(weight, 4)
        load_p, count_p = np.zeros(4), np.zeros(4, dtype=int)
        for item in np.argsort(-weight, kind="stable"):
            room = np.flatnonzero(count_p < 6)
            pack = room[np.argmin(load_p[room])]
            assert (pack_n[item], rank_n[item]) == (pack, count_p[pack])
            load_p[pack] += weight[item]
            count_p[pack] += 1
        expert_s, _, replicas = replicate(weight, 40)
        counts = np.ones(24, dtype=int)
        for slot in range(24, 40):
            expert = int(np.argmax(weight / counts))
            assert expert_s[slot] == expert
            counts[expert] += 1
        assert (replicas == counts).all()
