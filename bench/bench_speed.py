"""Benchmark: the speed rows of the project's speed issue, each against its numpy floor.

Every case runs in its own process (its peak memory is its own) and prints wall time
(the goals judge it), the wall time of a second run in the same process (``warm``:
without the first call's imports), peak resident memory and the ratio to the floor:
one ``np.bincount`` over as many (token, expert) assignments as the case routes, the
least any routing of them costs.
The compiled routing kernels are compiled first, in a process of their own, as a first
run on a machine does once. A record of the run (date, commit, machine, every row) is
written to ``reports/bench/<date>-<commit>.json`` so that regressions show between
commits.

    make bench            # or: python bench/bench_speed.py [CASE ...]
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
V3 = ["parallel.ep=64"]  # the default scenario: DeepSeek-V3 training, 4096 tokens per GPU
CASES = {
    # name: (overrides, goal in seconds or None, what the issue measured)
    "v3-256-4draws-simpy": ([*V3, "parallel.gpus=256", "engine=simpy"], None, "2.7 s"),
    "v3-256-4draws-fast": ([*V3, "parallel.gpus=256", "engine=fast"], None, "-"),
    "v3-256-58layers-fast": ([*V3, "parallel.gpus=256", "routing.layer_samples=null",
                              "engine=fast"], 2.0, "14.5 s"),
    "v3-2048-4draws-fast": (["parallel.ep=256", "parallel.gpus=2048", "engine=fast"], None,
                            "13.5 s"),
    "v3-2048-58layers-fast": (["parallel.ep=256", "parallel.gpus=2048",
                               "routing.layer_samples=null", "engine=fast"], 20.0, "27 s"),
    "v3-256-flow-fast": ([*V3, "parallel.gpus=256", "network=flow", "engine=fast"], 60.0,
                         "over 60 s at 2048"),
    "reroute-8of58-layers": (None, 30.0 * 8 / 58, "637 s for 58 layers"),
    # The whole training step (docs/training.md): DeepSeek-V3's published layout.
    "v3-2048-whole-step-dualpipe": (["parallel.gpus=2048", "parallel.pp=16",
                                     "parallel.tokens_per_gpu=null", "parallel.micro_batches=1",
                                     "training.global_batch=15360", "training.micro_batch=1",
                                     "training.seq_len=4096", "training.schedule=dualpipe",
                                     "training.precision=fp8-block",
                                     "training.recompute=selective", "engine=fast"], None, "-"),
}


def floor_seconds(assignments: int) -> float:
    """One bincount over ``assignments`` random expert ids: the numpy floor (in chunks of
    16M ids, so that the floor's own array does not dwarf the case's memory)."""
    import numpy as np

    chunk = 1 << 24
    ids = np.random.default_rng(0).integers(0, 256, size=min(chunk, assignments))
    seconds, left = 0.0, assignments
    while left > 0:
        part = ids[: min(chunk, left)]  # native ints: no cast
        started = time.perf_counter()
        np.bincount(part, minlength=256)
        seconds += time.perf_counter() - started
        left -= part.size
    return seconds


def reroute_scenario(tmp: Path):
    """An 8-layer DeepSeek-V3-shaped trace with scores, 64 GPUs x 8192 tokens per layer,
    and its re-routing scenario (the issue's case has 58 layers: 8 of them fit in memory
    beside the rest of a run here, and the time per layer is what the goal divides).
    The trace is made in a child process, so that the case's peak memory is the run's."""
    from moesim import load_scenario

    path = tmp / "reroute.npz"
    subprocess.run([sys.executable, __file__, "--make-reroute-trace", str(path)], check=True)
    return load_scenario(overrides=[*V3, "parallel.tokens_per_gpu=8192",
                                    f"model.num_layers={3 + REROUTE_LAYERS}", f"trace={path}",
                                    "routing.replay=reroute", "engine=fast"])


REROUTE_LAYERS = 8


def make_reroute_trace(path: str) -> None:
    """Write the re-routing case's trace: uniform float16 scores, the top-8 of each
    token as its captured choices, a sigmoid gate."""
    import numpy as np

    from moesim.tracefile.format import RoutingTrace

    layers, tokens, experts, k = REROUTE_LAYERS, 64 * 8192, 256, 8
    rng = np.random.default_rng(0)
    scores = np.empty((layers, tokens, experts), dtype=np.float16)
    ids = np.empty((layers, tokens, k), dtype=np.int16)
    for layer in range(layers):  # one layer's temporaries at a time
        scores[layer] = rng.random((tokens, experts), dtype=np.float32)
        ids[layer] = np.argsort(-scores[layer], axis=-1)[:, :k]
    trace = RoutingTrace(expert_ids=ids, weights=np.take_along_axis(scores, ids, -1),
                         scores=scores, seq_id=np.arange(tokens, dtype=np.int32) // 4096,
                         pos=np.arange(tokens, dtype=np.int32) % 4096,
                         metadata={"num_experts": experts, "gate": {"kind": "sigmoid"},
                                   "source": {"kind": "bench"}})
    trace.save(path)


def run_case(name: str) -> dict:
    import tempfile

    from moesim import load_scenario, simulate

    overrides, _, _ = CASES[name]
    with tempfile.TemporaryDirectory() as tmp:
        scenario = (reroute_scenario(Path(tmp)) if overrides is None
                    else load_scenario(overrides=overrides))
        started = time.perf_counter()
        summary = simulate(scenario).summary
        seconds = time.perf_counter() - started
        # Again in the same process: without the first call's imports (numba, scipy via
        # numba, pandas, torch), as every later point of a sweep or plan runs.
        started = time.perf_counter()
        simulate(scenario)
        warm_seconds = time.perf_counter() - started
    # What the routing itself handles: every draw (or trace layer) routes one EP group's
    # tokens; the other groups reuse the draws.
    from moesim.config.training_layout import training_layout, whole_step

    p = scenario.parallel
    draws = summary.get("routing_draws", scenario.model.moe_layers)
    tokens = (training_layout(scenario).tokens_per_microbatch if whole_step(scenario)
              else p.tokens_per_gpu)  # the whole step routes one micro-batch
    assignments = draws * p.ep * tokens * scenario.model.top_k
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # before the floor
    return {"case": name, "seconds": seconds, "warm_seconds": warm_seconds,
            "assignments": assignments,
            "floor_s": floor_seconds(assignments), "peak_GiB": peak_gib,
            "step_time_s": summary["step_time_s"]}


def machine() -> dict:
    from moesim.cores import cores

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit, "python": platform.python_version(),
            "machine": platform.machine(), "cores": cores(),
            "memory_GiB": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30}


def compile_kernels() -> None:
    """Compile the routing kernels (numba) for every id type the cases use, once per
    machine: a case's time is then the run's, as on any later run."""
    import numpy as np

    from moesim.routing.batch import RoutedBatch, count_batch
    from moesim.routing.synthetic import sample_topk

    ids = sample_topk(np.full(16, 1 / 16), n_tokens=8, top_k=2, rng=np.random.default_rng(0),
                      unit_size=4, max_units=2)
    for dtype in (np.int16, np.int64):  # count_batch turns every other id type into int64
        count_batch(RoutedBatch(ids_tk=ids.astype(dtype), kept_tk=ids % 2 == 0,
                                tokens_per_rank=4), n_experts=16, ep=2, gpus_per_node=1)


def main(argv: list[str]) -> None:
    if argv[:1] == ["--compile"]:
        compile_kernels()
        return
    if argv[:1] == ["--case"]:
        print(json.dumps(run_case(argv[1])))
        return
    if argv[:1] == ["--make-reroute-trace"]:
        make_reroute_trace(argv[1])
        return
    names = argv or list(CASES)
    info = machine()
    print(f"{'case':<24} {'wall':>8} {'warm':>7} {'peak':>8} {'floor':>8} {'x floor':>9} "
          f"{'goal':>8} {'issue measured':>18}")
    subprocess.run([sys.executable, __file__, "--compile"], check=True)
    rows = []
    for name in names:
        _, goal, before = CASES[name]
        done = subprocess.run([sys.executable, __file__, "--case", name], capture_output=True,
                              text=True, timeout=900)
        if done.returncode:
            print(f"{name:<24} failed: {done.stderr.strip().splitlines()[-1]}", flush=True)
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(r | {"goal_s": goal, "issue_measured": before})
        met = "-" if goal is None else ("met" if r["seconds"] <= goal else f"{goal:.1f} s")
        print(f"{name:<24} {r['seconds']:>7.2f}s {r['warm_seconds']:>6.2f}s "
              f"{r['peak_GiB']:>6.2f}G {r['floor_s']:>7.3f}s "
              f"{r['seconds'] / r['floor_s']:>8.0f}x {met:>8} {before:>18}", flush=True)
    out = REPO / "reports" / "bench" / f"{info['date'][:10]}-{info['commit']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**info, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main(sys.argv[1:])
