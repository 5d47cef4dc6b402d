"""moesim's predictions for DeepEP benchmark settings that no shared measurement covers.

Out-of-sample check: nothing in moesim is fitted to DeepEP internode or low-latency
results. The settings follow DeepEP's own tests (tests/test_internode.py,
tests/test_low_latency.py):

* normal kernels internode: 4096 tokens per rank, hidden 7168, 256 experts, top-8,
  tokens limited to min(nodes, 4) nodes, FP8 dispatch, BF16 combine; bandwidth =
  RDMA bytes of (token, node) pairs including the rank's own node / kernel time.
* low-latency kernels: 128 tokens per rank, hidden 7168, top-8, no group limit, every
  (token, expert) copy over RDMA; latency = kernel time. The test asserts that the
  ranks divide the experts, so 288 experts where they do (EP8-EP32) and the next
  multiple of the EP size above 288 otherwise (an assumption: EP64 320, EP128 384,
  EP256 512).

    python bench/predict_deepep.py
"""

from __future__ import annotations

import math
from pathlib import Path

from moesim.fidelity.regress import simulate_run
from moesim.fidelity.runs import EpDispatchCombine, Measured, Run

TOPOLOGY = "h800-cluster"  # DeepEP's testbed: H800, one 400 Gb/s CX7 IB NIC per GPU
# Low-latency copies must all cross RDMA; the multi-plane H800 cluster can only reach
# another plane over NVLink, so those runs use a single-plane rail-optimized fabric of
# H800 nodes with the same 400 Gb/s CX7 NIC per GPU (bench/h800-rail-optimized.yaml:
# the h800 preset, calibrated on the shared reference only).
LL_TOPOLOGY = str(Path(__file__).with_name("h800-rail-optimized.yaml"))


def normal(ep: int) -> dict[str, float]:
    nodes = ep // 8
    run = Run(
        id=f"normal-ep{ep}", topology=TOPOLOGY, gpus=ep, tolerance=1.0,
        workload=EpDispatchCombine(
            kind="ep-dispatch-combine", kernel="deepep-normal", tokens_per_rank=4096,
            hidden=7168, experts=256, top_k=8, topk_groups=min(nodes, 4),
            dispatch_dtype="fp8", combine_dtype="bf16"),
        measured={"dispatch_bw_GBps": Measured(value=1, link="rdma"),
                  "combine_bw_GBps": Measured(value=1, link="rdma")},
    )
    return simulate_run(run)


def low_latency(ep: int) -> dict[str, float]:
    experts = math.ceil(288 / ep) * ep
    run = Run(
        id=f"ll-ep{ep}", topology=LL_TOPOLOGY, gpus=ep, tolerance=1.0,
        workload=EpDispatchCombine(
            kind="ep-dispatch-combine", kernel="deepep-low-latency", tokens_per_rank=128,
            hidden=7168, experts=experts, top_k=8, dispatch_dtype="fp8",
            combine_dtype="bf16", nvlink=False),
        measured={"dispatch_latency_us": Measured(value=1),
                  "combine_latency_us": Measured(value=1),
                  "dispatch_bw_GBps": Measured(value=1, link="rdma"),
                  "combine_bw_GBps": Measured(value=1, link="rdma")},
    )
    return {"experts": experts, **simulate_run(run)}


def main() -> None:
    print("DeepEP normal kernels, internode (RDMA bandwidth as DeepEP counts it)")
    print(f"{'EP':>5} {'dispatch GB/s':>14} {'combine GB/s':>13}")
    for ep in (16, 32, 64):
        r = normal(ep)
        print(f"{ep:>5} {r['dispatch_bw_GBps']:>14.1f} {r['combine_bw_GBps']:>13.1f}")
    print("\nDeepEP low-latency kernels (all copies over RDMA)")
    print(f"{'EP':>5} {'experts':>8} {'dispatch us':>12} {'GB/s':>7} "
          f"{'combine us':>11} {'GB/s':>7}")
    for ep in (8, 16, 32, 64, 128, 256):
        r = low_latency(ep)
        print(f"{ep:>5} {r['experts']:>8} {r['dispatch_latency_us']:>12.1f} "
              f"{r['dispatch_bw_GBps']:>7.1f} {r['combine_latency_us']:>11.1f} "
              f"{r['combine_bw_GBps']:>7.1f}")


if __name__ == "__main__":
    main()
