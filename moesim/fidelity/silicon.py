"""End-to-end check of moesim's serving modes against NVIDIA's measured serving runs.

aiconfigurator-core (NVIDIA, Apache-2.0) ships ``systems/silicon_sample.csv``: one row
per measured deployment (SGLang or TensorRT-LLM serving a model on a GPU system), with
its layout, request shape and the measured TTFT and TPOT. This check simulates the
DeepSeek-V3 / DeepSeek-R1 (same architecture: moesim's ``deepseek-v3`` preset) FP8 rows
on the four systems moesim has topologies for and compares. **Nothing is fitted to this
file**: it is the project's out-of-sample end-to-end check; it only simulates and
compares.

    python bench/silicon_check.py [--csv PATH] [--limit N] [--per-group K] [--json]

(the script reads the CSV and prints; this module classifies, simulates and reports).

By default every usable row is simulated (aiconfigurator-core 0.12.0: 238 rows, about
25 s on 2 cores); ``--per-group K`` keeps at most K rows per (system, backend, mode),
evenly spread, and ``--limit N`` at most N in all (round-robin over the groups).

How a row becomes a scenario (``decode`` mode, the step time is the TPOT):

* Layout. In these rows ``tp_size`` is the attention tensor-parallel size of one
  attention data-parallel rank, not the GPUs of a worker: a worker has
  ``tp_size x attention_dp_size`` GPUs, and every row has
  ``moe_tp_size x moe_ep_size = tp_size x attention_dp_size`` (e.g. a decode worker of
  ``tp 1, attention_dp 32, moe_ep 32`` is 32 GPUs; ``tp 8, attention_dp 1, moe_ep 8``
  is 8), and the concurrency in every disagg row's id is ``decode_batch_size x
  decode_attention_dp_size x decode_num_workers``, so ``batch`` is per attention-DP
  rank, as moesim's ``serving.batch``. Hence ``gpus = tp x attention_dp``,
  ``attention_tp = tp``, ``ep = moe_ep``, ``moe_tp = moe_tp``.
* disagg rows: one decode worker (``decode_*`` sizes, ``decode_batch_size``); the TPOT
  is a decode step of that worker. The "TTFT" column of a disagg row is moesim's
  prefill step of ``prefill_batch_size`` prompts per rank on one prefill worker
  (``prefill_*`` sizes, DeepEP normal kernels): the measured TTFT also holds queueing,
  the KV-cache transfer and the first decode step, so it is reported beside, never in
  the headline MAPE.
* agg rows: TPOT only, a pure decode step of ``batch_size`` requests per rank. An agg
  engine mixes prefill chunks into its decode steps (they lengthen the measured TPOT,
  most with long prompts at high concurrency), so this is approximate.
* Both backends: DeepEP's low-latency kernels with FP8 dispatch, an FP8 KV cache,
  FP8 GEMMs (the preset's), no node limit on routing (as ``examples/v3-decode-h200.yaml``),
  one micro-batch. For TensorRT-LLM moesim has nothing closer: its own all-to-all
  (or all-gather / reduce-scatter) MoE communication is not modelled.
* GPUs: the topologies' own presets (``h100``, ``h200``, ``b200``, ``gb200``: fitted to
  aiconfigurator-core's measured kernel tables, never to this file).

Not in the simulated step, and so in the measured TPOT only: speculative decoding (MTP;
the CSV does not say which runs used it), sampling and the scheduler's CPU time, and an
agg engine's prefill chunks. A second table splits the MAPE by data source
(``silicon_data_source``: NVIDIA's ``db-dump`` or a collector ``source_file``).

Skipped and counted, with the reason: DeepSeek rows of another precision (FP4 is not
modelled) or system (no moesim topology), repeated measurements (the same system,
backend, mode, isl/osl, TTFT and TPOT under several ids: kept once, preferring the row
whose layout is complete), rows without a per-rank batch (disagg rows without
``decode_batch_size`` and ``decode_num_workers``), agg rows whose layout is a collector
artifact (``moe_tp x moe_ep = 8 x 8`` with ``tp x attention_dp = 64`` on an 8-GPU node:
the ids that name a layout say ``tp8 ep8``, and their measurements recur under 8-GPU
layouts), and rows moesim refuses (its InputError message). Other models' rows are
ignored.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

MODELS = ("deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-R1")
MODEL_PRESET = "deepseek-v3"
PRECISION = "fp8"
TOPOLOGIES = {
    "h100_sxm": "dgx-h100-superpod",
    "h200_sxm": "dgx-h200-superpod",
    "b200_sxm": "dgx-b200-superpod",
    "gb200": "gb200-nvl72",
}
DECODE_KERNEL = "deepep-low-latency"
PREFILL_KERNEL = "deepep-normal"
CSV_NAME = "silicon_sample.csv"
INSTALL_HINT = (f"pip install 'moesim[perfdb]' (aiconfigurator-core==0.12.0, whose "
                f"systems/{CSV_NAME} is the default), or --csv PATH to that file")


# ------------------------------------------------------------------ rows


@dataclass(frozen=True)
class Layout:
    """One worker: ``gpus = tp x dp`` GPUs, ``ep x moe_tp`` of them per MoE instance."""

    tp: int  # attention TP per attention-DP rank
    dp: int  # attention-DP ranks
    ep: int
    moe_tp: int

    @property
    def gpus(self) -> int:
        return self.tp * self.dp

    def __str__(self) -> str:
        return f"{self.gpus}g tp{self.tp}xdp{self.dp} ep{self.ep}xmtp{self.moe_tp}"


@dataclass
class Case:
    """A row to simulate."""

    id: str
    system: str
    backend: str
    mode: str
    isl: int
    osl: int
    batch: int
    decode: Layout
    tpot_ms: float
    ttft_ms: float
    prefill: Layout | None = None  # disagg: the prefill worker
    prefill_batch: int | None = None
    sim_tpot_ms: float | None = None
    sim_ttft_ms: float | None = None  # disagg: prefill step of one prefill worker
    prefill_note: str | None = None  # why the prefill step was not simulated
    source: str = ""  # the data source: db-dump, or the collector's source_file

    @property
    def group(self) -> tuple[str, str, str]:
        return self.system, self.backend, self.mode

    @property
    def error(self) -> float | None:
        if self.sim_tpot_ms is None:
            return None
        return (self.sim_tpot_ms - self.tpot_ms) / self.tpot_ms


@dataclass
class Outcome:
    cases: list[Case] = field(default_factory=list)  # simulated
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)
    ignored: int = 0  # rows of other models
    sampled_out: int = 0  # usable rows left out by --limit / --per-group


def _int(value: str) -> int | None:
    """'8.0' -> 8; '' -> None."""
    value = (value or "").strip()
    if not value:
        return None
    number = float(value)
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"not a whole number: {value!r}")
    return int(number)


def _float(value: str) -> float | None:
    value = (value or "").strip()
    return float(value) if value else None


def _layout(row: dict, prefix: str) -> Layout | None:
    sizes = [_int(row.get(f"{prefix}{name}", "")) for name in
             ("tp_size", "attention_dp_size", "moe_ep_size", "moe_tp_size")]
    if None in sizes:
        return None
    return Layout(*sizes)


def _pp(row: dict, prefix: str) -> int:
    return _int(row.get(f"{prefix}pp_size", "")) or 1


def classify(rows: list[dict]) -> tuple[list[Case], list[tuple[str, str]], int]:
    """(cases to simulate in CSV order, skipped (id, reason), rows of other models)."""
    skipped: list[tuple[str, str]] = []
    candidates: list[tuple[dict, Case | None, str | None]] = []
    ignored = 0
    for row in rows:
        rid = row.get("id", "?")
        if row.get("model_path") not in MODELS:
            ignored += 1
            continue
        precision, system = row.get("precision", ""), row.get("system", "")
        if precision != PRECISION:
            skipped.append((rid, f"precision {precision}: not modelled (FP8 rows only)"))
            continue
        if system not in TOPOLOGIES:
            skipped.append((rid, f"system {system}: no moesim topology"))
            continue
        case, why = case_from_row(row)
        candidates.append((row, case, why))

    # The same measurement under several ids: keep one, preferring a usable row.
    first: dict[tuple, str] = {}
    order = sorted(range(len(candidates)), key=lambda i: (candidates[i][1] is None, i))
    keep = [False] * len(candidates)
    for i in order:
        row, case, why = candidates[i]
        key = tuple(row.get(k, "") for k in ("system", "backend", "mode", "isl", "osl"))
        key += tuple(_same(_float(row.get(k, ""))) for k in ("silicon_ttft_ms", "silicon_tpot_ms"))
        if key in first:
            skipped.append((row.get("id", "?"), f"repeated measurement (kept {first[key]})"))
            continue
        first[key] = row.get("id", "?")
        if case is None:
            skipped.append((row.get("id", "?"), why))
            continue
        keep[i] = True
    return [c for (_, c, _), k in zip(candidates, keep, strict=True) if k], skipped, ignored


def _same(value: float | None) -> str:
    """A measured value to 9 significant digits: the copies of one measurement under
    several ids differ in the last printed digit."""
    return "" if value is None else f"{value:.9g}"


def case_from_row(row: dict) -> tuple[Case | None, str | None]:
    """The case of a DeepSeek FP8 row on a known system, or (None, why not)."""
    mode = row.get("mode", "")
    try:
        isl, osl = _int(row["isl"]), _int(row["osl"])
        tpot, ttft = _float(row["silicon_tpot_ms"]), _float(row["silicon_ttft_ms"])
        if mode == "disagg":
            decode, prefill = _layout(row, "decode_"), _layout(row, "prefill_")
            batch, pbatch = _int(row["decode_batch_size"]), _int(row["prefill_batch_size"])
            pp = max(_pp(row, "decode_"), _pp(row, "prefill_"))
        elif mode == "agg":
            decode, prefill, pbatch = _layout(row, ""), None, None
            batch, pp = _int(row["batch_size"]), _pp(row, "")
        else:
            return None, f"mode {mode!r}: not agg or disagg"
    except (KeyError, ValueError) as err:
        return None, f"unreadable row: {err}"
    if not isl or not osl or not tpot or tpot <= 0:
        return None, "no isl/osl or measured TPOT"
    if decode is None:
        return None, "layout sizes missing"
    if batch is None:
        return None, ("decode_batch_size / decode_num_workers missing: batch per rank unknown"
                      if mode == "disagg" else "batch_size missing")
    if pp != 1:
        return None, f"pipeline parallelism pp {pp}: not modelled"
    if mode == "agg" and decode.moe_tp > 1 and decode.ep > 1 and decode.gpus > 8:
        return None, (f"layout artifact: tp {decode.tp} x attention_dp {decode.dp} = "
                      f"moe_tp {decode.moe_tp} x moe_ep {decode.ep} GPUs for an agg run on "
                      "an 8-GPU node (ids say tp8 ep8; its measurements recur under 8-GPU "
                      "layouts)")
    return Case(id=row.get("id", "?"), system=row["system"], backend=row.get("backend", ""),
                mode=mode, isl=isl, osl=osl, batch=batch, decode=decode, tpot_ms=tpot,
                ttft_ms=ttft if ttft is not None else math.nan, prefill=prefill,
                prefill_batch=pbatch, source=data_source(row)), None


def data_source(row: dict) -> str:
    """``db-dump`` or ``source_file=NAME`` from ``silicon_data_source``."""
    first = (row.get("silicon_data_source") or "").split(";")[0].strip()
    return "db-dump" if first.startswith("db-dump") else first or "unknown"


def sample(cases: list[Case], per_group: int | None, limit: int | None) -> list[Case]:
    """Deterministic stratified sample: at most ``per_group`` cases per (system, backend,
    mode), spread evenly over each group's cases in CSV order; then the first ``limit``
    of the result, taken round-robin over the groups so every group keeps some."""
    groups: dict[tuple, list[Case]] = defaultdict(list)
    for case in cases:
        groups[case.group].append(case)
    chosen: dict[tuple, list[Case]] = {}
    for key, members in groups.items():
        if per_group is not None and len(members) > per_group:
            step = len(members) / per_group
            members = [members[int(i * step)] for i in range(per_group)]
        chosen[key] = members
    picked = {id(c) for c in _round_robin(chosen, limit)}
    return [c for c in cases if id(c) in picked]


def _round_robin(groups: dict[tuple, list[Case]], limit: int | None) -> list[Case]:
    out: list[Case] = []
    queues = [list(v) for _, v in sorted(groups.items())]
    while any(queues) and (limit is None or len(out) < limit):
        for q in queues:
            if q and (limit is None or len(out) < limit):
                out.append(q.pop(0))
    return out


# ------------------------------------------------------------------ simulation


def scenario(case: Case, *, prefill: bool = False):
    import moesim

    lay = case.prefill if prefill else case.decode
    data = {
        "name": f"silicon-{case.id}-{'prefill' if prefill else 'decode'}",
        "mode": "prefill" if prefill else "decode",
        "model": MODEL_PRESET,
        "topology": TOPOLOGIES[case.system],
        "parallel": {
            "ep": lay.ep, "gpus": lay.gpus, "attention_tp": lay.tp, "moe_tp": lay.moe_tp,
            "dispatch_kernel": PREFILL_KERNEL if prefill else DECODE_KERNEL,
            "dispatch_dtype": "fp8",
        },
        "routing": {"max_devices": None},
        "serving": {"batch": case.prefill_batch if prefill else case.batch,
                    "isl": case.isl, "osl": case.osl, "kv_dtype": "fp8"},
    }
    return moesim.scenario_from_dict(data, source=case.id)


def run_case(case: Case) -> str | None:
    """Simulate the case in place; the InputError message when moesim refuses it."""
    import moesim

    try:
        case.sim_tpot_ms = moesim.simulate(scenario(case)).summary["tpot_s"] * 1e3
    except moesim.InputError as err:
        return f"moesim refuses the decode layout {case.decode}: {err}"
    if case.mode == "disagg":
        if case.prefill is None or not case.prefill_batch:
            case.prefill_note = "prefill layout or batch missing"
        else:
            try:
                result = moesim.simulate(scenario(case, prefill=True))
                case.sim_ttft_ms = result.summary["ttft_s"] * 1e3
            except moesim.InputError as err:
                case.prefill_note = f"prefill {case.prefill}: {err}"
    return None


# ------------------------------------------------------------------ report


def mape(errors: list[float]) -> float:
    return 100.0 * sum(abs(e) for e in errors) / len(errors) if errors else math.nan


def summarize(out: Outcome) -> dict:
    groups: dict[tuple, list[float]] = defaultdict(list)
    signed: dict[tuple, list[float]] = defaultdict(list)
    for c in out.cases:
        groups[c.group].append(c.error)
        signed[c.group].append(c.error)
    table = [{"system": s, "backend": b, "mode": m, "rows": len(errs), "tpot_mape_pct": mape(errs),
              "median_signed_err_pct": 100.0 * _median(signed[(s, b, m)])}
             for (s, b, m), errs in sorted(groups.items())]
    every = [c.error for c in out.cases]
    by_source: dict[tuple, list[float]] = defaultdict(list)
    for c in out.cases:
        by_source[(c.source, c.backend, c.mode)].append(c.error)
    ttft = [c for c in out.cases if c.sim_ttft_ms and math.isfinite(c.ttft_ms)]
    ratios = [c.ttft_ms / c.sim_ttft_ms for c in ttft]
    return {
        "tpot_mape": table,
        "tpot_mape_overall_pct": mape(every),
        "tpot_mape_disagg_pct": mape([c.error for c in out.cases if c.mode == "disagg"]),
        "tpot_mape_agg_pct": mape([c.error for c in out.cases if c.mode == "agg"]),
        "tpot_mape_by_source": [
            {"source": src, "backend": b, "mode": m, "rows": len(errs),
             "tpot_mape_pct": mape(errs), "median_signed_err_pct": 100.0 * _median(errs)}
            for (src, b, m), errs in sorted(by_source.items())],
        "simulated": len(out.cases),
        "skipped": dict(Counter(_reason_class(r) for _, r in out.skipped).most_common()),
        "sampled_out": out.sampled_out,
        "ignored_other_models": out.ignored,
        "ttft_disagg": {
            "rows": len(ttft),
            "mape_pct": mape([(c.sim_ttft_ms - c.ttft_ms) / c.ttft_ms for c in ttft]),
            "median_measured_over_simulated": _median(ratios),
            "share_measured_over_2x_simulated": (sum(r > 2 for r in ratios) / len(ratios)
                                                 if ratios else math.nan),
        },
    }


def finite_json(obj):
    """``obj`` with NaN and infinities as None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def _median(values: list[float]) -> float:
    values = sorted(v for v in values if v is not None and math.isfinite(v))
    if not values:
        return math.nan
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def _reason_class(reason: str) -> str:
    """The reason without the row-specific tail, so that the counts group."""
    if reason.startswith("repeated measurement"):
        return "repeated measurement (kept once)"
    if reason.startswith("moesim refuses"):
        return "moesim refuses: " + reason.split(": ", 1)[1]
    if reason.startswith("layout artifact"):
        return ("layout artifact: moe_tp x moe_ep = 8 x 8 = 64 GPUs for an 8-GPU agg run "
                "(ids say tp8 ep8)")
    return reason


def format_report(out: Outcome, summary: dict, *, csv_path: Path, seconds: float,
                  sampling: str) -> str:
    """The text report: every simulated row, TPOT MAPE per group and data source, the
    disagg TTFT comparison and what was skipped."""
    lines: list[str] = []
    print = lines.append  # noqa: A001 - the report reads as the lines it prints
    print(f"moesim vs measured serving runs: {csv_path}")
    print("DeepSeek-V3/R1 FP8 on h100_sxm, h200_sxm, b200_sxm, gb200; nothing fitted to "
          "this file.")
    print(f"decode: {DECODE_KERNEL} (both backends; TensorRT-LLM's own MoE communication is "
          "not modelled), FP8 dispatch, FP8 KV cache, FP8 GEMMs; GPU specs: the topologies' "
          "presets (fitted to aiconfigurator's kernel tables, not to this file).")
    print("agg TPOT is approximate (a pure decode step; the engine mixes prefill chunks in). "
          "disagg sim TTFT = one prefill step of prefill_batch_size prompts per rank on one "
          "prefill worker (measured TTFT adds queueing and KV transfer): not in the MAPE.")
    print(sampling)
    print("")
    w = max([len(c.id) for c in out.cases] + [2])
    head = (f"{'id':<{w}} {'system':<8} {'backend':<6} {'mode':<6} {'layout':<26} "
            f"{'batch':>5} {'isl/osl':>9} {'TPOT ms':>8} {'sim ms':>7} {'err':>7} "
            f"{'TTFT ms':>9} {'sim pf ms':>9}")
    print(head)
    print("-" * len(head))
    for c in sorted(out.cases, key=lambda c: (c.group, c.id)):
        sim_ttft = f"{c.sim_ttft_ms:9.0f}" if c.sim_ttft_ms else f"{'-':>9}"
        ttft = f"{c.ttft_ms:9.0f}" if c.mode == "disagg" else f"{'-':>9}"
        print(f"{c.id:<{w}} {c.system:<8} {c.backend:<6} {c.mode:<6} "
              f"{str(c.decode):<26} {c.batch:>5} {f'{c.isl}/{c.osl}':>9} "
              f"{c.tpot_ms:8.2f} {c.sim_tpot_ms:7.2f} {100 * c.error:+6.0f}% {ttft} {sim_ttft}")
    print("")
    print("TPOT MAPE (simulated vs measured)")
    print(f"{'system':<9} {'backend':<7} {'mode':<7} {'rows':>5} {'MAPE':>7} {'median err':>11}")
    for g in summary["tpot_mape"]:
        print(f"{g['system']:<9} {g['backend']:<7} {g['mode']:<7} {g['rows']:>5} "
              f"{g['tpot_mape_pct']:6.1f}% {g['median_signed_err_pct']:+10.1f}%")
    print(f"{'overall':<25} {summary['simulated']:>5} "
          f"{summary['tpot_mape_overall_pct']:6.1f}%  "
          f"(disagg {summary['tpot_mape_disagg_pct']:.1f}%, "
          f"agg {summary['tpot_mape_agg_pct']:.1f}%)")
    print("")
    print("TPOT MAPE by data source (silicon_data_source; the CSV does not say whether a run "
          "used speculative decoding)")
    print(f"{'source':<27} {'backend':<7} {'mode':<7} {'rows':>5} {'MAPE':>7} {'median err':>11}")
    for g in summary["tpot_mape_by_source"]:
        print(f"{g['source']:<27} {g['backend']:<7} {g['mode']:<7} {g['rows']:>5} "
              f"{g['tpot_mape_pct']:6.1f}% {g['median_signed_err_pct']:+10.1f}%")
    t = summary["ttft_disagg"]
    if t["rows"]:
        print("")
        print(f"TTFT, disagg only ({t['rows']} rows; NOT in the headline): measured / simulated "
              f"prefill step median {t['median_measured_over_simulated']:.1f}x, "
              f"{100 * t['share_measured_over_2x_simulated']:.0f}% of rows over 2x; "
              f"MAPE {t['mape_pct']:.0f}% (queueing and KV transfer dominate where the ratio "
              "is large).")
    print("")
    print(f"simulated {summary['simulated']} rows in {seconds:.1f} s; "
          f"{summary['sampled_out']} usable rows left out by sampling; "
          f"{summary['ignored_other_models']} rows of other models ignored")
    print(f"skipped {sum(summary['skipped'].values())} DeepSeek rows:")
    for reason, n in summary["skipped"].items():
        print(f"  {n:>5}  {reason}")
    return "\n".join(lines)


def default_csv() -> Path:
    """The installed aiconfigurator-core's ``systems/silicon_sample.csv``."""
    from moesim.fidelity.perfdb.importer import find_data_root

    return find_data_root().parent / CSV_NAME
