"""``moesim regress`` on a recorded-run table: predict every row, compare within its
tolerance, and summarise the error per system and op class, in and out of sample.

The systems' models are the shipped presets (the fitted GPU specs and the NVLink
efficiency of each system's node topology), so a table regresses exactly what
``moesim simulate`` would use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from moesim.errors import InputError
from moesim.fidelity.perfdb.fit import in_sample
from moesim.fidelity.perfdb.predict import SYSTEMS, base_model, modeled, predict


@dataclass(frozen=True, kw_only=True)
class TableReport:
    file: str
    rows: pd.DataFrame  # id, system, op, sample, measured_us, simulated_us, rel_error, ...

    @property
    def passed(self) -> bool:
        return bool(self.rows["passed"].all())

    @property
    def failed(self) -> pd.DataFrame:
        return self.rows[~self.rows["passed"]]

    @property
    def mape(self) -> float:
        return float(self.rows["rel_error"].abs().mean())

    def mape_by(self) -> pd.DataFrame:
        """MAPE and row count per (system, op, sample)."""
        g = self.rows.assign(abs_error=self.rows["rel_error"].abs()).groupby(
            ["system", "op", "sample"])
        return pd.DataFrame({"rows": g.size(), "mape": g["abs_error"].mean()}).reset_index()


def regress_table(df: pd.DataFrame, *, file: str) -> TableReport:
    """Predict every row of a validated table; every row needs a tolerance."""
    missing = df["tolerance"].isna()
    if missing.any():
        raise InputError(f"row {df['id'][missing].iloc[0]!r} has no tolerance",
                         field="tolerance", source=file,
                         allowed="a relative tolerance on every row (`moesim perfdb subset` "
                                 "sets them)")
    why = modeled(df)
    if (why != "").any():
        first = why[why != ""].index[0]
        raise InputError(f"row {df['id'][first]!r} cannot be predicted: {why[first]}",
                         field="op", source=file,
                         allowed=f"rows of the systems {', '.join(SYSTEMS)} that moesim models")
    models = {system: base_model(system) for system in df["system"].unique()}
    simulated = predict(df, models)
    rel = simulated / df["latency_us"].to_numpy() - 1.0
    rows = pd.DataFrame({
        "id": df["id"].to_numpy(), "system": df["system"].to_numpy(),
        "op": df["op"].to_numpy(),
        "sample": np.where(in_sample(df), "in", "out"),
        "measured_us": df["latency_us"].to_numpy(), "simulated_us": simulated,
        "rel_error": rel, "tolerance": df["tolerance"].to_numpy(),
    })
    rows["passed"] = np.abs(rows["rel_error"]) <= rows["tolerance"] + 1e-12
    return TableReport(file=file, rows=rows)


def format_table_report(report: TableReport) -> str:
    """MAPE per system x op class (in / out of sample), then the failed rows."""
    by = report.mape_by()
    lines = [f"{report.file}: {len(report.rows)} rows, MAPE {report.mape:.1%}", ""]
    head = f"{'system':<10} {'op':<22} {'sample':<7} {'rows':>6} {'MAPE':>7}"
    lines += [head, "-" * len(head)]
    for r in by.itertuples():
        lines.append(f"{r.system:<10} {r.op:<22} {r.sample:<7} {r.rows:>6} {r.mape:>7.1%}")
    failed = report.failed
    if len(failed):
        lines += ["", f"FAILED: {len(failed)} of {len(report.rows)} rows out of tolerance"]
        for r in failed.head(20).itertuples():
            lines.append(f"  {r.id}: measured {r.measured_us:.4g} us, simulated "
                         f"{r.simulated_us:.4g} us ({r.rel_error:+.1%}, tolerance "
                         f"{r.tolerance:.0%})")
    else:
        lines += ["", "PASSED"]
    return "\n".join(lines)
