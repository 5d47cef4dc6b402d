"""End-to-end check of moesim's serving modes against NVIDIA's measured serving runs
(aiconfigurator-core's ``systems/silicon_sample.csv``); the comparison itself is
:mod:`moesim.fidelity.silicon`, which says how each row becomes a scenario.

    python bench/silicon_check.py [--csv PATH] [--limit N] [--per-group K] [--json]

By default every usable row is simulated (aiconfigurator-core 0.12.0: 238 rows, about
25 s on 2 cores); ``--per-group K`` keeps at most K rows per (system, backend, mode),
evenly spread, and ``--limit N`` at most N in all (round-robin over the groups).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from moesim.fidelity.silicon import (
    INSTALL_HINT,
    Outcome,
    classify,
    default_csv,
    finite_json,
    format_report,
    run_case,
    sample,
    summarize,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="silicon_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", type=Path, default=None,
                        help="silicon_sample.csv (default: the installed aiconfigurator-core's)")
    parser.add_argument("--limit", type=int, default=None,
                        help="simulate at most N rows (round-robin over the groups)")
    parser.add_argument("--per-group", type=int, default=None,
                        help="at most K rows per (system, backend, mode), evenly spread")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    for flag, value in (("--limit", args.limit), ("--per-group", args.per_group)):
        if value is not None and value < 1:
            print(f"silicon_check: error: {flag} {value} (allowed: 1 or more)", file=sys.stderr)
            return 2

    from moesim.errors import InputError

    try:
        path = args.csv if args.csv is not None else default_csv()
    except InputError as err:
        print(f"silicon_check: error: {err.problem} (allowed: {INSTALL_HINT})", file=sys.stderr)
        return 2
    if not path.is_file():
        print(f"silicon_check: error: {path}: no such file (allowed: {INSTALL_HINT})",
              file=sys.stderr)
        return 2
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))

    cases, skipped, ignored = classify(rows)
    chosen = sample(cases, args.per_group, args.limit)
    out = Outcome(skipped=skipped, ignored=ignored, sampled_out=len(cases) - len(chosen))
    start = time.perf_counter()
    for case in chosen:
        why = run_case(case)
        if why is None:
            out.cases.append(case)
        else:
            out.skipped.append((case.id, why))
    seconds = time.perf_counter() - start
    options = " ".join(f"--{name} {value}" for name, value in
                       (("per-group", args.per_group), ("limit", args.limit))
                       if value is not None)
    sampling = (f"all {len(cases)} usable rows" if not out.sampled_out else
                f"deterministic sample ({options}): {len(chosen)} of {len(cases)} usable "
                "rows, stratified by (system, backend, mode)")
    summary = summarize(out)
    if args.json:
        print(json.dumps(finite_json({
            "csv": str(path), "seconds": seconds, "sampling": sampling, "summary": summary,
            "rows": [{**asdict(c), "error": c.error} for c in out.cases],
            "skipped": [{"id": i, "reason": r} for i, r in out.skipped],
        }), indent=2, default=str, allow_nan=False))
    else:
        print(format_report(out, summary, csv_path=path, seconds=seconds, sampling=sampling))
    return 0


if __name__ == "__main__":
    sys.exit(main())
