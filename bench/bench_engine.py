"""Benchmark: one DeepSeek-V3 training step (58 MoE layers, 4096 tokens per GPU) on
64, 256 and 2048 H800 GPUs. Prints wall time and peak memory per case; each case
runs in its own process so that its peak memory is its own.

    make bench            # or: python bench/bench_engine.py [GPUS ...]
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

CASES = (64, 256, 2048)
TARGET_S = {256: 5.0}  # 2-core machine target from the project's issue


def run_case(gpus: int) -> dict:
    t0 = time.perf_counter()
    import moesim

    scenario = moesim.load_scenario(
        overrides=[f"parallel.ep={min(gpus, 256)}", f"parallel.gpus={gpus}"]
    )
    t1 = time.perf_counter()
    result = moesim.simulate(scenario)
    t2 = time.perf_counter()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    s = result.summary
    return {
        "gpus": gpus, "ep": s["ep"], "ep_groups": s["ep_groups"],
        "load_s": t1 - t0, "simulate_s": t2 - t1, "peak_MB": peak_mb,
        "ops": len(result.spans), "step_time_s": s["step_time_s"],
        "tokens_per_s_per_gpu": s["tokens_per_s"] / gpus,
    }


def main(argv: list[str]) -> None:
    if argv[:1] == ["--case"]:
        print(json.dumps(run_case(int(argv[1]))))
        return
    cases = [int(a) for a in argv] or list(CASES)
    print(f"{'GPUs':>5} {'EP':>4} {'groups':>6} {'simulate':>9} {'peak mem':>9} "
          f"{'op spans':>9} {'spans/s':>9} {'target':>14} {'step':>8} {'tok/s/GPU':>9}")
    for gpus in cases:
        out = subprocess.run([sys.executable, __file__, "--case", str(gpus)], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        target = TARGET_S.get(gpus)
        vs = f"{r['simulate_s'] / target:.2f}x of {target:.0f} s" if target else "-"
        print(f"{r['gpus']:>5} {r['ep']:>4} {r['ep_groups']:>6} {r['simulate_s']:>8.2f}s "
              f"{r['peak_MB']:>7.0f}MB {r['ops']:>9,} {r['ops'] / r['simulate_s']:>9,.0f} "
              f"{vs:>14} {r['step_time_s']:>7.3f}s {r['tokens_per_s_per_gpu']:>9,.0f}",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
