"""The balance-policy table of issue "Balance policies and expert placement": step time,
GPU load max/mean, drop rate and affinity kept under each placement, balance and
capacity policy and each device limit M, on the V3 sample trace replayed at EP64 and on
DeepSeek-V3 at 256 GPUs.

    python bench/policy_table.py [--only trace|v3]

Prints Markdown tables. Every row is a `moesim simulate` scenario with `--set` overrides
(printed beside it), so any row can be rerun from the command line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import moesim

REPO = Path(__file__).resolve().parents[1]
TRACE = str(REPO / "traces" / "samples" / "tiny-v3.npz")
# The V3 sample trace (64 experts, top-6, group-limited sigmoid gate) at EP64 over 8 nodes.
TRACE_BASE = ["model=deepseekmoe-16b", "topology=h800-cluster", f"trace={TRACE}",
              "parallel.ep=64", "parallel.tokens_per_gpu=4096", "parallel.micro_batches=2",
              "parallel.dispatch_dtype=fp8", "routing.gate=group-limited-sigmoid",
              "routing.replay=reroute", "routing.max_devices=4", "routing.limit_scope=node"]
V3_BASE = ["parallel.gpus=256", "parallel.ep=64", "routing.assignment=power-law"]

POLICIES = [
    ("contiguous", []),
    ("EPLB hierarchical R=0", ["placement.policy=eplb-hierarchical"]),
    ("EPLB hierarchical R=64", ["placement.policy=eplb-hierarchical",
                                "placement.redundant_experts=64"]),
    ("EPLB global R=0", ["placement.policy=eplb-global"]),
    ("EPLB global R=64", ["placement.policy=eplb-global", "placement.redundant_experts=64"]),
    ("aux-free bias, 1 step", ["routing.balance=aux-free-bias", "routing.balance_steps=1"]),
    ("aux-free bias, 10 steps", ["routing.balance=aux-free-bias", "routing.balance_steps=10"]),
    ("aux-free bias, 100 steps", ["routing.balance=aux-free-bias",
                                  "routing.balance_steps=100"]),
    ("capacity factor 1.0", ["routing.capacity_factor=1.0"]),
    ("capacity factor 1.25", ["routing.capacity_factor=1.25"]),
]


def row(label: str, base: list[str], extra: list[str]) -> str:
    try:
        start = time.perf_counter()
        s = moesim.simulate(moesim.load_scenario(overrides=[*base, *extra])).summary
        seconds = time.perf_counter() - start
    except moesim.InputError as err:
        return f"| {label} | refused: {err} | | | | | |"
    kept = s.get("affinity_kept")
    return (f"| {label} | {s['step_time_s'] * 1e3:.1f} | {s['max_over_mean_gpu_load']:.3f} | "
            f"{s['dropped_token_fraction']:.2%} | {'-' if kept is None else f'{kept:.3f}'} | "
            f"{s['rdma_bytes'] / 1e9:.1f} | {seconds:.1f} s |")


def table(title: str, base: list[str], extra_rows) -> None:
    print(f"\n### {title}\n\n`--set` base: `{' '.join(base)}`\n")
    print("| policy | step (ms) | GPU load max/mean | dropped | affinity kept | RDMA (GB) "
          "| wall |")
    print("|---|---|---|---|---|---|---|")
    for label, extra in extra_rows:
        print(row(label, base, extra), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("trace", "v3"), default=None)
    args = parser.parse_args(argv)
    limits = [(f"M = {m}", [f"routing.max_devices={m}"]) for m in range(1, 9)]
    if args.only in (None, "trace"):
        table("V3 sample trace (tiny-v3.npz) re-routed at EP64, 8 nodes", TRACE_BASE,
              POLICIES + limits)
    if args.only in (None, "v3"):
        table("DeepSeek-V3 training, 256 H800 GPUs (4 x EP64), power-law expert loads",
              V3_BASE, POLICIES + limits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
