"""Stories about traffic: how many token copies cross which links, per dispatch kernel.

The three kernels (docs/routing.md section 7):

* ``deepep-normal`` sends a token once per destination *node* over RDMA (to the GPU
  with the same local index there), which forwards it over NVLink to the GPUs of that
  node holding its experts; inside its own node it goes over NVLink;
* ``deepep-low-latency`` sends one copy per (token, expert);
* ``nccl-alltoall`` sends one copy per (token, destination GPU).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import moesim
from moesim.comm.traffic import LinkLoads, bytes_per_copy, dispatch_loads
from moesim.config.kernels import KERNEL_NAMES
from moesim.network.analytical import exchange_time
from moesim.routing.batch import RoutedBatch, count_batch
from moesim.routing.synthetic import expert_popularity, sample_topk
from moesim.routing.synthetic_layers import synthetic_counts
from moesim.topologies import load_topology

LINK_FIELDS = ("nvl_out", "nvl_in", "nic_out", "nic_in", "up", "down")


def uniform_batch(*, n_experts, top_k, ep, tokens_per_rank, seed,
                  unit_size=None, max_units=None) -> RoutedBatch:
    rng = np.random.default_rng(seed)
    popularity = expert_popularity(n_experts, assignment="uniform", zipf_exponent=0.0, rng=rng)
    ids = sample_topk(popularity, n_tokens=ep * tokens_per_rank, top_k=top_k, rng=rng,
                      unit_size=unit_size, max_units=max_units)
    return RoutedBatch(ids_tk=ids, kept_tk=np.ones(ids.shape, dtype=bool),
                       tokens_per_rank=tokens_per_rank)


def write_cluster(path: Path, *, nic_GBps: float = 50, gpus_per_domain: int = 8,
                  rails: int = 8, kind: str = "multi-plane") -> Path:
    """An h800-cluster-like topology file; only the arguments change."""
    spines = "spines_per_plane: 4" if kind == "multi-plane" else "spines: 2"
    path.write_text(f"""\
schema: moesim.topology/1
name: {path.stem}
source: test
gpu: h800
gpus_per_domain: {gpus_per_domain}
default_gpus: {2 * gpus_per_domain}
max_gpus: 2048
links:
  nvlink: {{bandwidth_GBps: 200, efficiency: 0.8, latency_us: 0.5}}
  nic: {{bandwidth_GBps: {nic_GBps}, efficiency: 0.9, latency_us: 1.0}}
  uplink: {{efficiency: 0.9, latency_us: 0.25}}
fabric:
  kind: {kind}
  rails: {rails}
  domains_per_leaf: 32
  {spines}
  oversubscription: 1.0
""")
    return path


# ---------------------------------------------------------------- the DeepEP formula


def expected_remote_nodes(n_experts: int, top_k: int, n_nodes: int) -> float:
    """Remote nodes a token reaches when its K experts are K of E drawn uniformly and
    experts fill nodes contiguously: each of the n-1 other nodes is missed only if all
    K experts avoid its E/n experts, with probability C(E - E/n, K) / C(E, K)."""
    miss = math.comb(n_experts - n_experts // n_nodes, top_k) / math.comb(n_experts, top_k)
    return (n_nodes - 1) * (1 - miss)


def test_deepep_normal_rdma_bytes_match_the_closed_form():
    """K=6 of E=64 experts, 4 nodes of 8 H800s, 4096 tokens per rank: each rank sends
    tokens x (n-1) x (1 - C(E-E/n, K)/C(E, K)) copies over RDMA in expectation
    (= 2.509 copies per token).

    A token's remote-node count lies in 0..3, so its standard deviation is at most 1.5
    and the mean over 32 x 4096 tokens has a standard error below 1.5/362 = 0.004
    copies (0.17%); a 1% tolerance is six standard errors.
    """
    n_experts, top_k, ep, tokens = 64, 6, 32, 4096
    topology = load_topology("h800-cluster", gpus=ep)
    counts = count_batch(uniform_batch(n_experts=n_experts, top_k=top_k, ep=ep,
                                       tokens_per_rank=tokens, seed=0),
                         n_experts=n_experts, ep=ep, gpus_per_node=8)
    loads = dispatch_loads(counts, kernel="deepep-normal", topology=topology, first_gpu=0,
                           gpus_per_node=8)
    per_copy = bytes_per_copy("deepep-normal", hidden=7168, dtype="fp8", dispatch=True)
    assert per_copy == 7168 + 7168 // 128 * 4  # 7392 bytes: FP8 + one fp32 scale per 128

    expected = tokens * expected_remote_nodes(n_experts, top_k, 4) * per_copy
    rdma_per_rank = loads.scaled(per_copy).nic_out
    assert rdma_per_rank.mean() == pytest.approx(expected, rel=0.01)
    # Every rank alone is still within a few percent (4096 tokens: SE < 0.9%).
    assert np.allclose(rdma_per_rank, expected, rtol=0.05)
    # The multi-plane fabric needs no PXN hop: the RDMA peer has the same local index.
    assert loads.nic_in.sum() == loads.nic_out.sum()


def _rdma_scenario(*, mode: str, num_layers: int) -> moesim.Scenario:
    return moesim.scenario_from_dict({
        "name": "rdma-story",
        "mode": mode,
        "seed": 3,
        # DeepSeek-V2-Lite: E = 64, K = 6, hidden 2048; the first layer is dense.
        "model": {"preset": "deepseek-v2-lite", "num_layers": num_layers},
        "topology": "h800-cluster",
        "parallel": {"ep": 32, "tokens_per_gpu": 2048, "dispatch_kernel": "deepep-normal",
                     "dispatch_dtype": "fp8", "combine_dtype": "bf16"},
        # One routing draw, reused by every MoE layer: every exchange moves the same copies.
        "routing": {"gate": "softmax-topk", "layer_samples": 1},
    })


def _rdma_story(*, mode: str, num_layers: int) -> moesim.SimResult:
    return moesim.simulate(_rdma_scenario(mode=mode, num_layers=num_layers))


def test_step_rdma_bytes_are_per_exchange_bytes_times_exchanges():
    """Through ``moesim.simulate``: with one routing draw shared by all MoE layers every
    exchange moves the same C copies over RDMA (combine reverses dispatch, and bytes
    out = bytes in), so the step's RDMA bytes are C x the bytes per copy summed over
    the step's exchanges:

    * inference, L MoE layers: L x C x (fp8 dispatch 2112 + bf16 combine 4096);
    * training adds the backward combine and dispatch in BF16: L x C x (2112 + 3 x 4096);
    * twice the MoE layers, twice the bytes.

    And C itself matches the closed form (2048 tokens x 32 ranks; SE 0.25%, 2% bound).
    """
    fp8, bf16 = 2048 + 2048 // 128 * 4, 2 * 2048
    inference = _rdma_story(mode="inference", num_layers=3).summary
    train = _rdma_story(mode="train", num_layers=3).summary
    deeper = _rdma_story(mode="inference", num_layers=5).summary

    # C, replayed from the scenario's seed with the same routing and traffic functions.
    scenario = _rdma_scenario(mode="inference", num_layers=3)
    ((_, _, counts),) = synthetic_counts(scenario, gpus_per_domain=8,
                                         rng=np.random.default_rng(scenario.seed))
    copies = dispatch_loads(counts,
                            kernel="deepep-normal", first_gpu=0, gpus_per_node=8,
                            topology=load_topology("h800-cluster", gpus=32)).nic_total

    assert inference["rdma_bytes"] == pytest.approx(2 * copies * (fp8 + bf16), rel=1e-12)
    assert train["rdma_bytes"] == pytest.approx(2 * copies * (fp8 + 3 * bf16), rel=1e-12)
    assert deeper["rdma_bytes"] == pytest.approx(2 * inference["rdma_bytes"], rel=1e-12)

    per_rank_per_token = copies / (32 * 2048)
    assert per_rank_per_token == pytest.approx(expected_remote_nodes(64, 6, 4), rel=0.02)


# ---------------------------------------------------------------- M = 1


def test_node_limit_m1_sends_each_token_over_rdma_at_most_once():
    """With M = 1 (node-sized units: 16 experts per node) a token's experts all sit on
    one node, so it crosses RDMA at most once: checked per token on the routing, and
    per rank on the RDMA copies (<= tokens per rank)."""
    n_experts, top_k, ep, tokens, per_node = 64, 6, 32, 1024, 8
    batch = uniform_batch(n_experts=n_experts, top_k=top_k, ep=ep, tokens_per_rank=tokens,
                          seed=1, unit_size=n_experts // 4, max_units=1)
    node_of_expert = batch.ids_tk // (n_experts // 4)
    source_node = (np.arange(ep * tokens) // tokens) // per_node
    for t in range(ep * tokens):
        remote = set(node_of_expert[t].tolist()) - {int(source_node[t])}
        assert len(remote) <= 1, f"token {t} reaches remote nodes {remote}"

    counts = count_batch(batch, n_experts=n_experts, ep=ep, gpus_per_node=per_node)
    loads = dispatch_loads(counts, kernel="deepep-normal",
                           topology=load_topology("h800-cluster", gpus=ep), first_gpu=0,
                           gpus_per_node=per_node)
    assert (loads.nic_out <= tokens).all()
    # A token stays home with probability 1/4, so about 3/4 of the tokens travel.
    assert loads.nic_out.sum() == pytest.approx(0.75 * ep * tokens, rel=0.03)


# ---------------------------------------------------------------- bandwidth


@pytest.mark.parametrize("kernel", ["deepep-low-latency", "nccl-alltoall"])
def test_doubling_nic_bandwidth_halves_an_rdma_bound_exchange(tmp_path, kernel):
    """Two cluster files identical but for the NIC (50 vs 100 GB/s). For an exchange
    whose busiest link is a NIC even at 100 GB/s, the time beyond the fixed latency
    halves, and the latency does not change."""
    slow = load_topology(write_cluster(tmp_path / "slow.yaml", nic_GBps=50), gpus=32)
    fast = load_topology(write_cluster(tmp_path / "fast.yaml", nic_GBps=100), gpus=32)
    counts = count_batch(uniform_batch(n_experts=64, top_k=6, ep=32, tokens_per_rank=1024,
                                       seed=2), n_experts=64, ep=32, gpus_per_node=8)
    nbytes = bytes_per_copy(kernel, hidden=7168, dtype="fp8", dispatch=True)
    loads = dispatch_loads(counts, kernel=kernel, topology=slow, first_gpu=0,
                           gpus_per_node=8).scaled(nbytes)
    assert np.array_equal(loads.nic_out, dispatch_loads(
        counts, kernel=kernel, topology=fast, first_gpu=0, gpus_per_node=8
    ).scaled(nbytes).nic_out)

    t_slow = exchange_time(loads, slow, overhead_s=10e-6)
    t_fast = exchange_time(loads, fast, overhead_s=10e-6)
    assert t_slow.bottleneck == t_fast.bottleneck == "nic"
    assert t_fast.latency_s == t_slow.latency_s
    transfer_slow = t_slow.seconds - t_slow.latency_s
    transfer_fast = t_fast.seconds - t_fast.latency_s
    assert transfer_fast == pytest.approx(transfer_slow / 2, rel=1e-12)
    # ... and the transfer is the busiest NIC's bytes at 90% of the nominal rate.
    busiest = max(loads.nic_out.max(), loads.nic_in.max())
    assert transfer_slow == pytest.approx(busiest / 45e9, rel=1e-12)


def test_exchange_time_latency_counts_each_link_class_used():
    """NVLink-only traffic pays the overhead plus one NVLink hop; add a NIC and its hop
    is added too; no traffic at all costs just the overhead."""
    topo = load_topology("h800-cluster", gpus=16)
    zero = LinkLoads.zeros(16, topo.n_leaves)
    assert exchange_time(zero, topo, overhead_s=5e-6).seconds == pytest.approx(5e-6)

    nvl = np.zeros(16)
    nvl[0] = 160e9 * 1e-3  # one millisecond at 160 GB/s achievable
    only_nvlink = LinkLoads(nvl_out=nvl, nvl_in=nvl[::-1].copy(), nic_out=np.zeros(16),
                            nic_in=np.zeros(16), up=zero.up, down=zero.down)
    t = exchange_time(only_nvlink, topo, overhead_s=5e-6)
    assert t.bottleneck == "nvlink"
    assert t.latency_s == pytest.approx(5e-6 + 0.5e-6)
    assert t.seconds == pytest.approx(1e-3 + 5.5e-6)

    with_nic = LinkLoads(nvl_out=nvl, nvl_in=nvl[::-1].copy(), nic_out=nvl / 10,
                         nic_in=nvl[::-1] / 10, up=zero.up, down=zero.down)
    assert exchange_time(with_nic, topo, overhead_s=5e-6).latency_s == pytest.approx(6.5e-6)


def test_crossing_the_spines_adds_two_uplink_hops():
    """On the rail-optimized SuperPOD another rail is reached leaf -> spine -> leaf:
    DeepEP low-latency (one RDMA put per expert, straight from the source's NIC) across
    nodes pays overhead + NVLink (same-node peers) + NIC + 2 x 0.25 us uplink hops."""
    topo = load_topology("dgx-h100-superpod", gpus=16)
    counts = count_batch(uniform_batch(n_experts=64, top_k=6, ep=16, tokens_per_rank=64,
                                       seed=5), n_experts=64, ep=16, gpus_per_node=8)
    loads = dispatch_loads(counts, kernel="deepep-low-latency", topology=topo, first_gpu=0,
                           gpus_per_node=8)
    assert loads.spine_total > 0
    t = exchange_time(loads.scaled(1000), topo, overhead_s=5e-6)
    assert t.latency_s == pytest.approx(5e-6 + 0.5e-6 + 1.0e-6 + 2 * 0.25e-6)


def test_nccl_pxn_keeps_cross_node_traffic_on_one_rail():
    """NCCL's PXN moves a copy over NVLink to the source node's GPU on the destination's
    rail first, so two nodes under the same rail leaves never touch a spine, and every
    NIC copy has the extra NVLink hop unless the rails already match."""
    topo = load_topology("dgx-h100-superpod", gpus=16)
    counts = count_batch(uniform_batch(n_experts=64, top_k=6, ep=16, tokens_per_rank=64,
                                       seed=5), n_experts=64, ep=16, gpus_per_node=8)
    loads = dispatch_loads(counts, kernel="nccl-alltoall", topology=topo, first_gpu=0,
                           gpus_per_node=8)
    assert loads.spine_total == 0
    cross_node = counts.reach_gpu_sg[:8, 8:].sum() + counts.reach_gpu_sg[8:, :8].sum()
    same_rail = sum(counts.reach_gpu_sg[i, 8 + i] + counts.reach_gpu_sg[8 + i, i]
                    for i in range(8))
    same_node = counts.reach_gpu_sg[:8, :8].sum() + counts.reach_gpu_sg[8:, 8:].sum() - (
        np.trace(counts.reach_gpu_sg))
    assert loads.nic_total == cross_node
    assert loads.nvlink_total == same_node + cross_node - same_rail


# ---------------------------------------------------------------- conservation


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize(("topology", "gpus"),
                         [("h800-cluster", 32), ("dgx-h100-superpod", 16), ("h800-node", 8)])
def test_bytes_sent_equal_bytes_received_per_link_class(kernel, topology, gpus):
    """Every copy that leaves a GPU over NVLink enters one over NVLink, and likewise for
    NICs and leaf uplinks/downlinks; the combine is the same exchange reversed."""
    topo = load_topology(topology, gpus=gpus)
    counts = count_batch(uniform_batch(n_experts=64, top_k=6, ep=gpus, tokens_per_rank=256,
                                       seed=3), n_experts=64, ep=gpus,
                         gpus_per_node=min(gpus, 8))
    loads = dispatch_loads(counts, kernel=kernel, topology=topo, first_gpu=0,
                           gpus_per_node=min(gpus, 8))
    assert loads.nvl_out.sum() == loads.nvl_in.sum() > 0
    assert loads.nic_out.sum() == loads.nic_in.sum()
    assert loads.up.sum() == loads.down.sum()
    if topology == "dgx-h100-superpod":
        # Rail-optimized: another rail is reached through the spines, unless the kernel
        # stays on one rail (DeepEP normal by design, NCCL through PXN).
        assert (loads.up.sum() > 0) == (kernel == "deepep-low-latency")
    if topology == "h800-node":
        assert loads.nic_out.sum() == 0  # one node: NVLink only, for every kernel

    back = loads.reversed()
    for out_name, in_name in [("nvl_out", "nvl_in"), ("nic_out", "nic_in"), ("up", "down")]:
        assert np.array_equal(getattr(back, out_name), getattr(loads, in_name))
        assert np.array_equal(getattr(back, in_name), getattr(loads, out_name))


# ---------------------------------------------------------------- a hand-made batch


@pytest.fixture()
def tiny_topology(tmp_path):
    """2 nodes x 2 GPUs; one leaf joins all four NICs (no spines)."""
    path = write_cluster(tmp_path / "tiny.yaml", gpus_per_domain=2, rails=1,
                         kind="rail-optimized")
    topo = load_topology(path, gpus=4)
    assert topo.n_domains == 2 and topo.n_leaves == 1 and topo.n_spines == 0
    return topo


@pytest.fixture()
def tiny_counts():
    """8 experts on 4 GPUs (expert e on GPU e // 2; GPUs 0,1 = node 0, GPUs 2,3 = node 1),
    K = 2, two tokens per rank::

        rank 0: t0 -> {2, 3} (both on GPU 1)    t1 -> {4, 6} (GPUs 2 and 3)
        rank 1: t2 -> {0, 2} (GPU 0 and self)  t3 -> {6, 7} (both on GPU 3)
        rank 2: t4 -> {4, 5} (both on self)    t5 -> {0, 7} (GPUs 0 and 3)
        rank 3: t6 -> {1, 2} (GPUs 0 and 1)    t7 -> {4, 5} (both on GPU 2)
    """
    ids = np.array([[2, 3], [4, 6], [0, 2], [6, 7], [4, 5], [0, 7], [1, 2], [4, 5]])
    batch = RoutedBatch(ids_tk=ids, kept_tk=np.ones(ids.shape, dtype=bool), tokens_per_rank=2)
    return count_batch(batch, n_experts=8, ep=4, gpus_per_node=2)


def test_hand_made_batch_counts(tiny_counts):
    c = tiny_counts
    assert c.routed == 16
    assert c.kept_e.tolist() == [2, 1, 3, 1, 3, 2, 2, 2]
    assert c.pairs_sg.tolist() == [[0, 2, 1, 1], [1, 1, 0, 2], [1, 0, 2, 1], [1, 1, 2, 0]]
    assert c.reach_gpu_sg.tolist() == [[0, 1, 1, 1], [1, 1, 0, 1], [1, 0, 1, 1],
                                       [1, 1, 1, 0]]
    assert c.reach_node_sn.tolist() == [[1, 1], [1, 1], [1, 2], [1, 1]]


def _loads(counts, kernel, topology) -> dict[str, list[float]]:
    loads = dispatch_loads(counts, kernel=kernel, topology=topology, first_gpu=0,
                           gpus_per_node=2)
    return {name: getattr(loads, name).tolist() for name in LINK_FIELDS}


def test_nccl_alltoall_sends_one_copy_per_token_and_destination_gpu(tiny_counts, tiny_topology):
    """NVLink: t0 0->1, t2 1->0, t5 2->3, t7 3->2 (one copy although t0 and t7 have two
    experts there). NIC: t1 0->2, 0->3; t3 1->3; t5 2->0; t6 3->0, 3->1."""
    loads = _loads(tiny_counts, "nccl-alltoall", tiny_topology)
    assert loads["nvl_out"] == [1, 1, 1, 1]
    assert loads["nvl_in"] == [1, 1, 1, 1]
    assert loads["nic_out"] == [2, 1, 1, 2]
    assert loads["nic_in"] == [2, 1, 1, 2]
    assert loads["up"] == loads["down"] == [0]


def test_deepep_low_latency_sends_one_copy_per_token_and_expert(tiny_counts, tiny_topology):
    """Same batch, one copy per (token, expert) not on the source GPU: 13 copies instead
    of nccl's 10. Peers in the node get NVLink copies (t0 0->1 x2, t2 1->0, t5 2->3,
    t7 3->2 x2); the rest go over RDMA (t1 0->2, 0->3; t3 1->3 x2; t5 2->0; t6 3->0, 3->1).
    """
    loads = _loads(tiny_counts, "deepep-low-latency", tiny_topology)
    assert loads["nvl_out"] == [2, 1, 1, 2]
    assert loads["nvl_in"] == [1, 2, 2, 1]
    assert loads["nic_out"] == [2, 2, 1, 2]
    assert loads["nic_in"] == [2, 1, 1, 3]
    assert sum(loads["nvl_out"]) + sum(loads["nic_out"]) == 13


def test_deepep_normal_sends_once_per_node_then_forwards(tiny_counts, tiny_topology):
    """Same batch. RDMA once per (token, remote node), to the same local index:
    t1 0->2, t3 1->3, t5 2->0, t6 3->1. The receiver forwards over NVLink to the other
    expert GPUs of its node: t1 2->3 and t6 1->0. Plus the in-node copies of nccl."""
    loads = _loads(tiny_counts, "deepep-normal", tiny_topology)
    assert loads["nic_out"] == [1, 1, 1, 1]
    assert loads["nic_in"] == [1, 1, 1, 1]
    assert loads["nvl_out"] == [1, 2, 2, 1]
    assert loads["nvl_in"] == [2, 1, 1, 2]


def test_dropped_assignments_do_not_travel(tiny_topology):
    """A dropped (token, expert) assignment sends nothing: t1 keeps only expert 4, so its
    copy to GPU 3 disappears under nccl (docs/routing.md: dropped slots are ignored)."""
    ids = np.array([[2, 3], [4, 6], [0, 2], [6, 7], [4, 5], [0, 7], [1, 2], [4, 5]])
    kept = np.ones(ids.shape, dtype=bool)
    kept[1, 1] = False
    counts = count_batch(RoutedBatch(ids_tk=ids, kept_tk=kept, tokens_per_rank=2),
                         n_experts=8, ep=4, gpus_per_node=2)
    assert counts.dropped_e.tolist() == [0, 0, 0, 0, 0, 0, 1, 0]
    loads = _loads(counts, "nccl-alltoall", tiny_topology)
    assert loads["nic_out"] == [1, 1, 1, 2]
    assert loads["nic_in"] == [2, 1, 1, 1]


# ---------------------------------------------------------------- multi-plane fabric


def test_multi_plane_crosses_nvlink_to_reach_another_rail():
    """On the 8-plane H800 cluster a NIC reaches only its own plane. nccl-alltoall from
    GPU 0 (rail 0) to GPU 9 (node 1, rail 1) goes GPU 0 -> GPU 1 over NVLink (PXN), then
    GPU 1's NIC -> GPU 9's NIC on plane 1. Every other token stays on its own GPU."""
    topo = load_topology("h800-cluster", gpus=16)
    ids = np.arange(16)[:, None].copy()  # rank r's token -> expert r (on its own GPU)
    ids[0, 0] = 9
    counts = count_batch(RoutedBatch(ids_tk=ids, kept_tk=np.ones(ids.shape, dtype=bool),
                                     tokens_per_rank=1), n_experts=16, ep=16, gpus_per_node=8)
    loads = dispatch_loads(counts, kernel="nccl-alltoall", topology=topo, first_gpu=0,
                           gpus_per_node=8)
    one_hot = {name: np.flatnonzero(getattr(loads, name)).tolist() for name in LINK_FIELDS}
    assert one_hot == {"nvl_out": [0], "nvl_in": [1], "nic_out": [1], "nic_in": [9],
                       "up": [], "down": []}
    assert loads.nvlink_total == loads.nic_total == 1


@pytest.mark.parametrize("gpus", [32, 512])
def test_multi_plane_traffic_never_leaves_its_plane(gpus):
    """With random routing on the 8-plane cluster (512 GPUs: 2 leaves and 4 spines per
    plane), nccl-alltoall's RDMA copies of each plane leave and enter NICs of that plane
    only, and its leaves' uplink traffic comes back down to leaves of the same plane."""
    topo = load_topology("h800-cluster", gpus=gpus)
    n_experts = gpus * 2
    counts = count_batch(uniform_batch(n_experts=n_experts, top_k=8, ep=gpus,
                                       tokens_per_rank=8, seed=4),
                         n_experts=n_experts, ep=gpus, gpus_per_node=8)
    loads = dispatch_loads(counts, kernel="nccl-alltoall", topology=topo, first_gpu=0,
                           gpus_per_node=8)
    assert loads.nvlink_total > 0 and loads.nic_total > 0
    for plane in range(8):
        on_plane = topo.rail_of == plane
        assert loads.nic_out[on_plane].sum() == loads.nic_in[on_plane].sum() > 0
        leaves = topo.leaf_rail == plane
        assert loads.up[leaves].sum() == loads.down[leaves].sum()
    if gpus == 512:
        assert topo.n_spines == 32 and loads.up.sum() > 0


def test_low_latency_without_nvlink_sends_every_copy_over_rdma():
    """DeepEP's --disable-nvlink: on a single-plane rail-optimized fabric every
    (token, expert) copy to another GPU leaves through the NIC, none over NVLink."""
    topo = load_topology("dgx-h100-superpod", gpus=16)
    counts = count_batch(uniform_batch(n_experts=64, top_k=6, ep=16, tokens_per_rank=64,
                                       seed=2), n_experts=64, ep=16, gpus_per_node=8)
    loads = dispatch_loads(counts, kernel="deepep-low-latency", topology=topo, first_gpu=0,
                           gpus_per_node=8, ll_nvlink=False)
    to_others = counts.pairs_sg.sum() - np.trace(counts.pairs_sg)
    assert loads.nvlink_total == 0
    assert loads.nic_total == to_others
