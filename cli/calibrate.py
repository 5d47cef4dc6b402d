"""`moesim calibrate`: fit a GPU's GEMM efficiency curves to recorded GEMM runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from moesim.cli.common import guarded


@guarded
def calibrate(
    out: Annotated[Path, typer.Option(
        "--out", help="Hardware YAML to write (usable as `hardware: FILE` in a scenario).")],
    runs: Annotated[list[Path] | None, typer.Argument(
        help="Recorded-run YAML files or folders (default: the shipped moesim/fidelity/gpu_runs, "
             "known_gaps.yaml included). Only their GEMM runs are used.")] = None,
    base: Annotated[str, typer.Option(
        help="Hardware preset whose other fields the fitted spec keeps.")] = "h800",
    what: Annotated[Literal["gemm", "training"], typer.Option(
        "--what", help="gemm: the GEMM efficiency curves from GEMM runs; training: "
                       "backward_gemm_efficiency from the training-step runs on --base's GPU."
    )] = "gemm",
) -> None:
    """Fit the compute model's efficiency curves to recorded GEMM runs.

    Fits gemm_efficiency, gemm_m_half, memory_efficiency and memory_bytes_half by least
    squares on log relative TFLOPS error; prints parameters and MAPE before/after, and
    writes the fitted hardware spec. Calibrate on the shared reference GEMM data only.

    Examples:

      moesim calibrate --out runs/h800-fitted.yaml

      moesim calibrate moesim/fidelity/gpu_runs/deepgemm_grouped_h800.yaml --out runs/grouped.yaml

      moesim calibrate --what training --base h100 --out runs/h100-training.yaml
    """
    from moesim.cli.output import write_text
    from moesim.config.loading import hardware_preset
    from moesim.fidelity.calibrate import calibrate as fit
    from moesim.fidelity.calibrate import hardware_yaml
    from moesim.fidelity.regress import recorded_files
    from moesim.fidelity.runs import gpu_runs_dir

    if what == "training":
        from moesim.fidelity.calibrate_training import calibrate_training

        # Fitted on the shipped runs only: known gaps are what the fit should not chase.
        files = recorded_files(runs or [gpu_runs_dir()])
        hw, training = calibrate_training(files, base=hardware_preset(base))
        typer.echo(format_training_fit(training))
        write_text(out, hardware_yaml(hw))
        typer.echo(f"wrote {out}")
        return
    files = recorded_files(runs or [gpu_runs_dir()], include_known_gaps=True)
    hw, report = fit(files, base=hardware_preset(base))
    typer.echo(format_fit(report))
    write_text(out, hardware_yaml(hw))
    typer.echo(f"wrote {out}")


def format_fit(report) -> str:
    """A :class:`~moesim.fidelity.calibrate.FitReport`: the parameters before and after,
    each run's error before and after, the MAPE per file and overall."""
    from moesim.fidelity.calibrate import PARAMS
    from moesim.reports.terminal import render_table

    params = [(p, f"{report.before[p]:.6g}", f"{report.after[p]:.6g}") for p in PARAMS]
    lines = [render_table(("parameter", "before", "after"), params, width=None), ""]
    runs = [(r.run, f"{r.measured:.4g}", f"{r.before / r.measured - 1:+.1%}",
             f"{r.after / r.measured - 1:+.1%}") for r in report.rows]
    lines.append(render_table(("run", "measured (TFLOPS)", "error before", "error after"),
                              runs, width=None))
    lines.append("")
    for f, (b, a) in report.mape_by_file().items():
        lines.append(f"MAPE {Path(f).name}: {b:.1%} -> {a:.1%}")
    lines.append(f"MAPE {report.mape_before:.1%} -> {report.mape_after:.1%} over "
                 f"{len(report.rows)} GEMM run(s); {report.skipped} non-GEMM run(s) skipped")
    return "\n".join(lines)


def format_training_fit(fit) -> str:
    """A :class:`~moesim.fidelity.calibrate_training.TrainingFit`: the parameter before and
    after, each run's tokens/s error before and after, the MAPE."""
    from moesim.fidelity.calibrate_training import PARAM
    from moesim.reports.terminal import render_table

    lines = [f"{PARAM} of {fit.gpu}: {fit.before:.2f} -> {fit.after:.2f}", ""]
    rows = [(r.run, f"{r.measured:,.0f}", f"{r.before / r.measured - 1:+.1%}",
             f"{r.after / r.measured - 1:+.1%}") for r in fit.rows]
    lines.append(render_table(("run", "measured tokens/s/GPU", "error before", "error after"),
                              rows, width=None))
    lines.append(f"MAPE {fit.mape_before:.1%} -> {fit.mape_after:.1%} over {len(fit.rows)} "
                 "training step(s)")
    return "\n".join(lines)
