"""The analytical network model with several EP groups on one fabric."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.comm.traffic import LinkLoads
from moesim.network.analytical import exchange_time
from moesim.topologies import load_topology


def nic_loads(n: int, n_leaves: int, sending: dict[int, float]) -> LinkLoads:
    out = np.zeros(n)
    for gpu, nbytes in sending.items():
        out[gpu] = nbytes
    zero = np.zeros(n_leaves)
    return LinkLoads(nvl_out=np.zeros(n), nvl_in=np.zeros(n), nic_out=out,
                     nic_in=out[::-1].copy(), up=zero, down=zero.copy())


def test_a_group_is_charged_only_for_links_it_uses():
    """Group A sends 45 MB from GPU 0, group B 450 MB from GPU 8: at 45 GB/s achievable
    per NIC, A's exchange takes 1 ms and B's 10 ms, not both 10 ms."""
    topo = load_topology("h800-cluster", gpus=16)
    a = nic_loads(16, topo.n_leaves, {0: 45e6})
    b = nic_loads(16, topo.n_leaves, {8: 450e6})
    both = a + b
    t_a = exchange_time(both, topo, overhead_s=0.0, own=a)
    t_b = exchange_time(both, topo, overhead_s=0.0, own=b)
    assert t_a.seconds - t_a.latency_s == pytest.approx(1e-3)
    assert t_b.seconds - t_b.latency_s == pytest.approx(10e-3)
    assert exchange_time(both, topo, overhead_s=0.0).seconds == pytest.approx(t_b.seconds)


def test_groups_sharing_a_link_share_its_bandwidth():
    """Two groups sending 45 MB each through GPU 0's NIC both wait 2 ms."""
    topo = load_topology("h800-cluster", gpus=16)
    a = nic_loads(16, topo.n_leaves, {0: 45e6})
    t = exchange_time(a + a, topo, overhead_s=0.0, own=a)
    assert t.seconds - t.latency_s == pytest.approx(2e-3)


def test_every_network_a_scenario_may_name_is_a_model():
    import typing

    from moesim.config.scenario import Scenario
    from moesim.network.models import NETWORK_MODELS

    named = typing.get_args(Scenario.__pydantic_fields__["network"].annotation)
    assert set(named) == set(NETWORK_MODELS)
