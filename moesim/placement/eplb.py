"""Redundant-expert placement in the manner of DeepSeek's EPLB (docs/routing.md section 6).

Given each logical expert's load per MoE layer, choose ``S >= E`` physical slots: which
experts get extra replicas, and which GPU holds each replica, so that GPU loads even out
(a replica carries ``load / replicas`` of its expert). Slot ``s`` lives on GPU
``s // (S / gpus)``. Two policies:

* hierarchical: pack the ``G`` expert groups (contiguous blocks of ``E / G`` experts,
  the groups a group-limited gate selects) onto the ``N`` nodes so that a group's
  experts stay on one node, then replicate the heaviest experts within each node, then
  pack each node's replicas onto its GPUs;
* global: the same with one group and one node, so replicas may land anywhere.

Pure functions on numpy arrays, one algorithm each; ties go to the lowest index.
Shapes: ``L`` layers, ``E`` logical experts, ``S`` physical slots, ``X`` the most
replicas any expert has.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, kw_only=True)
class Rebalanced:
    """A placement of every layer: ``phy2log_ls`` [L, S] the logical expert in each slot,
    ``log2phy_lex`` [L, E, X] each expert's slots (``-1`` padded), ``replicas_le`` [L, E]."""

    phy2log_ls: np.ndarray
    log2phy_lex: np.ndarray
    replicas_le: np.ndarray


def balanced_packing(weight_n: np.ndarray, packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack ``n`` items into ``packs`` packs of ``n / packs`` items each, heaviest item
    first into the lightest pack that still has room.

    Returns ``pack_n`` (the pack of each item) and ``rank_n`` (its position in the pack).
    """
    n = weight_n.shape[0]
    assert n % packs == 0, (n, packs)
    per_pack = n // packs
    pack_n = np.zeros(n, dtype=np.int64)
    rank_n = np.zeros(n, dtype=np.int64)
    if per_pack == 1:
        return np.arange(n), rank_n
    # A heap of (load, pack) pops the lightest pack, the lowest id on ties, in
    # O(log packs): a scan of every pack per item was quadratic on thousands of GPUs.
    heap = [(0.0, pack) for pack in range(packs)]
    count_p = [0] * packs
    for item in np.argsort(-weight_n, kind="stable").tolist():
        load, pack = heapq.heappop(heap)
        pack_n[item], rank_n[item] = pack, count_p[pack]
        count_p[pack] += 1
        if count_p[pack] < per_pack:  # a full pack leaves the heap
            heapq.heappush(heap, (load + float(weight_n[item]), pack))
    return pack_n, rank_n


def replicate(weight_n: np.ndarray, slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give ``n`` experts ``slots >= n`` replicas: one each, then every extra one to the
    expert whose replicas carry the most load each (``weight / replicas``).

    Returns ``expert_s`` (the expert of each slot), ``rank_s`` (its replica index) and
    ``replicas_n``.
    """
    n = weight_n.shape[0]
    assert slots >= n, (slots, n)
    expert_s = np.concatenate([np.arange(n), np.zeros(slots - n, dtype=np.int64)])
    rank_s = np.zeros(slots, dtype=np.int64)
    replicas_n = np.ones(n, dtype=np.int64)
    # A heap of (-load per replica, expert) pops the heaviest, the lowest id on ties,
    # in O(log n) per slot instead of a scan of every expert.
    heap = [(-float(w), expert) for expert, w in enumerate(weight_n.tolist())]
    heapq.heapify(heap)
    for slot in range(n, slots):
        _, expert = heapq.heappop(heap)
        expert_s[slot], rank_s[slot] = expert, replicas_n[expert]
        replicas_n[expert] += 1
        heapq.heappush(heap, (-float(weight_n[expert]) / replicas_n[expert], expert))
    return expert_s, rank_s, replicas_n


def rebalance_layer(weight_e: np.ndarray, *, slots: int, groups: int, nodes: int,
                    gpus: int) -> np.ndarray:
    """``phy2log_s`` [S] of one layer under the hierarchical policy (``groups = nodes =
    1`` is the global one)."""
    experts = weight_e.shape[0]
    assert experts % groups == 0 and groups % nodes == 0
    assert gpus % nodes == 0 and slots % gpus == 0 and slots >= experts
    per_group, per_node = experts // groups, experts // nodes
    slots_per_node, gpus_per_node = slots // nodes, gpus // nodes
    slots_per_gpu = slots // gpus

    # 1. Groups onto nodes; node n lists its experts by (group's rank in node, expert in group).
    group_load = weight_e.reshape(groups, per_group).sum(axis=1)
    node_g, rank_g = balanced_packing(group_load, nodes)
    node_local_e = np.empty(experts, dtype=np.int64)  # position among its node's experts
    for g in range(groups):
        node_local_e[g * per_group:(g + 1) * per_group] = rank_g[g] * per_group + np.arange(
            per_group)
    node_e = np.repeat(node_g, per_group)

    phy2log_s = np.empty(slots, dtype=np.int64)
    for node in range(nodes):
        in_node = np.flatnonzero(node_e == node)
        local = np.empty(per_node, dtype=np.int64)  # node-local position -> logical expert
        local[node_local_e[in_node]] = in_node
        # 2. Replicas within the node.
        expert_m, _, replicas = replicate(weight_e[local], slots_per_node)
        # 3. Replicas onto the node's GPUs, each carrying its share of its expert's load.
        gpu_m, rank_m = balanced_packing(weight_e[local][expert_m] / replicas[expert_m],
                                         gpus_per_node)
        slot_m = node * slots_per_node + gpu_m * slots_per_gpu + rank_m
        phy2log_s[slot_m] = local[expert_m]
    return phy2log_s


def rebalance(weight_le: np.ndarray, *, slots: int, groups: int, nodes: int, gpus: int,
              hierarchical: bool = True) -> Rebalanced:
    """The placement of every layer of ``weight_le`` [L, E] (loads, e.g. tokens per expert)
    on ``gpus`` GPUs in ``nodes`` nodes with ``slots`` slots in all."""
    phy2log_ls = place_layers(weight_le, slots=slots, groups=groups, nodes=nodes, gpus=gpus,
                              hierarchical=hierarchical)
    return from_phy2log(phy2log_ls, experts=np.shape(weight_le)[1])


def place_layers(weight_le: np.ndarray, *, slots: int, groups: int, nodes: int, gpus: int,
                 hierarchical: bool = True) -> np.ndarray:
    """``phy2log_ls`` [L, S] of :func:`rebalance`, before its ``log2phy`` table (whose size
    depends on the most replicas one expert got)."""
    weight_le = np.asarray(weight_le, dtype=np.float64)
    if not hierarchical:
        groups = nodes = 1
    return np.stack([rebalance_layer(w, slots=slots, groups=groups, nodes=nodes, gpus=gpus)
                     for w in weight_le])


def from_phy2log(phy2log_ls: np.ndarray, *, experts: int) -> Rebalanced:
    """``log2phy`` and replica counts of a ``phy2log_ls`` [L, S] placement."""
    layers, slots = phy2log_ls.shape
    replicas_le = np.stack([np.bincount(p, minlength=experts) for p in phy2log_ls])
    log2phy_lex = np.full((layers, experts, int(replicas_le.max(initial=1))), -1,
                          dtype=np.int64)
    for layer in range(layers):
        order = np.argsort(phy2log_ls[layer], kind="stable")  # slots by expert, then id
        expert_o = phy2log_ls[layer][order]
        first_e = np.concatenate([[0], np.cumsum(replicas_le[layer])[:-1]])
        log2phy_lex[layer, expert_o, np.arange(slots) - first_e[expert_o]] = order
    return Rebalanced(phy2log_ls=phy2log_ls, log2phy_lex=log2phy_lex, replicas_le=replicas_le)


def gpu_loads(weight_le: np.ndarray, phy2log_ls: np.ndarray, gpus: int) -> np.ndarray:
    """[L, gpus] load of each GPU when every expert's load splits evenly over its replicas."""
    weight_le = np.asarray(weight_le, dtype=np.float64)
    layers, slots = phy2log_ls.shape
    out = np.zeros((layers, gpus))
    for layer in range(layers):
        replicas_e = np.bincount(phy2log_ls[layer], minlength=weight_le.shape[1])
        per_slot = weight_le[layer][phy2log_ls[layer]] / replicas_e[phy2log_ls[layer]]
        out[layer] = per_slot.reshape(gpus, slots // gpus).sum(axis=1)
    return out
