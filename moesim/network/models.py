"""The network models behind one interface: how long the concurrent exchanges of all EP
groups take on a topology.

A model first turns one EP group's routed counts into its *traffic* (what it needs to
know about the copies), then times the exchanges of all groups together, since they
share the fabric:

* ``analytical``: traffic is bytes per directed link (:class:`LinkLoads`); an exchange
  takes its latency plus the busiest of the links it uses, loaded by every group
  (:mod:`moesim.network.analytical`).
* ``flow``: traffic is flows over paths (:class:`FlowSet`); all groups' flows share the
  links max-min fairly, re-solved as flows finish (:mod:`moesim.network.flow`).

Both kinds of traffic have ``scaled`` (copies to bytes) and ``reversed`` (dispatch to
combine). ``Scenario.network`` names the model.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

from moesim.comm.traffic import FlowSet, LinkLoads, dispatch_flows, dispatch_loads
from moesim.network.analytical import ExchangeTime, exchange_time
from moesim.network.flow import group_exchange_times
from moesim.routing.batch import BatchCounts

Traffic = TypeVar("Traffic", LinkLoads, FlowSet)


class NetworkModel(Protocol[Traffic]):
    def traffic(self, counts: BatchCounts, *, kernel: str, topology, first_gpu: int,
                gpus_per_node: int, ll_nvlink: bool = True) -> Traffic:
        """Copies of one EP group's dispatch (see :func:`moesim.comm.traffic.dispatch_loads`)."""

    def loads(self, traffic: Traffic) -> LinkLoads:
        """Copies (or bytes) per directed link."""

    def times(self, groups: list[Traffic], total: LinkLoads, topology, *,
              overhead_s: float) -> list[ExchangeTime]:
        """Durations of concurrent exchanges, one per group (``groups`` in bytes; ``total``
        their bytes per link)."""


class Analytical:
    def traffic(self, counts, **where) -> LinkLoads:
        return dispatch_loads(counts, **where)

    def loads(self, traffic: LinkLoads) -> LinkLoads:
        return traffic

    def times(self, groups, total, topology, *, overhead_s):
        return [exchange_time(total, topology, overhead_s=overhead_s, own=g) for g in groups]


class FlowLevel:
    def traffic(self, counts, **where) -> FlowSet:
        return dispatch_flows(counts, **where)

    def loads(self, traffic: FlowSet) -> LinkLoads:
        return traffic.loads()

    def times(self, groups, total, topology, *, overhead_s):
        return group_exchange_times(groups, topology, overhead_s=overhead_s)


NETWORK_MODELS: dict[str, NetworkModel] = {"analytical": Analytical(), "flow": FlowLevel()}
