"""`moesim trace ...`: statistics, import from training frameworks, synthetic traces."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from moesim.cli.common import guarded, write_trace
from moesim.errors import InputError

trace_app = typer.Typer(help="Routing traces (schema moesim.trace/1).", no_args_is_help=True)

# synthetic_trace's arguments, as `trace synth` spells them
_SYNTH_FLAGS = {"num_experts": "--experts", "top_k": "--top-k", "num_layers": "--layers",
                "num_tokens": "--tokens", "seq_len": "--seq-len", "skew": "--skew",
                "correlation": "--correlation", "layer_correlation": "--layer-correlation",
                "seed": "--seed"}


def _check_capacity_factor(value: float | None) -> None:
    # An infinite or astronomical factor overflows the integer capacity per device.
    from moesim.config.routing import MAX_CAPACITY_FACTOR

    if value is not None and not (math.isfinite(value) and 0 < value <= MAX_CAPACITY_FACTOR):
        raise InputError(f"got {value!r}", field="--capacity-factor",
                         allowed=f"a finite number > 0 and <= {MAX_CAPACITY_FACTOR:,}")


@trace_app.command("stats")
@guarded
def stats(
    trace: Annotated[Path, typer.Argument(help="Trace file (.npz).")],
    ep: Annotated[int, typer.Option(help="Expert-parallel size D the experts spread over.")] = 8,
    max_devices: Annotated[int | None, typer.Option(
        "--max-devices", "-m", help="M: measure tokens that reach more than M devices.")]
    = None,
    gpus_per_node: Annotated[int, typer.Option(help="GPUs per node.")] = 8,
    capacity_factor: Annotated[float | None, typer.Option(
        help="Also report the drop rate under this per-device capacity factor.")] = None,
    affinity: Annotated[bool, typer.Option(
        "--affinity", help="Also report the affinity each device limit M = 1..ep keeps "
                           "(re-routing the trace's scores).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Expert-load CV and max/mean, the f/P balance terms, devices and nodes reached.

    Examples:

      moesim trace stats traces/samples/tiny-v3.npz --ep 8 --max-devices 2

      moesim trace stats traces/samples/tiny-v3.npz --ep 8 --capacity-factor 1.0 --json

      moesim trace stats traces/samples/tiny-v1.npz --ep 8 --affinity
    """
    from moesim.tracefile.format import RoutingTrace
    from moesim.tracefile.stats import (
        affinity_by_limit,
        capacity_drop_rates,
        format_stats,
        trace_stats,
        trace_warnings,
    )

    _check_capacity_factor(capacity_factor)
    loaded = RoutingTrace.load(trace)
    for warning in trace_warnings(loaded):
        typer.echo(f"moesim: warning: {warning}", err=True)
    result = trace_stats(loaded, ep=ep, max_devices=max_devices, gpus_per_node=gpus_per_node)
    layers = result.layers.copy()
    if capacity_factor is not None:
        layers["drop_rate"] = capacity_drop_rates(loaded, ep=ep,
                                                  capacity_factor=capacity_factor)
    by_limit = affinity_by_limit(loaded, units=ep) if affinity else None
    if as_json:
        typer.echo(json.dumps({
            "num_layers": result.num_layers, "num_tokens": result.num_tokens,
            "num_experts": result.num_experts, "top_k": result.top_k, "ep": ep,
            "expert_load_cv": result.expert_load_cv, "max_over_mean": result.max_over_mean,
            "mean_devices_per_token": result.mean_devices_per_token,
            "mean_nodes_per_token": result.mean_nodes_per_token,
            "share_over_m_devices": result.share_over_m_devices,
            "share_over_m_nodes": result.share_over_m_nodes,
            "layers": json.loads(layers.reset_index().to_json(orient="records")),
            "source": loaded.metadata.get("source"),
            **({} if by_limit is None else {"affinity_by_m": json.loads(
                by_limit.reset_index().to_json(orient="records"))}),
        }, indent=1))
        return
    typer.echo(format_stats(result))
    if capacity_factor is not None:
        typer.echo(f"\ndrop rate at capacity factor {capacity_factor}: " + ", ".join(
            f"layer {i}: {r:.2%}" for i, r in zip(layers.index, layers["drop_rate"],
                                                  strict=True)))
    if by_limit is not None:
        typer.echo("\naffinity kept under a device limit M (of the unrestricted top-K, "
                   "scores re-routed):")
        typer.echo(by_limit.to_string(float_format="{:.3f}".format))


@trace_app.command("import")
@guarded
def import_(
    paths: Annotated[list[Path], typer.Argument(
        help="Megatron-Core router_trace_rank*.jsonl files, or the folder holding them.")],
    out: Annotated[Path, typer.Option(help="Trace file to write (.npz).")],
    experts: Annotated[int, typer.Option(help="Routed experts E of the model.")],
    step: Annotated[int | None, typer.Option(help="Step to import (default: the first).")]
    = None,
    include_mtp: Annotated[bool, typer.Option("--include-mtp",
                                              help="Also import MTP layers.")] = False,
    score_function: Annotated[str, typer.Option(
        help="How logits (if recorded) become scores: softmax, sigmoid, sqrtsoftplus.")]
    = "softmax",
) -> None:
    """Convert Megatron-Core router traces to moesim.trace/1, keeping source ranks.

    Reads the JSONL files Megatron-Core writes with --moe-routing-trace-path.

    Examples:

      moesim trace import runs/megatron-trace --experts 64 --out runs/megatron.npz
    """
    from moesim.tracefile.megatron import import_megatron

    trace = import_megatron(paths if len(paths) > 1 else paths[0], num_experts=experts,
                            step=step, include_mtp=include_mtp, score_function=score_function)
    write_trace(out, trace)
    typer.echo(f"wrote {out}: {trace.num_layers} layers x {trace.num_tokens} tokens, "
               f"K = {trace.top_k}, E = {trace.num_experts}")


@trace_app.command("synth")
@guarded
def synth(
    out: Annotated[Path, typer.Option(help="Trace file to write (.npz).")],
    experts: Annotated[int, typer.Option(help="Routed experts E.")],
    top_k: Annotated[int, typer.Option(help="Experts per token K.")],
    layers: Annotated[int, typer.Option(help="MoE layers.")] = 4,
    tokens: Annotated[int, typer.Option(help="Tokens per layer.")] = 16384,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 1024,
    skew: Annotated[float | None, typer.Option(help="Zipf exponent of expert popularity.")]
    = None,
    correlation: Annotated[float | None, typer.Option(
        help="Chance a token reuses the previous token's experts.")] = None,
    layer_correlation: Annotated[float | None, typer.Option(
        help="How much expert popularity carries over between layers.")] = None,
    fit: Annotated[Path | None, typer.Option(
        help="Take skew and correlations from this captured trace (flags override).")]
    = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a synthetic trace, optionally fitted to a captured one.

    For what-ifs over expert counts that no capture has.

    Examples:

      moesim trace synth --experts 256 --top-k 8 --skew 0.8 --correlation 0.2 --out runs/s.npz

      moesim trace synth --experts 256 --top-k 8 --fit traces/samples/tiny-v3.npz --out f.npz
    """
    from moesim.tracefile.format import RoutingTrace
    from moesim.tracefile.synthesis import fit_synthetic, synthetic_trace

    params = {"skew": 0.0, "correlation": 0.0, "layer_correlation": 0.0}
    if fit is not None:
        fitted = fit_synthetic(RoutingTrace.load(fit))
        params.update({key: float(fitted[key]) for key in params})
    for key, value in (("skew", skew), ("correlation", correlation),
                       ("layer_correlation", layer_correlation)):
        if value is not None:
            params[key] = value
    try:
        trace = synthetic_trace(num_experts=experts, top_k=top_k, num_layers=layers,
                                num_tokens=tokens, seq_len=seq_len, seed=seed, **params)
    except InputError as err:  # name the flag, not the library's argument
        raise InputError(err.problem, field=_SYNTH_FLAGS.get(err.field, err.field),
                         allowed=err.allowed, source=err.source) from None
    if fit is not None:
        trace.metadata["source"]["fitted_to"] = str(fit)
    write_trace(out, trace)
    typer.echo(f"wrote {out}: " + ", ".join(f"{k} {v:.3f}" for k, v in params.items()))
