"""``count_batch`` against a token-by-token count written the slow, obvious way.

The compiled loop (``moesim.routing.kernels.count_by_source``) counts every kept
assignment once per slot and GPU, and every token once per GPU and node it reaches;
slots of id -1 (dropped before a trace was recorded) count only as unknown.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.routing.batch import RoutedBatch, count_batch


def reference(ids_tk, kept_tk, *, n_slots, ep, gpus_per_node):
    per_gpu, per_source = n_slots // ep, ids_tk.shape[0] // ep
    n_nodes = max(ep // gpus_per_node, 1)
    kept_s, dropped_s = np.zeros(n_slots, int), np.zeros(n_slots, int)
    pairs, reach_gpu = np.zeros((ep, ep), int), np.zeros((ep, ep), int)
    reach_node, unknown = np.zeros((ep, n_nodes), int), 0
    for t, (ids, kept) in enumerate(zip(ids_tk.tolist(), kept_tk.tolist(), strict=True)):
        source = t // per_source
        gpus, nodes = set(), set()
        for slot, keep in zip(ids, kept, strict=True):
            if slot < 0:
                unknown += 1
            elif not keep:
                dropped_s[slot] += 1
            else:
                kept_s[slot] += 1
                gpu = slot // per_gpu
                pairs[source, gpu] += 1
                gpus.add(gpu)
                nodes.add(min(gpu // gpus_per_node, n_nodes - 1))
        for gpu in gpus:
            reach_gpu[source, gpu] += 1
        for node in nodes:
            reach_node[source, node] += 1
    return kept_s, dropped_s, pairs, reach_gpu, reach_node, unknown


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_counts_match_a_token_by_token_count(data):
    ep = data.draw(st.sampled_from([1, 2, 4, 8, 16]), label="ep")
    per_gpu = data.draw(st.integers(1, 4), label="slots per GPU")
    n_slots = ep * per_gpu
    top_k = data.draw(st.integers(1, n_slots), label="top_k")
    per_source = data.draw(st.integers(1, 12), label="tokens per source")
    gpus_per_node = min(ep, data.draw(st.sampled_from([1, 2, 4, 8]), label="per node"))
    seed = data.draw(st.integers(0, 2**16), label="seed")
    rng = np.random.default_rng(seed)
    n_tokens = ep * per_source
    ids = np.array([rng.permutation(n_slots)[:top_k] for _ in range(n_tokens)])
    ids = ids.astype(data.draw(st.sampled_from([np.int16, np.int32, np.int64]), label="dtype"))
    unknown = rng.random(ids.shape) < data.draw(st.sampled_from([0.0, 0.2]), label="unknown")
    kept = (rng.random(ids.shape) < data.draw(st.sampled_from([1.0, 0.6]), label="kept"))
    ids[unknown], kept[unknown] = -1, False
    counts = count_batch(RoutedBatch(ids_tk=ids, kept_tk=kept, tokens_per_rank=per_source),
                         n_experts=n_slots, ep=ep, gpus_per_node=gpus_per_node)
    kept_s, dropped_s, pairs, reach_gpu, reach_node, n_unknown = reference(
        ids, kept, n_slots=n_slots, ep=ep, gpus_per_node=gpus_per_node)
    assert counts.routed == ids.size
    assert np.array_equal(counts.kept_s, kept_s) and np.array_equal(counts.kept_e, kept_s)
    assert np.array_equal(counts.dropped_e, dropped_s)
    assert np.array_equal(counts.pairs_sg, pairs)
    assert np.array_equal(counts.reach_gpu_sg, reach_gpu)
    assert np.array_equal(counts.reach_node_sn, reach_node)
    assert counts.dropped_unknown == n_unknown


def test_an_id_past_the_slots_is_refused_before_the_compiled_loop():
    """The compiled loop does not check bounds: an id past the slots must stop first."""
    ids = np.array([[0, 4]], dtype=np.int16)
    with pytest.raises(AssertionError, match="past the slots"):
        count_batch(RoutedBatch(ids_tk=ids, kept_tk=np.ones(ids.shape, dtype=bool),
                                tokens_per_rank=1), n_experts=4, ep=1, gpus_per_node=1)
