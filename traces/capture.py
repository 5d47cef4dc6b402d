"""Routing capture from our own :class:`TinyMoELM` on held-out text.

The model runs in eval mode without gradients; for every MoE layer the trace keeps the
gate's final decision (ids after any capacity dropping, ``-1`` = dropped, and the
weights the experts were multiplied by), the full affinities before any selection bias,
and, for DeepSeek-V3 gates, the bias itself.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

import numpy as np
import torch

import moesim
from moesim.errors import InputError
from moesim.tracefile.format import RoutingTrace
from moesim.traces.corpus import Corpus, heldout_sequences, load_corpus
from moesim.traces.model import TinyMoELM, default_gate_config, gate_metadata, tiny_config

__all__ = ["capture_heldout", "capture_own", "default_gate_config", "tiny_config"]

_MAX_ROWS_PER_FORWARD = 64  # 8k tokens at seq_len 128: memory stays small


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index or 0} {torch.cuda.get_device_name(device)}"
    return device.type


def capture_own(
    model: TinyMoELM,
    tokens_bt: np.ndarray | torch.Tensor,
    *,
    seq_ids: np.ndarray | torch.Tensor | None = None,
    corpus: dict[str, Any] | None = None,
    num_tokens: int | None = None,
) -> RoutingTrace:
    """Route ``tokens_bt`` int [B, S] through ``model`` and record every MoE layer.

    ``seq_ids`` [B] names each row's sequence in the trace (default ``0..B-1``);
    ``corpus`` describes where the text came from; ``num_tokens`` keeps only the first
    tokens in row-major order (causal attention: the kept ones never saw the rest).
    """
    config = model.config
    tokens = torch.as_tensor(tokens_bt).long()
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise InputError(
            f"tokens have shape {tuple(tokens.shape)}",
            field="tokens_bt",
            allowed="[sequences, tokens], not empty",
        )
    if tokens.min() < 0 or tokens.max() >= config.vocab_size:
        raise InputError(
            f"token ids {int(tokens.min())}..{int(tokens.max())}",
            field="tokens_bt",
            allowed=f"0..{config.vocab_size - 1}",
        )
    batch, seq_len = tokens.shape
    rows = np.arange(batch) if seq_ids is None else np.asarray(seq_ids).reshape(-1)
    if rows.shape != (batch,):
        raise InputError(
            f"{rows.shape[0]} sequence ids for {batch} rows",
            field="seq_ids",
            allowed="one id per row",
        )
    kept = batch * seq_len if num_tokens is None else num_tokens
    if not 1 <= kept <= batch * seq_len:
        raise InputError(
            f"{num_tokens} tokens of {batch * seq_len}",
            field="num_tokens",
            allowed=f"1..{batch * seq_len}",
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_layer: list[list[Any]] = [[] for _ in model.moe_layers]
    try:
        with torch.no_grad():
            # Capacity (when the gate has one) is per forward, as in training: chunks of
            # rows are the capture's micro-batches.
            for start in range(0, batch, _MAX_ROWS_PER_FORWARD):
                chunk = tokens[start : start + _MAX_ROWS_PER_FORWARD].to(device)
                for layer, gate_out in enumerate(model(chunk).gates):
                    routing = gate_out.routing
                    per_layer[layer].append(
                        (
                            routing.ids_tk.cpu(),
                            routing.weights_tk.float().cpu(),
                            routing.scores_te.float().cpu(),
                        )
                    )
    finally:
        model.train(was_training)

    def stacked(index: int) -> np.ndarray:
        return np.stack(
            [torch.cat([part[index] for part in parts]).numpy()[:kept] for parts in per_layer]
        )

    biases = [
        layer.gate.bias.detach().float().cpu().numpy()
        for layer in model.moe_layers
        if config.gate.kind == "group-limited-sigmoid"
    ]
    training = dict(model.train_info) if model.train_info else None
    if training is not None:
        training.pop("corpus", None)  # the corpus block below says it once
    train_corpus = (model.train_info or {}).get("corpus")
    metadata = {
        "num_experts": config.num_experts,
        "top_k": config.top_k,
        "layer_indices": config.moe_layer_indices,
        "gate": gate_metadata(config.gate),
        "source": {
            "kind": "own-model",
            "model": "TinyMoELM",
            "config": config.to_dict(),
            "trained": training is not None,
            "training": training,
        },
        "corpus": {
            "capture": corpus if corpus is not None else {"kind": "unspecified"},
            "training": train_corpus,
        },
        "tokens_from": "text",
        "seq_len": seq_len,
        "rows_per_forward": min(batch, _MAX_ROWS_PER_FORWARD),
        "device": _device_name(device),
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "moesim_version": moesim.__version__,
    }
    return RoutingTrace(
        expert_ids=stacked(0).astype(np.int16),
        weights=stacked(1).astype(np.float32),
        scores=stacked(2).astype(np.float32),
        bias=np.stack(biases).astype(np.float32) if biases else None,
        seq_id=np.repeat(rows, seq_len).astype(np.int32)[:kept],
        pos=np.tile(np.arange(seq_len), batch).astype(np.int32)[:kept],
        metadata=metadata,
    )


def capture_heldout(
    model: TinyMoELM,
    *,
    num_tokens: int,
    corpus: Corpus | None = None,
) -> RoutingTrace:
    """Capture ``num_tokens`` tokens of the corpus' held-out files, in sequences of the
    model's ``seq_len`` taken consecutively from the start of the held-out text."""
    if num_tokens < 1:
        raise InputError(f"{num_tokens} tokens", field="num_tokens", allowed=">= 1")
    corpus = corpus if corpus is not None else load_corpus()
    seq_len = model.config.seq_len
    rows = -(-num_tokens // seq_len)
    tokens_bt = heldout_sequences(corpus.heldout, num_sequences=rows, seq_len=seq_len)
    heldout = corpus.metadata.get("heldout", {})
    described = {
        key: value for key, value in corpus.metadata.items() if key not in ("train", "heldout")
    }
    used = rows * seq_len
    files, start = [], 0
    for name, size in zip(heldout.get("file_list", []), heldout.get("file_bytes", []), strict=True):
        if start >= used:
            break
        files.append(name)
        start += size
    described.update(
        part="heldout", files=files, bytes_used=used, heldout_sha256=heldout.get("sha256")
    )
    return capture_own(model, tokens_bt, corpus=described, num_tokens=num_tokens)
