"""Branch and bound over a plan's search space: the cheapest setup that meets the target.

Every point of the space goes through, in order, the checks that cost nothing to the
ones that cost a simulation:

1. ``invalid``: not a valid scenario (``M`` above what ``D`` allows, say);
2. ``constraint``: more GPUs or nodes than allowed, or a topology that is not;
3. ``memory``: does not fit in GPU memory (:mod:`moesim.memory`);
4. ``unreachable``: even its step-time lower bound (:mod:`moesim.planning.bounds`)
   misses the target;
5. ``bound``: its lowest possible cost is above the best setup found so far, and its
   best possible place on the frontier is dominated by a simulated setup that meets the
   target, so it can neither win nor join the frontier.

The frontier is that of the setups that fit and meet the target (rules 1-4 remove only
setups that cannot be among them).

What is left is simulated in batches, cheapest lower bound first, re-checking rule 5
after every batch as the incumbent improves. The winner is then the brute-force
optimum over the points that fit: a pruned point could not have beaten it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from moesim.planning import frontier
from moesim.planning.spec import AT_LEAST, AT_MOST, PlanFile
from moesim.sweep.spec import SweepPoint, expand

RunBatch = Callable[[list[SweepPoint]], Iterable[tuple[SweepPoint, dict]]]
TIME_KEYS = ("expert_compute_time_s", "attention_time_s", "dispatch_time_s",
             "combine_time_s", "comm_exposed_time_s", "comm_wait_time_s")


@dataclass(kw_only=True)
class Candidate:
    """One point of the search space and what the search learnt of it."""

    point: SweepPoint
    status: str = "pending"  # invalid, constraint, memory, unreachable, bound, simulated...
    reason: str = ""
    gpus: int = 0
    step_lb_s: float = math.nan
    tokens_per_s_ub: float = math.nan
    cost_lb: float = math.nan
    memory_gib: float = math.nan
    row: dict | None = None

    @property
    def ok(self) -> bool:
        """Simulated with results."""
        return self.row is not None and not self.row.get("error")


@dataclass(kw_only=True)
class PlanResult:
    """The outcome of a plan: every candidate, the winner (``None`` if nothing meets the
    target), runners-up, the frontier and the reasons in words."""

    plan: PlanFile
    mode: str
    candidates: list[Candidate]
    winner: Candidate | None
    runners_up: list[Candidate]
    frontier: list[Candidate]
    explanation: list[str] = field(default_factory=list)

    @property
    def simulated(self) -> int:
        return sum(1 for c in self.candidates if c.row is not None)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.candidates:
            out[c.status] = out.get(c.status, 0) + 1
        return out


def target_values(mode: str, *, tokens_per_s: float, gpus: int,
                  step_s: float) -> dict[str, float]:
    """A step's values of the target keys; its time is the TTFT in prefill and the TPOT
    in decode (as the summary reports them)."""
    out = {"tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": tokens_per_s / gpus,
           "step_time_s": step_s}
    if mode == "prefill":
        out["ttft_s"] = step_s
    elif mode == "decode":
        out["tpot_s"] = step_s
    return out


def _metric(plan: PlanFile, row: dict) -> dict[str, float]:
    """A simulated row's values of the target keys, and its cost."""
    return target_values(row["mode"], tokens_per_s=row["tokens_per_s"], gpus=row["gpus"],
                         step_s=row["step_time_s"]) | {
        "cost": plan.cost.of(row["gpus"], row["tokens_per_s"])}


def misses(plan: PlanFile, values: dict[str, float]) -> list[str]:
    """The target bounds ``values`` miss, in words (empty: meets the target)."""
    out = []
    for key, bound in plan.target.given().items():
        value = values.get(key)
        if value is None:
            out.append(f"{key} is not reported in this mode")
        elif key in AT_LEAST and value < bound:
            out.append(f"{key} {value:.4g} < {bound:.4g}")
        elif key in AT_MOST and value > bound:
            out.append(f"{key} {value:.4g} > {bound:.4g}")
    return out


def _screen(plan: PlanFile, candidate: Candidate) -> None:
    """Rules 1-4 (module doc), and the candidate's bounds."""
    from moesim.config.loading import scenario_from_dict
    from moesim.memory.model import memory_per_gpu
    from moesim.planning.bounds import step_bound

    point = candidate.point
    if point.scenario is None:
        candidate.status, candidate.reason = "invalid", point.error or "invalid"
        return
    scenario = scenario_from_dict(point.scenario, source=f"point {point.index}")
    c = plan.constraints
    candidate.gpus = gpus = scenario.parallel.total_gpus
    if c.topologies is not None and scenario.topology not in c.topologies:
        candidate.status = "constraint"
        candidate.reason = f"topology {scenario.topology} is not allowed"
        return
    if c.max_gpus is not None and gpus > c.max_gpus:
        candidate.status, candidate.reason = "constraint", f"{gpus} GPUs > {c.max_gpus}"
        return
    memory = memory_per_gpu(scenario)
    candidate.memory_gib = memory.total_gib
    if c.memory and not memory.fits:
        candidate.status = "memory"
        candidate.reason = (f"{memory.total_gib:.1f} GiB per GPU > "
                            f"{memory.capacity_gib:.0f} GiB")
        return
    bound = step_bound(scenario)
    if c.max_nodes is not None and bound.nodes > c.max_nodes:
        candidate.status = "constraint"
        candidate.reason = f"{bound.nodes} nodes > {c.max_nodes}"
        return
    candidate.step_lb_s = bound.step_s
    candidate.tokens_per_s_ub = bound.tokens_per_s
    candidate.cost_lb = plan.cost.of(gpus, bound.tokens_per_s)
    missed = misses(plan, target_values(scenario.mode, tokens_per_s=bound.tokens_per_s,
                                        gpus=gpus, step_s=bound.step_s))
    if missed:
        candidate.status = "unreachable"
        candidate.reason = "even at its lower bound: " + "; ".join(missed)


def _coords(mode: str, plan: PlanFile, c: Candidate, *, bound: bool) -> tuple[float, float]:
    if bound:
        return frontier.coordinates(mode, cost=c.cost_lb, tokens_per_s=c.tokens_per_s_ub,
                                    gpus=c.gpus, step_s=c.step_lb_s)
    row = c.row
    return frontier.coordinates(mode, cost=plan.cost.of(row["gpus"], row["tokens_per_s"]),
                                tokens_per_s=row["tokens_per_s"], gpus=row["gpus"],
                                step_s=row["step_time_s"])


def _rank_key(plan: PlanFile, c: Candidate) -> tuple[float, float, int]:
    m = _metric(plan, c.row)
    return m["cost"], -m["tokens_per_s"], c.point.index


def _meets(plan: PlanFile, c: Candidate) -> bool:
    return c.ok and not misses(plan, _metric(plan, c.row))


def search(plan: PlanFile, *, source: str, run_batch: RunBatch, batch_size: int = 2,
           progress: Callable[[int, int], None] | None = None) -> PlanResult:
    """Run the branch and bound (module doc); ``run_batch`` simulates a list of points
    (:func:`moesim.sweep.run.simulate_point` on some executor) and ``progress`` hears
    (simulated so far, still open) after every batch."""
    candidates = [Candidate(point=p) for p in expand(plan, source=source)]
    for c in candidates:
        _screen(plan, c)
    modes = [c.point.scenario["mode"] for c in candidates if c.point.scenario]
    _check_target_modes(plan, set(modes), source=source)
    mode = modes[0] if modes else "train"
    open_ = sorted((c for c in candidates if c.status == "pending"),
                   key=lambda c: (c.cost_lb, c.step_lb_s, c.point.index))
    while True:
        winners = sorted((c for c in candidates if _meets(plan, c)),
                         key=lambda c: _rank_key(plan, c))
        reached = [_coords(mode, plan, c, bound=False) for c in winners]
        for c in open_:
            if winners and _prunable(plan, mode, c, winners[0], reached):
                c.status = "bound"
                c.reason = (f"lowest possible cost {c.cost_lb:.4g} is above the best found "
                            f"and its best case is dominated on the frontier")
        open_ = [c for c in open_ if c.status == "pending"]
        if not open_:
            break
        batch, open_ = open_[:batch_size], open_[batch_size:]
        by_key = {c.point.key: c for c in batch}
        for point, row in run_batch([c.point for c in batch]):
            c = by_key[point.key]
            c.row = row
            c.status = "simulated" if not row.get("error") else "failed"
            c.reason = row.get("error") or ""
        if progress is not None:
            progress(sum(1 for c in candidates if c.row is not None), len(open_))
    return _result(plan, mode, candidates)


MODE_TARGETS = {"ttft_s": ("prefill",), "tpot_s": ("decode",)}


def _check_target_modes(plan: PlanFile, modes: set[str], *, source: str) -> None:
    """A target no searched mode reports (TTFT of a training step, say) is a mistake."""
    from moesim.errors import InputError

    for key, wanted in MODE_TARGETS.items():
        if key in plan.target.given() and modes and not modes & set(wanted):
            raise InputError(f"no searched setup reports {key} (mode {', '.join(sorted(modes))})",
                             field=f"target.{key}", source=source,
                             allowed=f"plans of mode {' or '.join(wanted)}")


def _prunable(plan: PlanFile, mode: str, c: Candidate, best: Candidate,
              reached: list[tuple[float, float]]) -> bool:
    """Rule 5: ``c`` can neither beat ``best`` nor reach the frontier."""
    best_cost, best_tps = _metric(plan, best.row)["cost"], best.row["tokens_per_s"]
    cannot_win = c.cost_lb > best_cost or (c.cost_lb == best_cost
                                           and c.tokens_per_s_ub <= best_tps)
    if not cannot_win:
        return False
    corner = _coords(mode, plan, c, bound=True)
    return any(r[0] >= corner[0] and r[1] >= corner[1] for r in reached)


def _result(plan: PlanFile, mode: str, candidates: list[Candidate]) -> PlanResult:
    done = [c for c in candidates if c.ok]
    for c in done:
        missed = misses(plan, _metric(plan, c.row))
        c.status = "simulated" if not missed else "misses target"
        c.reason = "; ".join(missed)
    ranked = sorted((c for c in done if _meets(plan, c)), key=lambda c: _rank_key(plan, c))
    # The frontier of the setups that fit and meet the target: rule 4 leaves out only
    # setups that cannot meet it, so none of those is missing.
    coords = [_coords(mode, plan, c, bound=False) for c in ranked]
    front = [ranked[i] for i in frontier.pareto(coords)]
    winner = ranked[0] if ranked else None
    result = PlanResult(plan=plan, mode=mode, candidates=candidates, winner=winner,
                        runners_up=ranked[1:1 + plan.top], frontier=front)
    result.explanation = list(_explain(result))
    return result


def describe(values: dict[str, Any]) -> str:
    """A point's axis values in words: ``parallel.ep=64, routing.max_devices=4``."""
    return ", ".join(f"{k}={'none' if v is None else v}" for k, v in values.items())


def _explain(result: PlanResult) -> Iterator[str]:
    """Why the winner wins, in sentences a user can check against the tables."""
    plan, counts = result.plan, result.counts()
    total = len(result.candidates)
    pruned = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())
                       if s not in ("simulated", "misses target", "failed"))
    yield (f"Searched {total} setups: simulated {result.simulated}"
           + (f", pruned without simulating: {pruned}" if pruned else "") + ".")
    w = result.winner
    if w is None:
        fits = [c for c in result.candidates if c.status not in ("invalid", "memory",
                                                                 "constraint")]
        if not fits and counts.get("memory"):
            smallest = min((c for c in result.candidates if c.status == "memory"),
                           key=lambda c: c.memory_gib)
            yield (f"No setup fits in GPU memory; the smallest needs {smallest.memory_gib:.1f}"
                   f" GiB per GPU ({describe(smallest.point.values)}).")
        elif result.simulated == 0:
            yield ("Nothing was left to simulate: every setup was pruned for the reasons "
                   "counted above (plan.parquet gives each one's).")
        else:
            yield "No simulated setup meets the target."
        return
    unit = plan.cost.unit
    wm = _metric(plan, w.row)
    cost = f"{wm['cost']:,.0f}" if wm["cost"] >= 100 else f"{wm['cost']:.4g}"
    yield (f"Winner: {describe(w.point.values)}: cost {cost} {unit}, "
           f"{wm['tokens_per_s']:,.0f} tokens/s ({wm['tokens_per_s_per_gpu']:,.0f} per GPU), "
           f"step {wm['step_time_s']:.4g} s.")
    if not result.runners_up:
        yield "It is the only simulated setup that meets the target."
        return
    r = result.runners_up[0]
    rm = _metric(plan, r.row)
    gap = rm["cost"] / wm["cost"] - 1
    slower = 1 - rm["tokens_per_s"] / wm["tokens_per_s"]
    if gap == 0:
        yield (f"Next best: {describe(r.point.values)}, at the same cost with {slower:.2%} "
               f"fewer tokens/s ({rm['tokens_per_s_per_gpu']:,.0f} per GPU).")
    else:
        yield (f"Next best: {describe(r.point.values)}, {gap:+.2%} cost "
               f"({rm['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU).")
    diffs = {k: r.row[k] - w.row[k] for k in TIME_KEYS if k in w.row and k in r.row}
    if diffs and max(abs(d) for d in diffs.values()) < 1e-3 * w.row["step_time_s"]:
        yield "Their steps take the same time; the cost alone separates them."
    elif diffs:
        key = max(diffs, key=lambda k: abs(diffs[k]))
        yield (f"The largest difference in their step is {key.removesuffix('_time_s')} "
               f"time: {w.row[key]:.4g} s against {r.row[key]:.4g} s.")
    if plan.seeds < 2:
        yield ("One seed per setup: the spread over routing draws is unknown (set seeds: 2 "
               "or more to see whether the ranking is within noise).")
    else:
        spread = math.hypot(w.row.get("tokens_per_s_std", 0.0),
                            r.row.get("tokens_per_s_std", 0.0))
        delta = abs(w.row["tokens_per_s"] - r.row["tokens_per_s"])
        if plan.cost.metric == "gpus" and w.gpus != r.gpus:
            pass  # different sizes: the cost gap is exact, not a matter of noise
        elif delta <= 2 * spread:
            yield (f"Within noise: their tokens/s differ by {delta:,.0f}, less than twice "
                   f"their combined standard deviation over {plan.seeds} seeds (2 x "
                   f"{spread:,.0f}); both are equally good choices.")
        else:
            yield (f"Outside noise: their tokens/s differ by {delta:,.0f}, more than twice "
                   f"their combined standard deviation over {plan.seeds} seeds (2 x "
                   f"{spread:,.0f}).")
