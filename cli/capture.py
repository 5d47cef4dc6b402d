"""`moesim capture`: routing traces from our own small model or from HF checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moesim.cli.common import guarded, write_trace
from moesim.config.gates import GATE_NAMES
from moesim.errors import InputError

GATES = GATE_NAMES

# What a capture may ask for: a CPU training step of the small DeepSeekMoE model takes
# ~0.3 s with 64 experts, ~0.7 s with 256 and ~5 s with 1,024; capturing 262,144 tokens
# of 256 experts takes ~20 s and ~3.5 GiB (the scores are [layers, tokens, experts]).
MAX_EXPERTS = 256  # DeepSeek-V3's count; the small model is meant for a few hundred
MAX_SHARED = 16
MAX_STEPS = 10_000  # the default is 600
MAX_TOKENS = 262_144  # the held-out text has about 278,000 tokens
MAX_SEQ_LEN = 32_768
MAX_SEED = 2**32 - 1  # numpy's and torch's seeds are unsigned


def _check_range(value: int, lo: int, hi: int, flag: str, why: str = "") -> None:
    if not lo <= value <= hi:
        raise InputError(f"{value:,} is out of range", field=flag,
                         allowed=f"{lo:,} to {hi:,}{why}")


def _check_flags(*, train: bool, experts: int, top_k: int, shared: int, steps: int,
                 tokens: int, seq_len: int, seed: int) -> None:
    """Every size before anything is loaded or trained: a bad one is refused at once,
    not after minutes of training or in a torch allocation."""
    _check_range(seed, 0, MAX_SEED, "--seed")
    _check_range(tokens, 1, MAX_TOKENS, "--tokens")
    _check_range(seq_len, 1, MAX_SEQ_LEN, "--seq-len")
    if train:
        _check_range(experts, 1, MAX_EXPERTS, "--experts",
                     " for the small model; more takes seconds a step and GiBs")
        _check_range(top_k, 1, experts, "--top-k", ", the routed experts")
        _check_range(shared, 0, MAX_SHARED, "--shared")
        _check_range(steps, 1, MAX_STEPS, "--steps")


@guarded
def capture(
    out: Annotated[Path, typer.Option(help="Trace file to write (.npz).")],
    train: Annotated[bool, typer.Option(
        "--train", help="Train our small DeepSeekMoE model on the Python standard library's "
                        "source, then capture held-out text.")] = False,
    hf: Annotated[Path | None, typer.Option(
        help="Capture from this Hugging Face MoE checkpoint folder instead.")] = None,
    gate: Annotated[str, typer.Option(
        help=f"Gate of our model: {', '.join(GATES)}.")] = "group-limited-sigmoid",
    experts: Annotated[int, typer.Option(help="Routed experts of our model.")] = 64,
    top_k: Annotated[int, typer.Option(help="Experts per token of our model.")] = 6,
    shared: Annotated[int, typer.Option(help="Shared experts of our model.")] = 2,
    steps: Annotated[int, typer.Option(help="Training steps of our model.")] = 600,
    text: Annotated[Path | None, typer.Option(
        help="Text to feed an HF checkpoint through its tokenizer.")] = None,
    tokens: Annotated[int, typer.Option(help="Tokens to capture.")] = 4096,
    seq_len: Annotated[int, typer.Option(help="HF capture: tokens per sequence.")] = 512,
    device: Annotated[str, typer.Option(
        help="cpu, cuda or cuda:N: where the model runs; the trace records it.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Capture a routing trace: top-k choices, weights and full scores per MoE layer.

    Examples:

      moesim capture --train --steps 20 --tokens 512 --out runs/tiny.npz

      moesim capture --train --gate device-limited --steps 20 --tokens 512 --out runs/v2.npz

      moesim capture --hf runs/tiny-mixtral --tokens 256 --seq-len 64 --out runs/hf.npz
    """
    if (hf is None) == (not train):
        raise InputError("choose one source: --train (our model) or --hf PATH",
                         field="--train/--hf")
    _check_flags(train=train, experts=experts, top_k=top_k, shared=shared, steps=steps,
                 tokens=tokens, seq_len=seq_len, seed=seed)
    if hf is not None:
        from moesim.inputs import read_text
        from moesim.traces.hf_capture import capture_hf

        words = None if text is None else read_text(text, what="text file")
        trace = capture_hf(hf, text=words, num_tokens=tokens, seq_len=seq_len, seed=seed,
                           device=device)
    else:
        trace = _capture_own(gate=gate, experts=experts, top_k=top_k, shared=shared,
                             steps=steps, tokens=tokens, seed=seed, device=device)
    write_trace(out, trace)
    from moesim.tracefile.stats import trace_warnings

    for warning in trace_warnings(trace):
        typer.echo(f"moesim: warning: {warning}", err=True)
    typer.echo(f"wrote {out}: {trace.num_layers} MoE layers x {trace.num_tokens} tokens, "
               f"E = {trace.num_experts}, K = {trace.top_k}, "
               f"source {trace.metadata['source'].get('kind')}")


def _capture_own(*, gate, experts, top_k, shared, steps, tokens, seed, device):
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from moesim.traces.capture import capture_heldout
    from moesim.traces.hf_capture import resolve_device
    from moesim.traces.model import tiny_config
    from moesim.traces.train import train

    if gate not in GATES:
        raise InputError(f"unknown gate {gate!r}", field="--gate", allowed=", ".join(GATES))
    where = resolve_device(device)
    config = tiny_config(gate, num_experts=experts, top_k=top_k, num_shared=shared)
    columns = (TextColumn("training {task.fields[gate]}"), BarColumn(),
               TextColumn("step {task.completed}/{task.total}  loss {task.fields[loss]}"),
               TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("train", total=steps, gate=gate, loss="-")

        def progress(step, total, loss):
            bar.update(task, completed=step, loss=f"{loss:.3f}")

        model, history = train(config, steps=steps, seed=seed, progress=progress,
                               device=where)
    typer.echo(f"loss {history[0][1]:.3f} -> {history[-1][1]:.3f} over {len(history)} steps")
    return capture_heldout(model, num_tokens=tokens)
