"""Train :class:`TinyMoELM` on the stdlib byte corpus, reproducibly, in minutes on a CPU.

Next-byte cross-entropy plus the gates' weighted balance losses; AdamW with a short
warm-up and cosine decay. DeepSeek-V3 gates (``bias_rate > 0``) get the
auxiliary-loss-free bias update after every optimizer step from that step's expert
loads (the final routing, after any dropping), as Megatron does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from moesim.errors import InputError
from moesim.traces.corpus import Corpus, heldout_sequences, load_corpus, training_batches
from moesim.traces.gates import expert_load
from moesim.traces.model import TinyMoEConfig, TinyMoELM

DEFAULT_STEPS = 600
DEFAULT_BATCH_SIZE = 16
DEFAULT_LR = 3e-3
_WARMUP_FRACTION = 0.05
_HELDOUT_EVAL_SEQUENCES = 16

History = list[tuple[int, float]]  # (step, next-byte cross-entropy in nats)
Progress = Callable[[int, int, float], None]  # (step done, total steps, its loss)


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    warmup = max(1, round(_WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def lm_loss(model: TinyMoELM, rows_bs1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(cross-entropy, aux loss, gate outputs) for windows of ``seq_len + 1`` bytes."""
    out = model(rows_bs1[:, :-1])
    loss = F.cross_entropy(
        out.logits_bsv.reshape(-1, out.logits_bsv.shape[-1]), rows_bs1[:, 1:].reshape(-1)
    )
    return loss, out.aux_loss, out.gates


@torch.no_grad()
def evaluate(model: TinyMoELM, tokens_bs1: torch.Tensor) -> float:
    """Mean next-byte cross-entropy on ``tokens_bs1`` [B, S + 1], in eval mode."""
    was_training = model.training
    model.eval()
    try:
        return float(lm_loss(model, tokens_bs1)[0])
    finally:
        model.train(was_training)


def train(
    config: TinyMoEConfig,
    *,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    lr: float = DEFAULT_LR,
    corpus: Corpus | None = None,
    progress: Progress | None = None,
    device: torch.device | str = "cpu",
) -> tuple[TinyMoELM, History]:
    """Train a fresh model; same arguments, same machine -> same weights and history.

    ``progress(step, steps, loss)`` is called after every step (the CLI draws a bar).
    The returned model carries ``train_info`` (steps, losses, time, corpus) for capture
    and stays on ``device`` (a GPU trains and captures the live model there).
    """
    if steps < 1 or batch_size < 1:
        raise InputError(
            f"steps={steps}, batch_size={batch_size}",
            field="steps" if steps < 1 else "batch_size",
            allowed=">= 1",
        )
    if not lr > 0:
        raise InputError(f"lr={lr}", field="lr", allowed="> 0")
    corpus = corpus if corpus is not None else load_corpus()
    torch.manual_seed(seed)
    device = torch.device(device)
    model = TinyMoELM(config).to(device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps))
    batches = training_batches(
        corpus.train, batch_size=batch_size, seq_len=config.seq_len, seed=seed
    )
    history: History = []
    started = time.perf_counter()
    for step in range(1, steps + 1):
        rows = torch.from_numpy(next(batches)).to(device)
        loss, aux_loss, gates = lm_loss(model, rows)
        optimizer.zero_grad(set_to_none=True)
        (loss + aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        for layer, gate_out in zip(model.moe_layers, gates, strict=True):
            if layer.gate.config.bias_rate > 0:
                layer.gate.update_bias(
                    expert_load(gate_out.routing.ids_tk, num_experts=config.num_experts)
                )
        history.append((step, loss.item()))
        if progress is not None:
            progress(step, steps, history[-1][1])
    seconds = time.perf_counter() - started
    eval_rows = min(_HELDOUT_EVAL_SEQUENCES, len(corpus.heldout) // (config.seq_len + 1))
    heldout_rows = torch.from_numpy(
        heldout_sequences(corpus.heldout, num_sequences=eval_rows, seq_len=config.seq_len + 1)
    ).to(device)
    model.eval()
    model.train_info = {
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "lr": lr,
        "tokens_seen": steps * batch_size * config.seq_len,
        "initial_loss": history[0][1],
        "final_loss": history[-1][1],
        "heldout_loss": evaluate(model, heldout_rows),
        "seconds": round(seconds, 2),
        "torch_threads": torch.get_num_threads(),
        "corpus": {k: v for k, v in corpus.metadata.items() if k != "heldout"},
    }
    return model, history
