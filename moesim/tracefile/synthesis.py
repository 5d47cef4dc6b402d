"""Synthetic routing traces with skew, token and layer correlation; and the inverse fit.

The model (:func:`synthetic_trace`), for ``E`` experts, top-``K``, ``L`` layers and ``T``
tokens cut into sequences of ``seq_len`` (token ``t`` is in sequence ``t // seq_len`` at
position ``t % seq_len``):

1. Popularity. Layer 0 has Zipf popularity ``p_e`` proportional to ``rank(e)^-skew``
   with ranks given to experts in random order (:func:`expert_popularity`; ``skew = 0``
   is uniform). Layer ``l + 1`` starts from layer ``l``'s vector: each expert keeps its
   popularity with probability ``layer_correlation``; the popularities of the others are
   shuffled among them. Every layer is thus exactly Zipf(``skew``) up to a permutation,
   and the correlation over experts of consecutive layers' popularities is
   ``layer_correlation`` (plus O(1/E)).
2. Tokens. In each layer, the first token of every sequence draws its ``K`` experts
   afresh; every later token re-uses the previous token's expert set with probability
   ``correlation`` and otherwise draws afresh, independently per layer. A fresh draw is
   :func:`sample_topk`: ``K`` distinct experts, each picked in proportion to its
   popularity among those not yet picked (optionally within ``max_units`` units of
   ``unit_size`` experts). The chain is stationary, so every token's set has the law of
   a fresh draw, and two tokens ``d`` apart in a sequence share their set with
   probability ``correlation^d`` beyond chance.
3. Weights. Each token's ``K`` weights are a Dirichlet(1, ..., 1) draw (they sum to 1,
   as after top-K renormalisation) sorted in decreasing order, so the first-drawn
   (most preferred) expert gets the largest weight. Re-used sets draw new weights. No
   scores are produced.

:func:`fit_synthetic` estimates ``skew``, ``correlation`` and ``layer_correlation`` from
any trace so that ``synthetic_trace(**fit_synthetic(trace), num_experts=E2, ...)`` gives
what-ifs at expert counts no capture has. See its docstring for the estimators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moesim.config.model import MAX_LAYERS
from moesim.errors import InputError
from moesim.routing.batch import expert_loads
from moesim.routing.synthetic import expert_popularity, sample_topk
from moesim.tracefile.format import RoutingTrace

GENERATOR = "moesim.routing.synthetic_trace/1"
_MAX_SKEW = 16.0
# Random pairs closer than this within one sequence are left out of the chance estimate:
# under the model their sets still agree with probability correlation^distance.
_CHANCE_MIN_DISTANCE = 64
_PARAMS = ("skew", "correlation", "layer_correlation")
# A synthesized trace is held whole while drawn and written: about 15 bytes per
# assignment, and about 20 more per assignment of the layer being drawn. At this limit
# (measured): 4.2 GB peak for 1 layer x 16 M tokens x top-8, 1.8 GB for 1,024 layers x
# 131,072 tokens x top-1.
MAX_TOTAL_ASSIGNMENTS = 2**27


@dataclass(frozen=True, kw_only=True)
class SyntheticParams:
    """Fitted generator parameters; unpacks with ``**`` into :func:`synthetic_trace`."""

    skew: float
    correlation: float
    layer_correlation: float

    def keys(self) -> tuple[str, ...]:
        return _PARAMS

    def __getitem__(self, key: str) -> float:
        if key not in _PARAMS:
            raise KeyError(key)
        return getattr(self, key)


def _require(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise InputError(f"got {value!r}", field=field, allowed=allowed)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) \
        and not isinstance(value, bool) and math.isfinite(value)


def _check_size(num_layers: int, num_tokens: int, top_k: int) -> None:
    """Refuse, before allocating, a trace too large to hold in memory."""
    _require(num_layers <= MAX_LAYERS, "num_layers", num_layers, f"1..{MAX_LAYERS:,}")
    total = num_layers * num_tokens * top_k
    if total > MAX_TOTAL_ASSIGNMENTS:
        raise InputError(
            f"{num_layers:,} layers x {num_tokens:,} tokens x top-{top_k} = {total:,} "
            "assignments, more than a synthesized trace holds in memory", field="num_tokens",
            allowed=f"layers x tokens x top_k at most {MAX_TOTAL_ASSIGNMENTS:,} (about 5 GB)")


def _carry_over(pop_e: np.ndarray, keep: float, rng: np.random.Generator) -> np.ndarray:
    """Next layer's popularity: each expert keeps its value with probability ``keep``,
    the values of the others are shuffled among them."""
    moved = np.flatnonzero(rng.random(pop_e.shape[0]) >= keep)
    out_e = pop_e.copy()
    out_e[moved] = pop_e[moved[rng.permutation(moved.shape[0])]]
    return out_e


def synthetic_trace(
    *,
    num_experts: int,
    top_k: int,
    num_layers: int,
    num_tokens: int,
    seq_len: int,
    skew: float = 0.0,
    correlation: float = 0.0,
    layer_correlation: float = 0.0,
    seed: int = 0,
    max_units: int | None = None,
    unit_size: int | None = None,
) -> RoutingTrace:
    """A RoutingTrace drawn from the model in the module docstring.

    Arrays: ``expert_ids`` int16 [L, T, K], ``weights`` float32 [L, T, K],
    ``seq_id``/``pos`` int32 [T]; no scores. ``max_units`` and ``unit_size`` (both or
    neither) confine each token to ``max_units`` contiguous blocks of ``unit_size``
    experts (GPUs or nodes). The same arguments give the same trace.
    """
    _require(_is_int(num_experts) and 1 <= num_experts < 2**15, "num_experts", num_experts,
             "1..32767")
    _require(_is_int(top_k) and 1 <= top_k <= num_experts, "top_k", top_k,
             f"1..{num_experts} (num_experts)")
    _require(_is_int(num_layers) and num_layers >= 1, "num_layers", num_layers, "an integer >= 1")
    _require(_is_int(num_tokens) and num_tokens >= 1, "num_tokens", num_tokens, "an integer >= 1")
    _require(_is_int(seq_len) and seq_len >= 1, "seq_len", seq_len, "an integer >= 1")
    _check_size(num_layers, num_tokens, top_k)
    _require(_is_real(skew) and 0 <= skew <= _MAX_SKEW, "skew", skew, f"0..{_MAX_SKEW:g}")
    _require(_is_real(correlation) and 0 <= correlation < 1, "correlation", correlation,
             "0 <= correlation < 1")
    _require(_is_real(layer_correlation) and 0 <= layer_correlation < 1, "layer_correlation",
             layer_correlation, "0 <= layer_correlation < 1")
    _require(_is_int(seed) and seed >= 0, "seed", seed, "an integer >= 0")
    if (max_units is None) != (unit_size is None):
        field = "unit_size" if unit_size is None else "max_units"
        raise InputError("max_units and unit_size come together", field=field,
                         allowed="both set, or both None")
    if unit_size is not None:
        divisors = ", ".join(str(d) for d in range(1, num_experts + 1) if num_experts % d == 0)
        _require(_is_int(unit_size) and unit_size >= 1 and num_experts % unit_size == 0,
                 "unit_size", unit_size, f"divisors of num_experts: {divisors}")
        n_units = num_experts // unit_size
        lo = -(-top_k // unit_size)
        _require(_is_int(max_units) and lo <= max_units <= n_units, "max_units", max_units,
                 f"{lo}..{n_units} (max_units x unit_size >= top_k)")

    rng = np.random.default_rng(seed)
    token_t = np.arange(num_tokens)
    seq_t = (token_t // seq_len).astype(np.int32)
    pos_t = (token_t % seq_len).astype(np.int32)
    pop_e = expert_popularity(num_experts, assignment="zipf" if skew > 0 else "uniform",
                              zipf_exponent=float(skew), rng=rng)
    ids_ltk = np.empty((num_layers, num_tokens, top_k), dtype=np.int16)
    weights_ltk = np.empty((num_layers, num_tokens, top_k), dtype=np.float32)
    for layer in range(num_layers):
        if layer:
            pop_e = _carry_over(pop_e, layer_correlation, rng)
        fresh_t = (pos_t == 0) | (rng.random(num_tokens) >= correlation)
        ids_fk = sample_topk(pop_e, n_tokens=int(fresh_t.sum()), top_k=top_k, rng=rng,
                             unit_size=unit_size, max_units=max_units)
        # A re-using token copies the latest fresh token before it; first tokens of
        # sequences are always fresh, so no copy crosses a sequence boundary.
        ids_ltk[layer] = ids_fk[np.cumsum(fresh_t) - 1]
        raw_tk = rng.exponential(size=(num_tokens, top_k))
        weights_ltk[layer] = -np.sort(-raw_tk / raw_tk.sum(axis=1, keepdims=True), axis=1)

    parameters = {
        "num_experts": num_experts, "top_k": top_k, "num_layers": num_layers,
        "num_tokens": num_tokens, "seq_len": seq_len, "skew": float(skew),
        "correlation": float(correlation), "layer_correlation": float(layer_correlation),
        "seed": int(seed), "max_units": max_units, "unit_size": unit_size,
    }
    metadata = {
        "num_experts": num_experts,
        "top_k": top_k,
        "layer_indices": list(range(num_layers)),
        "gate": {"kind": "synthetic", "weights": "dirichlet-1-sorted"},
        "source": {"kind": "synthetic", "generator": GENERATOR, "parameters": parameters},
    }
    return RoutingTrace(expert_ids=ids_ltk, weights=weights_ltk, seq_id=seq_t, pos=pos_t,
                        metadata=metadata)


# ------------------------------------------------------------------------------ fit


def _inclusion(pop_e: np.ndarray, top_k: int) -> np.ndarray:
    """Approximate probability ``pi_e`` that a fresh top-K draw contains expert ``e``.

    Sequential sampling without replacement picks the ``K`` smallest of independent
    ``Exp(p_e)`` clocks; replacing the K-th clock by a constant ``tau`` with
    ``sum_e (1 - exp(-p_e tau)) = K`` gives ``pi_e = 1 - exp(-p_e tau)`` (within about 1%
    of the exact load CV for E >= 16; heavy experts saturate at 1, which is why the
    loads are flatter than the popularity).
    """
    n_experts = pop_e.shape[0]
    if top_k >= n_experts:
        return np.ones(n_experts)
    lo, hi = 0.0, 1.0
    while np.sum(-np.expm1(-pop_e * hi)) < top_k:
        hi *= 2.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if np.sum(-np.expm1(-pop_e * mid)) < top_k:
            lo = mid
        else:
            hi = mid
    return -np.expm1(-pop_e * hi)


def _zipf(n_experts: int, skew: float) -> np.ndarray:
    weight_e = np.arange(1, n_experts + 1, dtype=np.float64) ** -skew
    return weight_e / weight_e.sum()


def _model_cv(n_experts: int, top_k: int, skew: float) -> float:
    """Expected load CV over experts of the generator's fresh draws at ``skew``."""
    pi_e = _inclusion(_zipf(n_experts, skew), top_k)
    return float(pi_e.std() / pi_e.mean())


def _skew_for_cv(cv: float, n_experts: int, top_k: int) -> float:
    """The Zipf exponent whose expected load CV is ``cv`` (bisection; CV rises with skew)."""
    if cv <= 0 or top_k >= n_experts:
        return 0.0
    lo, hi = 0.0, _MAX_SKEW
    if _model_cv(n_experts, top_k, hi) <= cv:
        return hi
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _model_cv(n_experts, top_k, mid) < cv:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _half_shares(trace: RoutingTrace) -> tuple[np.ndarray, np.ndarray]:
    """Expert shares ``a_le``, ``b_le`` of two token halves with independent noise.

    Whole sequences go to alternate halves, so token correlation never links them; a
    trace with one sequence is cut in the middle instead.
    """
    n_experts = trace.num_experts
    _, seq_index_t = np.unique(trace.seq_id, return_inverse=True)
    if seq_index_t.max(initial=0) >= 1:
        half_t = seq_index_t % 2 == 1
    else:
        half_t = np.argsort(np.argsort(trace.pos, kind="stable")) >= trace.num_tokens // 2
    shares = []
    for mask_t in (~half_t, half_t):
        share_le = np.zeros((trace.num_layers, n_experts))
        for layer in range(trace.num_layers):
            ids = trace.expert_ids[layer, mask_t]
            count_e = expert_loads(ids, n_experts).astype(np.float64)
            share_le[layer] = count_e / max(count_e.sum(), 1.0)
        shares.append(share_le)
    return shares[0], shares[1]


def _cov(x_le: np.ndarray, y_le: np.ndarray) -> np.ndarray:
    """Covariance over experts, per layer [L]."""
    return ((x_le - x_le.mean(axis=1, keepdims=True))
            * (y_le - y_le.mean(axis=1, keepdims=True))).mean(axis=1)


def _token_correlation(trace: RoutingTrace) -> float:
    """``(r - c) / (1 - c)``: ``r`` the share of consecutive same-sequence tokens with
    identical expert sets, ``c`` that share among random far-apart token pairs."""
    set_ltk = np.sort(trace.expert_ids, axis=2)
    order = np.lexsort((trace.pos, trace.seq_id))
    seq_t, pos_t = trace.seq_id[order], trace.pos[order]
    consecutive = (seq_t[1:] == seq_t[:-1]) & (pos_t[1:] == pos_t[:-1] + 1)
    first, second = order[:-1][consecutive], order[1:][consecutive]
    if first.size == 0:
        return 0.0
    same = (set_ltk[:, first] == set_ltk[:, second]).all(axis=2).mean()

    # A fixed seed keeps the fit a pure function of the trace.
    other = np.random.default_rng(0).permutation(trace.num_tokens)
    far = (trace.seq_id != trace.seq_id[other]) \
        | (np.abs(trace.pos - trace.pos[other]) >= _CHANCE_MIN_DISTANCE)
    idx = np.flatnonzero(far)
    chance = (set_ltk[:, idx] == set_ltk[:, other[idx]]).all(axis=2).mean() if idx.size else 0.0
    if chance >= 1.0:
        return 0.0
    return float((same - chance) / (1.0 - chance))


def fit_synthetic(trace: RoutingTrace) -> SyntheticParams:
    """Estimate the generator parameters that best describe ``trace``.

    * ``skew``: split the tokens into two halves (alternate sequences) and take the
      covariance over experts of the halves' expert shares, averaged over layers: it
      estimates the variance of the true load shares free of sampling noise. Its CV is
      matched to the generator's expected load CV at Zipf exponent ``skew`` (with the
      top-K saturation of popular experts taken into account, see ``_inclusion``).
    * ``correlation``: ``(r - c) / (1 - c)`` with ``r`` the share of consecutive
      same-sequence token pairs whose expert sets are identical and ``c`` the chance
      share among random far-apart pairs, averaged over layers.
    * ``layer_correlation``: cross-half covariance of consecutive layers' shares over
      the same-layer cross-half covariance (a noise-free correlation of expert load
      between layers); 0 with one layer or when the loads show no spread beyond noise.

    Estimates are clipped to the generator's ranges (0..0.99 for the correlations).
    A device limit at generation time (``max_units``) is not estimated.
    """
    n_experts, top_k = trace.num_experts, trace.top_k
    a_le, b_le = _half_shares(trace)
    var_l = _cov(a_le, b_le)
    var = float(var_l.mean())
    skew = _skew_for_cv(n_experts * math.sqrt(max(var, 0.0)), n_experts, top_k)

    # Standard error of the variance estimate, from each half's own noise (its raw
    # variance minus the shared part); below three of them the spread is noise.
    noise_a = max(float(_cov(a_le, a_le).mean()) - var, 0.0)
    noise_b = max(float(_cov(b_le, b_le).mean()) - var, 0.0)
    stderr = math.sqrt((noise_a * noise_b + max(var, 0.0) * (noise_a + noise_b))
                       / (n_experts * trace.num_layers))
    layer_corr = 0.0
    if trace.num_layers >= 2 and var > 3 * stderr:
        cross = 0.5 * (_cov(a_le[:-1], b_le[1:]) + _cov(b_le[:-1], a_le[1:]))
        within = 0.5 * (var_l[:-1] + var_l[1:])
        layer_corr = float(cross.sum() / within.sum())

    def clip(x: float) -> float:
        return float(min(max(x, 0.0), 0.99))

    return SyntheticParams(skew=skew, correlation=clip(_token_correlation(trace)),
                           layer_correlation=clip(layer_corr))
