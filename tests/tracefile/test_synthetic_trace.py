"""Stories about synthetic routing traces and fitting their parameters back.

``synthetic_trace`` draws every layer's experts from a Zipf popularity (``skew``) with
tokens that re-use their predecessor's expert set (``correlation``) and layers whose
popularity carries over (``layer_correlation``). ``fit_synthetic`` reads those three
numbers off any trace, so a capture at E experts can seed what-ifs at other E.

Recovery tolerances (fixed seeds, so the checks are deterministic), measured over 20
seeds each at E = 64, K = 6, 8192 tokens: skew bias +0.01, sd 0.002; correlation bias
0, sd 0.002; layer_correlation bias < 0.07 but sd 0.10-0.13 at 6 layers, 0.04-0.06 at 24, since
which experts keep their place is itself random. The tests allow 0.05, 0.02 and 0.2.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.errors import InputError
from moesim.tracefile.format import RoutingTrace
from moesim.tracefile.synthesis import (
    GENERATOR,
    SyntheticParams,
    fit_synthetic,
    synthetic_trace,
)

BASE = dict(num_experts=64, top_k=6, num_layers=4, num_tokens=8192, seq_len=256)


def trace(**overrides) -> RoutingTrace:
    return synthetic_trace(**{**BASE, **overrides})


def same_as_previous(tr: RoutingTrace) -> np.ndarray:
    """[L, T-1]: token t+1 has the same expert set as token t (tokens are in order)."""
    sets = np.sort(tr.expert_ids, axis=2)
    return (sets[:, 1:] == sets[:, :-1]).all(axis=2)


# ---------------------------------------------------------------- the generator


def test_shapes_dtypes_sequences_and_metadata():
    tr = trace(num_tokens=1000, seq_len=300, skew=0.7, seed=3)
    assert tr.expert_ids.shape == tr.weights.shape == (4, 1000, 6)
    assert tr.expert_ids.dtype == np.int16 and tr.weights.dtype == np.float32
    assert tr.scores is None
    np.testing.assert_array_equal(tr.seq_id[[0, 299, 300, 999]], [0, 0, 1, 3])
    np.testing.assert_array_equal(tr.pos[[0, 299, 300, 999]], [0, 299, 0, 99])
    source = tr.metadata["source"]
    assert source["kind"] == "synthetic" and source["generator"] == GENERATOR
    assert source["parameters"]["skew"] == 0.7 and source["parameters"]["seed"] == 3
    again = RoutingTrace.from_bytes(tr.to_bytes())
    assert again.metadata["source"] == source


def test_every_token_has_k_distinct_experts():
    sets = np.sort(trace(skew=1.5, correlation=0.5).expert_ids, axis=2)
    assert (np.diff(sets, axis=2) > 0).all()


def test_weights_are_sorted_and_sum_to_one():
    w = trace(num_tokens=500).weights
    np.testing.assert_allclose(w.sum(axis=2), 1.0, rtol=1e-5)
    assert (np.diff(w, axis=2) <= 0).all() and (w > 0).all()
    # Dirichlet(1) over K = 6: the largest weight averages H_6 / 6.
    assert w[..., 0].mean() == pytest.approx(sum(1 / i for i in range(1, 7)) / 6, abs=0.01)


def test_same_seed_same_trace_other_seed_other_trace():
    a, b, c = trace(skew=1.0, seed=5), trace(skew=1.0, seed=5), trace(skew=1.0, seed=6)
    np.testing.assert_array_equal(a.expert_ids, b.expert_ids)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert not np.array_equal(a.expert_ids, c.expert_ids)


def test_correlation_is_the_share_of_re_used_sets_within_sequences():
    """With correlation 0.6, about 60% of tokens repeat the previous set (plus chance,
    which is tiny for 6 of 64), and never across a sequence boundary."""
    tr = trace(num_tokens=8192, seq_len=4, correlation=0.6, seed=1)
    same = same_as_previous(tr)
    boundary = tr.pos[1:] == 0
    assert same[:, ~boundary].mean() == pytest.approx(0.6, abs=0.02)
    assert same[:, boundary].mean() < 0.01


def test_uncorrelated_tokens_rarely_repeat():
    assert same_as_previous(trace(correlation=0.0)).mean() < 0.01


def test_zipf_skew_concentrates_load():
    def top_share(tr):
        load = np.bincount(tr.expert_ids[0].ravel(), minlength=64)
        return np.sort(load)[-8:].sum() / load.sum()
    assert top_share(trace(skew=0.0)) == pytest.approx(8 / 64, abs=0.01)
    assert top_share(trace(skew=1.5)) > 0.4


def test_device_limit_is_respected():
    tr = trace(skew=1.0, max_units=2, unit_size=8)
    units = np.sort(tr.expert_ids // 8, axis=2)
    assert ((np.diff(units, axis=2) != 0).sum(axis=2) + 1).max() <= 2
    assert tr.metadata["source"]["parameters"]["max_units"] == 2


@pytest.mark.parametrize("kwargs,field", [
    ({"num_experts": 0}, "num_experts"), ({"top_k": 65}, "top_k"), ({"top_k": 0}, "top_k"),
    ({"num_layers": 0}, "num_layers"), ({"num_tokens": 0}, "num_tokens"),
    ({"seq_len": 0}, "seq_len"), ({"skew": -0.5}, "skew"), ({"skew": float("nan")}, "skew"),
    ({"correlation": 1.0}, "correlation"), ({"correlation": -0.1}, "correlation"),
    ({"layer_correlation": 1.0}, "layer_correlation"), ({"seed": -1}, "seed"),
    ({"max_units": 2}, "unit_size"), ({"max_units": 2, "unit_size": 7}, "unit_size"),
    ({"max_units": 9, "unit_size": 8}, "max_units"), ({"max_units": 1, "unit_size": 4},
                                                       "max_units"),
    ({"num_layers": 2.5}, "num_layers"),
])
def test_bad_parameters_name_the_field(kwargs, field):
    with pytest.raises(InputError) as info:
        trace(**kwargs)
    assert info.value.field == field and info.value.allowed


@settings(max_examples=30, deadline=None)
@given(num_experts=st.integers(1, 40), data=st.data())
def test_any_valid_parameters_give_a_valid_trace(num_experts, data):
    top_k = data.draw(st.integers(1, min(num_experts, 8)))
    tr = synthetic_trace(
        num_experts=num_experts, top_k=top_k, num_layers=data.draw(st.integers(1, 3)),
        num_tokens=data.draw(st.integers(1, 200)), seq_len=data.draw(st.integers(1, 50)),
        skew=data.draw(st.floats(0, 3)), correlation=data.draw(st.floats(0, 0.99)),
        layer_correlation=data.draw(st.floats(0, 0.99)), seed=data.draw(st.integers(0, 99)))
    assert tr.expert_ids.min() >= 0 and tr.expert_ids.max() < num_experts
    assert (np.diff(np.sort(tr.expert_ids, axis=2), axis=2) > 0).all()


# ---------------------------------------------------------------- the fit


@pytest.mark.parametrize("skew,correlation,layer_correlation,seed", [
    (0.5, 0.3, 0.5, 0),
    (1.0, 0.6, 0.8, 1),
    (1.5, 0.1, 0.3, 2),
    (2.0, 0.0, 0.0, 3),
    (0.8, 0.85, 0.6, 4),
])
def test_fit_recovers_the_generating_parameters(skew, correlation, layer_correlation, seed):
    tr = trace(num_layers=24, skew=skew, correlation=correlation,
               layer_correlation=layer_correlation, seed=seed)
    fit = fit_synthetic(tr)
    assert fit.skew == pytest.approx(skew, abs=0.05)
    assert fit.correlation == pytest.approx(correlation, abs=0.02)
    assert fit.layer_correlation == pytest.approx(layer_correlation, abs=0.2)


def test_fit_of_uniform_routing_has_no_skew():
    fit = fit_synthetic(trace(skew=0.0, correlation=0.2, seed=7))
    assert fit.skew < 0.05
    assert fit.correlation == pytest.approx(0.2, abs=0.02)
    assert fit.layer_correlation == 0.0  # no spread, nothing to correlate


@pytest.mark.parametrize("num_experts,top_k", [(16, 2), (256, 8)])
def test_fit_recovers_skew_at_other_shapes(num_experts, top_k):
    fit = fit_synthetic(trace(num_experts=num_experts, top_k=top_k, skew=1.2, seed=8))
    assert fit.skew == pytest.approx(1.2, abs=0.1)


def test_fit_of_a_single_sequence_and_of_one_layer():
    fit = fit_synthetic(trace(num_layers=1, seq_len=8192, skew=1.0, correlation=0.5))
    assert fit.skew == pytest.approx(1.0, abs=0.05)
    assert fit.correlation == pytest.approx(0.5, abs=0.02)
    assert fit.layer_correlation == 0.0


def test_fitted_params_unpack_into_a_what_if_at_another_expert_count():
    fit = fit_synthetic(trace(skew=1.0, correlation=0.4, layer_correlation=0.5, seed=9))
    assert isinstance(fit, SyntheticParams)
    assert dict(**fit) == {"skew": fit.skew, "correlation": fit.correlation,
                           "layer_correlation": fit.layer_correlation}
    bigger = synthetic_trace(**fit, num_experts=256, top_k=8, num_layers=2, num_tokens=4096,
                             seq_len=256, seed=1)
    assert bigger.num_experts == 256
    assert bigger.metadata["source"]["parameters"]["skew"] == fit.skew
    refit = fit_synthetic(bigger)
    assert refit.skew == pytest.approx(fit.skew, abs=0.05)
    assert refit.correlation == pytest.approx(fit.correlation, abs=0.03)


def test_fit_ignores_dropped_slots_and_token_order():
    tr = trace(skew=1.0, correlation=0.5, seed=10)
    order = np.random.default_rng(0).permutation(tr.num_tokens)
    ids = tr.expert_ids[:, order].copy()
    ids[:, ::50, -1] = -1  # a few drops
    shuffled = RoutingTrace(expert_ids=ids, weights=tr.weights[:, order],
                            seq_id=tr.seq_id[order], pos=tr.pos[order],
                            metadata=dict(tr.metadata))
    fit = fit_synthetic(shuffled)
    assert fit.skew == pytest.approx(1.0, abs=0.05)
    # Each drop breaks at most one identical pair in two: correlation drops by <= 2%.
    assert fit.correlation == pytest.approx(0.5, abs=0.03)
