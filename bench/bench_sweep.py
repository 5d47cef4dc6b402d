"""Benchmark: sweep throughput, points per minute, on this machine's cores.

A DeepSeek-V3 training sweep over EP size and node limit (one seed per point) at 64
and 256 H800 GPUs, run as `moesim sweep` runs it (local worker processes); the issue's
goal is 1000 points per minute at 256 GPUs on 2 cores.

    make bench            # or: python bench/bench_sweep.py
"""

from __future__ import annotations

import time

GOAL_PER_MIN = {256: 1000.0}


def case(gpus: int) -> dict:
    from moesim.sweep.executors import LocalExecutor, default_workers
    from moesim.sweep.run import simulate_point
    from moesim.sweep.spec import expand, parse_sweep

    eps = [e for e in (32, 64, 128, 256) if e <= gpus]
    spec = parse_sweep({"set": [f"parallel.gpus={gpus}"],
                        "axes": {"parallel.ep": eps, "routing.max_devices": [2, 4]}},
                       source="bench")
    points = [p for p in expand(spec, source="bench") if p.scenario is not None]
    workers = default_workers()
    with LocalExecutor(workers) as pool:
        list(pool.results(simulate_point, points[:workers]))  # start the workers
        started = time.perf_counter()
        rows = [row for _, row in pool.results(simulate_point, points)]
        seconds = time.perf_counter() - started
    assert not any(row["error"] for row in rows), rows
    return {"gpus": gpus, "points": len(points), "workers": workers, "seconds": seconds,
            "per_min": len(points) / seconds * 60}


def main() -> None:
    print(f"{'GPUs':>5} {'points':>6} {'workers':>7} {'wall':>8} {'points/min':>10} "
          f"{'goal':>18}")
    for gpus in (64, 256):
        r = case(gpus)
        goal = GOAL_PER_MIN.get(gpus)
        vs = f"{r['per_min'] / goal:.3f}x of {goal:.0f}/min" if goal else "-"
        print(f"{r['gpus']:>5} {r['points']:>6} {r['workers']:>7} {r['seconds']:>7.1f}s "
              f"{r['per_min']:>10.1f} {vs:>18}", flush=True)


if __name__ == "__main__":
    main()
