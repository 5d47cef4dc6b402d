"""Stories about trace statistics: load balance, the DeepSeek-V2 balance terms and how
far tokens travel, for experts laid out contiguously over ``ep`` devices.

The hand-worked trace below has E = 8 experts on D = 4 devices (2 experts each) and
2 GPUs per node (2 nodes); K = 2 and four tokens:

    token  experts  devices  nodes
    t0     0, 1     0        0
    t1     0, 2     0, 1     0
    t2     0, 7     0, 3     0, 1
    t3     5, (dropped)  2   1
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.errors import InputError
from moesim.tracefile.format import RoutingTrace
from moesim.tracefile.stats import format_stats, trace_stats

IDS_TK = np.array([[0, 1], [0, 2], [0, 7], [5, -1]])
# Exact in float16, summing to 1.
SCORES_E = np.array([0.375, 0.125, 0.125, 0.125, 0.0625, 0.0625, 0.0625, 0.0625])


def make_trace(ids_ltk, *, num_experts, scores_lte=None, layer_indices=None) -> RoutingTrace:
    ids_ltk = np.asarray(ids_ltk)
    n_tokens = ids_ltk.shape[1]
    meta = {"num_experts": num_experts, "gate": {"kind": "test"}, "source": {"kind": "test"}}
    if layer_indices is not None:
        meta["layer_indices"] = layer_indices
    return RoutingTrace(expert_ids=ids_ltk, weights=np.full(ids_ltk.shape, 0.5),
                        scores=scores_lte, seq_id=np.zeros(n_tokens, dtype=np.int32),
                        pos=np.arange(n_tokens), metadata=meta)


def hand_trace(with_scores: bool = True) -> RoutingTrace:
    scores = np.broadcast_to(SCORES_E, (1, 4, 8)) if with_scores else None
    return make_trace(IDS_TK[None], num_experts=8, scores_lte=scores, layer_indices=[3])


def test_hand_worked_loads_and_reach():
    stats = trace_stats(hand_trace(), ep=4, gpus_per_node=2, max_devices=1)
    row = stats.layers.loc[3]
    # Expert loads [3, 1, 1, 0, 0, 1, 0, 1]: mean 7/8, population std sqrt(0.859375).
    assert row["assignments"] == 7
    assert row["expert_load_cv"] == pytest.approx(math.sqrt(0.859375) / 0.875)
    assert row["expert_max_over_mean"] == pytest.approx(3 / 0.875)
    # Device loads [4, 1, 1, 1]: mean 1.75, variance 1.6875.
    assert row["device_load_cv"] == pytest.approx(math.sqrt(1.6875) / 1.75)
    assert row["device_max_over_mean"] == pytest.approx(4 / 1.75)
    assert row["mean_devices"] == pytest.approx(1.5)
    assert row["mean_nodes"] == pytest.approx(1.25)
    assert stats.devices_reached.loc[3].tolist() == [0.0, 0.5, 0.5]
    assert stats.nodes_reached.loc[3].tolist() == [0.0, 0.75, 0.25]
    assert row["share_over_m_devices"] == 0.5
    assert row["share_over_m_nodes"] == 0.25
    assert stats.share_over_m_devices == 0.5 and stats.share_over_m_nodes == 0.25
    assert stats.num_nodes == 2


def test_hand_worked_balance_terms():
    """f_i = E/(KT) * count = count here; P = the (same) scores of every token.

    exp_bal  = 3(.375) + .125 + .125 + .0625 + .0625                   = 1.5
    dev_bal  = f' [2, .5, .5, .5] . P' [.5, .25, .125, .125]            = 1.25
    comm_bal = f'' = D/(MT) * sent [3, 1, 1, 1], times P'
               M = 1: [3, 1, 1, 1] . P'                                 = 2.0
               no M (a token reaches at most min(K, D) = 2): half that  = 1.0
    """
    limited = trace_stats(hand_trace(), ep=4, gpus_per_node=2, max_devices=1).layers.loc[3]
    assert limited["exp_bal"] == pytest.approx(1.5)
    assert limited["f_max"] == pytest.approx(3.0)
    assert limited["dev_bal"] == pytest.approx(1.25)
    assert limited["f_dev_max"] == pytest.approx(2.0)
    assert limited["comm_bal"] == pytest.approx(2.0)
    assert limited["f_comm_max"] == pytest.approx(3.0)
    free = trace_stats(hand_trace(), ep=4, gpus_per_node=2).layers.loc[3]
    assert free["comm_bal"] == pytest.approx(1.0)
    assert "share_over_m_devices" not in free.index


def test_perfect_balance_gives_ones():
    """Every expert and device equally loaded, uniform scores: each term is exactly 1."""
    ids = [[[0, 1], [2, 3], [1, 2], [3, 0]]]
    scores = np.full((1, 4, 4), 0.25)
    stats = trace_stats(make_trace(ids, num_experts=4, scores_lte=scores), ep=4,
                        max_devices=2)
    row = stats.layers.iloc[0]
    assert row["expert_load_cv"] == 0 and row["expert_max_over_mean"] == 1
    assert row["exp_bal"] == pytest.approx(1) and row["dev_bal"] == pytest.approx(1)
    assert row["comm_bal"] == pytest.approx(1)


def test_without_scores_balance_terms_are_nan_but_frequencies_remain():
    stats = trace_stats(hand_trace(with_scores=False), ep=4, gpus_per_node=2)
    row = stats.layers.loc[3]
    assert math.isnan(row["exp_bal"]) and math.isnan(row["dev_bal"])
    assert math.isnan(row["comm_bal"])
    assert row["f_max"] == pytest.approx(3.0) and row["f_comm_max"] == pytest.approx(1.5)
    assert not stats.has_scores


def test_one_node_when_ep_fits_in_a_node_and_partial_last_node():
    assert trace_stats(hand_trace(), ep=4).num_nodes == 1
    stats = trace_stats(hand_trace(), ep=4, gpus_per_node=3)
    # Ranks 0..2 on node 0, rank 3 on node 1: only t2 (devices 0 and 3) spans two nodes.
    assert stats.num_nodes == 2
    assert stats.nodes_reached.loc[3].tolist() == [0.0, 0.75, 0.25]


def test_all_dropped_token_reaches_nothing():
    stats = trace_stats(make_trace([[[-1, -1], [0, 1]]], num_experts=4), ep=2)
    assert stats.devices_reached.iloc[0].tolist() == [0.5, 0.5, 0.0]


def test_layers_keep_the_model_numbering_and_scalars_summarise_them():
    ids = np.stack([IDS_TK, [[0, 1], [2, 3], [4, 5], [6, 7]]])
    stats = trace_stats(make_trace(ids, num_experts=8, layer_indices=[5, 9]), ep=4)
    assert stats.layers.index.tolist() == [5, 9]
    assert stats.layers.loc[9, "expert_load_cv"] == 0
    assert stats.expert_load_cv == pytest.approx(stats.layers["expert_load_cv"].mean())
    assert stats.max_over_mean == pytest.approx(3 / 0.875)
    assert stats.mean_devices_per_token == pytest.approx((1.5 + 1.0) / 2)
    assert stats.share_over_m_devices is None


@pytest.mark.parametrize("kwargs,field", [
    ({"ep": 3}, "ep"), ({"ep": 0}, "ep"), ({"ep": 16}, "ep"), ({"ep": True}, "ep"),
    ({"ep": 4, "max_devices": 0}, "max_devices"), ({"ep": 4, "max_devices": 5}, "max_devices"),
    ({"ep": 4, "gpus_per_node": 0}, "gpus_per_node"),
])
def test_bad_options_name_the_field(kwargs, field):
    with pytest.raises(InputError) as info:
        trace_stats(hand_trace(), **kwargs)
    assert info.value.field == field
    assert info.value.allowed


def test_ep_error_lists_the_divisors():
    with pytest.raises(InputError, match="1, 2, 4, 8"):
        trace_stats(hand_trace(), ep=3)


def test_format_stats_shows_every_layer_and_marks_missing_scores():
    text = format_stats(trace_stats(hand_trace(with_scores=False), ep=4, gpus_per_node=2,
                                    max_devices=1))
    assert "EP = 4 devices on 2 node(s)" in text
    assert "M = 1" in text and "50.0% of tokens reach more devices" in text
    assert "need scores" in text
    for column in ("CV", "CommBal", "nodes/tok", ">M devs"):
        assert column in text
    assert "nodes reached" in text and "devices reached" in text


# ---------------------------------------------------------------- brute force


def brute_force(ids_tk, scores_te, *, num_experts, ep, gpus_per_node, m):
    """Loop-per-token reference for one layer."""
    n_tokens, top_k = ids_tk.shape
    per_device = num_experts // ep
    count = np.zeros(num_experts)
    sent = np.zeros(ep)
    n_dev, n_node = [], []
    for t in range(n_tokens):
        experts = [int(e) for e in ids_tk[t] if e >= 0]
        for e in experts:
            count[e] += 1
        devices = {e // per_device for e in experts}
        for d in devices:
            sent[d] += 1
        n_dev.append(len(devices))
        n_node.append(len({d // gpus_per_node for d in devices}))
    f = num_experts / (top_k * n_tokens) * count
    # P_i averages each token's scores normalised to sum 1 (sigmoid gates do not).
    p = np.mean([row / row.sum() for row in scores_te.astype(np.float64)], axis=0)
    f_dev = [f[d * per_device:(d + 1) * per_device].mean() for d in range(ep)]
    p_dev = [p[d * per_device:(d + 1) * per_device].sum() for d in range(ep)]
    f_comm = ep / (m * n_tokens) * sent
    return {"exp_bal": float(f @ p), "dev_bal": float(np.dot(f_dev, p_dev)),
            "comm_bal": float(np.dot(f_comm, p_dev)), "n_dev": n_dev, "n_node": n_node}


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_vectorised_stats_match_a_per_token_loop(data):
    ep = data.draw(st.sampled_from([1, 2, 4, 8]))
    num_experts = ep * data.draw(st.integers(1, 3))
    top_k = data.draw(st.integers(1, min(num_experts, 4)))
    n_tokens = data.draw(st.integers(1, 12))
    gpus_per_node = data.draw(st.integers(1, 4))
    m = data.draw(st.none() | st.integers(1, ep))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    ids_tk = np.stack([rng.permutation(num_experts)[:top_k] for _ in range(n_tokens)])
    dropped = rng.random(ids_tk.shape) < 0.2
    dropped[0, 0] = False  # a layer with every slot dropped is not a trace
    ids_tk[dropped] = -1
    scores_te = rng.dirichlet(np.ones(num_experts), size=n_tokens).astype(np.float16)
    trace = make_trace(ids_tk[None], num_experts=num_experts, scores_lte=scores_te[None])
    stats = trace_stats(trace, ep=ep, gpus_per_node=gpus_per_node, max_devices=m)
    ref = brute_force(ids_tk, scores_te, num_experts=num_experts, ep=ep,
                      gpus_per_node=gpus_per_node, m=m if m is not None else min(top_k, ep))
    row = stats.layers.iloc[0]
    for key in ("exp_bal", "dev_bal", "comm_bal"):
        assert row[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key
    dev_hist = np.bincount(ref["n_dev"], minlength=min(top_k, ep) + 1) / n_tokens
    node_hist = np.bincount(ref["n_node"], minlength=stats.nodes_reached.shape[1]) / n_tokens
    np.testing.assert_allclose(stats.devices_reached.iloc[0], dev_hist)
    np.testing.assert_allclose(stats.nodes_reached.iloc[0], node_hist)
    if m is not None:
        assert row["share_over_m_devices"] == pytest.approx(np.mean(np.array(ref["n_dev"]) > m))


def test_sigmoid_scores_are_normalised_per_token_for_the_balance_terms():
    """Sigmoid affinities sum to about E/2 per token; the f_i P_i terms use s/sum(s), so a
    perfectly balanced sigmoid gate still scores 1 (DeepSeek-V3's sequence-wise rule)."""
    num_experts, n_tokens = 8, 8
    ids_tk = np.array([[(2 * t) % 8, (2 * t + 1) % 8] for t in range(n_tokens)])
    scores_te = np.full((n_tokens, num_experts), 0.5, dtype=np.float16)
    trace = make_trace(ids_tk[None], num_experts=num_experts, scores_lte=scores_te[None])
    row = trace_stats(trace, ep=4, gpus_per_node=4).layers.iloc[0]
    assert row["exp_bal"] == pytest.approx(1.0)
    assert row["dev_bal"] == pytest.approx(1.0)


def test_affinity_by_limit_makes_the_m_claim_checkable():
    """On the V1 sample trace over 8 devices the kept affinity rises with M, reaches the
    unrestricted top-K once M can hold every pick, and tokens never reach more than M."""
    from pathlib import Path

    from moesim.tracefile.stats import affinity_by_limit

    path = Path(__file__).resolve().parents[2] / "traces" / "samples" / "tiny-v1.npz"
    table = affinity_by_limit(RoutingTrace.load(path), units=8)
    kept = table["affinity_kept"].to_numpy()
    assert list(table.index) == list(range(1, 9))
    assert (np.diff(kept) >= -1e-12).all() and kept[0] < 0.7
    assert kept[-1] == pytest.approx(1.0)
    assert (table["units_per_token"] <= table.index + 1e-9).all()
    with pytest.raises(InputError) as err:
        affinity_by_limit(RoutingTrace.load(path), units=7)
    assert err.value.field == "units"


def test_score_shares_chunk_by_chunk_equal_the_whole_formula(monkeypatch):
    """P_e over chunks (any size) is the mean of s / sum(s) over all tokens, tokens whose
    scores sum to <= 0 counting as zeros, to float64 rounding."""
    from moesim.tracefile import stats

    rng = np.random.default_rng(4)
    scores = rng.random((1000, 16)).astype(np.float16)
    scores[3] = 0
    scores[7] = -np.abs(scores[7])
    s = scores.astype(np.float64)
    row = s.sum(axis=1, keepdims=True)
    expected = np.divide(s, row, out=np.zeros_like(s), where=row > 0).mean(axis=0)
    for chunk in (1, 7, 2048):
        monkeypatch.setattr(stats, "ROWS_PER_CHUNK", chunk)
        np.testing.assert_allclose(stats.score_shares(scores), expected, rtol=1e-13)


def test_layer_statistics_do_not_depend_on_the_chunk_of_tokens(monkeypatch):
    from moesim.tracefile import stats

    rng = np.random.default_rng(5)
    ids = np.stack([np.stack([rng.permutation(16)[:3] for _ in range(50)]) for _ in range(2)])
    ids[0, ::4, 1] = -1
    trace = make_trace(ids, num_experts=16,
                       scores_lte=rng.random((2, 50, 16)).astype(np.float16))
    whole = trace_stats(trace, ep=4, gpus_per_node=2, max_devices=2)
    monkeypatch.setattr(stats, "TOKENS_PER_CHUNK", 7)
    chunked = trace_stats(trace, ep=4, gpus_per_node=2, max_devices=2)
    assert whole.layers.equals(chunked.layers)
    assert whole.devices_reached.equals(chunked.devices_reached)
    assert whole.nodes_reached.equals(chunked.nodes_reached)


def test_seed_balance_is_the_mean_of_trace_stats_terms():
    """The simulator's summary terms are trace_stats' columns (computed without the
    nodes reached, which they do not need), bit for bit."""
    import moesim
    from moesim.tracefile.stats import seed_balance

    rng = np.random.default_rng(6)
    ids = np.stack([np.stack([rng.permutation(256)[:8] for _ in range(64)]) for _ in range(3)])
    trace = make_trace(ids, num_experts=256,
                       scores_lte=rng.random((3, 64, 256)).astype(np.float16))
    scenario = moesim.load_scenario(overrides=["parallel.ep=64", "routing.max_devices=4"])
    stats = trace_stats(trace, ep=64, max_devices=4, gpus_per_node=8)
    assert seed_balance(trace, scenario, 8) == {
        "expert_balance": float(stats.layers["exp_bal"].mean()),
        "device_balance": float(stats.layers["dev_bal"].mean()),
        "comm_balance": float(stats.layers["comm_bal"].mean())}
