"""Benchmark: sweep throughput, points per minute, on this machine's cores.

A DeepSeek-V3 training sweep over EP size and node limit (one seed per point) at 64 and
256 H800 GPUs. Two figures per case: the workers alone (points simulated per minute by
warm worker processes) and `moesim sweep` end to end (process start, expanding the
points, starting the workers, writing the table). The issue's goal is 1000 points per
minute at 256 GPUs on 2 cores.

    make bench            # or: python bench/bench_sweep.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

GOAL_PER_MIN = {256: 1000.0}


def spec(gpus: int) -> dict:
    eps = [e for e in (32, 64, 128, 256) if e <= gpus]
    return {"set": [f"parallel.gpus={gpus}"],
            "axes": {"parallel.ep": eps, "routing.max_devices": [2, 4]}}


def workers_only(gpus: int) -> tuple[int, int, float]:
    from moesim.sweep.executors import LocalExecutor, default_workers
    from moesim.sweep.run import simulate_point
    from moesim.sweep.spec import expand, parse_sweep

    points = [p for p in expand(parse_sweep(spec(gpus), source="bench"), source="bench")
              if p.scenario is not None]
    workers = default_workers()
    with LocalExecutor(workers) as pool:
        list(pool.results(simulate_point, points[:workers]))  # start the workers
        started = time.perf_counter()
        rows = [row for _, row in pool.results(simulate_point, points)]
        seconds = time.perf_counter() - started
    assert not any(row["error"] for row in rows), rows
    return len(points), workers, seconds


def end_to_end(gpus: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sweep.yaml"
        path.write_text(yaml.safe_dump(spec(gpus)))
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "moesim.cli.main", "sweep", str(path), "--out",
                        str(Path(tmp) / "out")], check=True, capture_output=True)
        return time.perf_counter() - started


def main() -> None:
    print(f"{'GPUs':>5} {'points':>6} {'workers':>7} {'wall':>7} {'points/min':>10} "
          f"{'end to end':>10} {'points/min':>10} {'goal':>18}")
    for gpus in (64, 256):
        n, workers, seconds = workers_only(gpus)
        whole = end_to_end(gpus)
        goal = GOAL_PER_MIN.get(gpus)
        vs = f"{n / seconds * 60 / goal:.3f}x of {goal:.0f}/min" if goal else "-"
        print(f"{gpus:>5} {n:>6} {workers:>7} {seconds:>6.1f}s {n / seconds * 60:>10.1f} "
              f"{whole:>9.1f}s {n / whole * 60:>10.1f} {vs:>18}", flush=True)


if __name__ == "__main__":
    main()
