"""Routing capture from Hugging Face MoE checkpoints on disk (transformers 5.x).

``capture_hf`` loads a local checkpoint (never the hub), feeds it text through the
checkpoint's own tokenizer (or seeded random token ids when it ships none) and records,
per MoE layer, what the model actually did:

* the final top-k ids and weights, from a forward *pre*-hook on the block's ``experts``
  module: that is what the experts really consumed, after every model-specific step
  (bias, groups, renormalisation, scaling);
* the full score matrix, from a forward hook on the router: element 0 of its output is
  the logits, and the family's score function (softmax or sigmoid) turns them into the
  affinities *before* any selection bias, so replay can re-route them;
* DeepSeek-V3's ``e_score_correction_bias``, stored separately in ``bias``.

Routers are matched by class (``isinstance``), never by module name: ``gate_proj``,
``gate_up_proj`` and Qwen2-MoE's ``shared_expert_gate`` all contain "gate" and none is a
router (each family's router class: the ``_FAMILIES`` table below).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import moesim
from moesim.errors import InputError
from moesim.tracefile.format import RoutingTrace

# Files that carry a vocabulary. AutoTokenizer happily builds an *empty* tokenizer for
# some families (Qwen2, GPT-NeoX) when none of these exist, so presence is checked here
# instead of trusting a successful load.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tiktoken.model",
    "qwen.tiktoken",
)
_BATCH_ROWS = 8  # sequences per forward pass; bounds activation memory on big models


# ------------------------------------------------------------------ families


def _deepseek_v2_gate(config: Any) -> dict[str, Any]:
    num_experts = int(config.n_routed_experts)
    params: dict[str, Any] = {
        "num_experts": num_experts,
        "top_k": int(config.num_experts_per_tok),
        "scale": float(config.routed_scaling_factor),
        # transformers multiplies by routed_scaling_factor and ignores norm_topk_prob
        "normalize": False,
        "topk_method": config.topk_method,
    }
    if config.topk_method == "greedy":
        return {"kind": "softmax-topk", "params": params}
    if config.topk_method == "group_limited_greedy":
        n_group = int(config.n_group)
        params.update(
            num_groups=n_group,
            group_size=num_experts // n_group,
            max_groups=int(config.topk_group),
            group_score="max",
        )
        return {"kind": "device-limited", "params": params}
    raise InputError(
        f"unknown DeepSeek-V2 topk_method {config.topk_method!r}",
        field="config.topk_method",
        allowed="greedy, group_limited_greedy",
    )


def _deepseek_v3_gate(config: Any) -> dict[str, Any]:
    num_experts = int(config.n_routed_experts)
    n_group = int(config.n_group)
    return {
        "kind": "group-limited-sigmoid",
        "params": {
            "num_experts": num_experts,
            "top_k": int(config.num_experts_per_tok),
            "num_groups": n_group,
            "group_size": num_experts // n_group,
            "max_groups": int(config.topk_group),
            "group_score": "top2-sum",
            "scale": float(config.routed_scaling_factor),
            "normalize": bool(config.norm_topk_prob),
        },
    }


def _softmax_gate(experts_key: str, *, always_normalize: bool = False):
    def gate(config: Any) -> dict[str, Any]:
        normalize = True if always_normalize else bool(getattr(config, "norm_topk_prob", False))
        return {
            "kind": "softmax-topk",
            "params": {
                "num_experts": int(getattr(config, experts_key)),
                "top_k": int(config.num_experts_per_tok),
                "scale": 1.0,
                "normalize": normalize,
            },
        }

    return gate


@dataclass(frozen=True, kw_only=True)
class HFFamily:
    """Where the router of one transformers MoE family lives and what its scores mean."""

    model_type: str
    router_class: str  # class name in transformers.models.<model_type>.modeling_<model_type>
    scoring: str  # "softmax" | "sigmoid": applied to the router logits (output element 0)
    gate: Callable[[Any], dict[str, Any]] = field(repr=False)
    bias_attr: str | None = None  # selection bias buffer on the router, stored apart

    def router_type(self) -> type[torch.nn.Module]:
        module = importlib.import_module(
            f"transformers.models.{self.model_type}.modeling_{self.model_type}"
        )
        return getattr(module, self.router_class)


FAMILIES: dict[str, HFFamily] = {
    family.model_type: family
    for family in (
        HFFamily(
            model_type="deepseek_v2",
            router_class="DeepseekV2TopkRouter",
            scoring="softmax",
            gate=_deepseek_v2_gate,
        ),
        HFFamily(
            model_type="deepseek_v3",
            router_class="DeepseekV3TopkRouter",
            scoring="sigmoid",
            gate=_deepseek_v3_gate,
            bias_attr="e_score_correction_bias",
        ),
        HFFamily(
            model_type="mixtral",
            router_class="MixtralTopKRouter",
            scoring="softmax",
            gate=_softmax_gate("num_local_experts", always_normalize=True),
        ),
        HFFamily(
            model_type="qwen2_moe",
            router_class="Qwen2MoeTopKRouter",
            scoring="softmax",
            gate=_softmax_gate("num_experts"),
        ),
        HFFamily(
            model_type="qwen3_moe",
            router_class="Qwen3MoeTopKRouter",
            scoring="softmax",
            gate=_softmax_gate("num_experts"),
        ),
        HFFamily(
            model_type="olmoe",
            router_class="OlmoeTopKRouter",
            scoring="softmax",
            gate=_softmax_gate("num_experts"),
        ),
    )
}
_SUPPORTED = ", ".join(sorted(FAMILIES))


# ------------------------------------------------------------------ inputs


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; CUDA without a visible GPU is an InputError."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise InputError(f"unknown device {device!r}", field="device", allowed="cpu, cuda, cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(
                f"device {device!r} asked for, but torch sees no CUDA GPU "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})",
                field="device",
                allowed="cpu",
            )
        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        count = torch.cuda.device_count()
        if index >= count:
            raise InputError(
                f"no GPU {index}; {count} visible",
                field="device",
                allowed=f"cuda:0..cuda:{count - 1}",
            )
        return torch.device("cuda", index)
    return torch.device("cpu")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index} {torch.cuda.get_device_name(device)}"
    return "cpu"


def _load_config(path: Path) -> Any:
    from transformers import AutoConfig

    if not path.exists():
        raise InputError("no such checkpoint directory", source=str(path))
    if not (path / "config.json").is_file():
        raise InputError(
            "not a Hugging Face checkpoint (no config.json)",
            source=str(path),
            allowed="a directory written by save_pretrained",
        )
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError) as err:
        raise InputError(
            f"cannot read config.json ({err})".splitlines()[0],
            source=str(path),
            field="model_type",
            allowed=f"MoE families {_SUPPORTED}",
        ) from None


def _family_for(config: Any, path: Path) -> HFFamily:
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    # Tell "an MoE family we do not hook yet" from "not an MoE model at all": 5.x model
    # classes that record router logits are MoE models.
    is_moe = any(
        hasattr(config, key)
        for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
    )
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        is_moe = is_moe or "router_logits" in getattr(model_class, "_can_record_outputs", {})
    except (KeyError, ValueError, ImportError):
        pass
    if is_moe:
        raise InputError(
            f"MoE family {model_type!r} is not supported yet",
            source=str(path),
            field="model_type",
            allowed=_SUPPORTED,
        )
    raise InputError(
        f"not an MoE model (model_type {model_type!r} has no expert router)",
        source=str(path),
        field="model_type",
        allowed=f"MoE families {_SUPPORTED}",
    )


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in _TOKENIZER_FILES)


def token_sequences(
    *,
    num_tokens: int,
    seq_len: int,
    vocab_size: int,
    seed: int,
    text_ids: Sequence[int] | None = None,
    bos_id: int | None = None,
) -> list[np.ndarray]:
    """Split ``num_tokens`` tokens into sequences of ``seq_len`` (the last may be shorter).

    With ``text_ids`` the sequences take consecutive text tokens, each led by ``bos_id``
    when the tokenizer has one (as the model saw documents in training); without, ids are
    drawn uniformly from the vocabulary by a generator seeded with ``seed``.
    """
    lengths = [seq_len] * (num_tokens // seq_len)
    if num_tokens % seq_len:
        lengths.append(num_tokens % seq_len)
    if text_ids is None:
        generator = torch.Generator().manual_seed(seed)
        flat = torch.randint(0, vocab_size, (num_tokens,), generator=generator).numpy()
        return np.split(flat.astype(np.int64), np.cumsum(lengths)[:-1])
    lead = 1 if bos_id is not None else 0
    needed = num_tokens - lead * len(lengths)
    if len(text_ids) < needed:
        raise InputError(
            f"the text gives {len(text_ids)} tokens, {needed} are needed for "
            f"{num_tokens} tokens in sequences of {seq_len}",
            field="text",
            allowed="more text, or fewer tokens",
        )
    sequences, start = [], 0
    for length in lengths:
        body = list(text_ids[start : start + length - lead])
        start += length - lead
        sequences.append(np.asarray(([bos_id] if lead else []) + body, dtype=np.int64))
    return sequences


# ------------------------------------------------------------------ capture


@dataclass(kw_only=True)
class _LayerRecord:
    scores: list[torch.Tensor] = field(default_factory=list)  # [T, E] per forward
    router_ids: list[torch.Tensor] = field(default_factory=list)
    router_weights: list[torch.Tensor] = field(default_factory=list)
    ids: list[torch.Tensor] = field(default_factory=list)  # experts pre-hook, [T, K]
    weights: list[torch.Tensor] = field(default_factory=list)


def _router_layers(model: torch.nn.Module, family: HFFamily) -> list[tuple[int, str, Any]]:
    """(layer index, module name, router) for every router module, in model order."""
    router_type = family.router_type()
    found = []
    for position, (name, module) in enumerate(
        (n, m) for n, m in model.named_modules() if isinstance(m, router_type)
    ):
        match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        found.append((int(match.group(1)) if match else position, name, module))
    return found


def capture_hf_model(
    model: torch.nn.Module,
    sequences: Sequence[np.ndarray],
    *,
    family: HFFamily,
    device: torch.device,
) -> tuple[list[int], dict[str, np.ndarray]]:
    """Run ``model`` over ``sequences`` and return (layer indices, trace arrays).

    The model must already be on ``device`` and in eval mode. Arrays: expert_ids
    [L,T,K], weights [L,T,K], scores [L,T,E] float32, bias [L,E] or None, seq_id, pos.
    """
    layers = _router_layers(model, family)
    if not layers:
        raise InputError(
            f"no MoE layer ({family.router_class}) found in this {family.model_type} model",
            field="model",
            allowed="a checkpoint with at least one MoE layer",
        )
    modules = dict(model.named_modules())
    records = [_LayerRecord() for _ in layers]
    handles = []

    def router_hook(record: _LayerRecord):
        def hook(_module, _args, output):
            logits = output[0].detach().float()
            scores = logits.softmax(dim=-1) if family.scoring == "softmax" else logits.sigmoid()
            record.scores.append(scores.cpu())
            record.router_weights.append(output[1].detach().float().cpu())
            record.router_ids.append(output[2].detach().cpu())

        return hook

    def experts_hook(record: _LayerRecord, num_experts: int):
        def hook(_module, args, kwargs):
            names = ("hidden_states", "top_k_index", "top_k_weights")
            values = list(args) + [kwargs[name] for name in names[len(args) :] if name in kwargs]
            ids = values[1].detach().cpu().long()
            # Under HF expert parallelism index == E means "not on this rank"; keep -1.
            record.ids.append(torch.where(ids >= num_experts, -1, ids))
            record.weights.append(values[2].detach().float().cpu())

        return hook

    for (_, name, router), record in zip(layers, records, strict=True):
        handles.append(router.register_forward_hook(router_hook(record)))
        # The MoE block owns both the router and the experts (`<block>.gate|router`).
        experts = getattr(modules[name.rpartition(".")[0]], "experts", None)
        if experts is not None:
            handles.append(
                experts.register_forward_pre_hook(
                    experts_hook(record, router.num_experts), with_kwargs=True
                )
            )
    seq_ids, positions = [], []
    try:
        with torch.inference_mode():
            index = 0
            while index < len(sequences):
                # Batch rows of equal length only, so no padding (padding tokens would be
                # routed too and need a mask).
                length = len(sequences[index])
                stop = index
                while (
                    stop < len(sequences)
                    and stop - index < _BATCH_ROWS
                    and len(sequences[stop]) == length
                ):
                    stop += 1
                batch = torch.as_tensor(np.stack(sequences[index:stop]), device=device)
                model(input_ids=batch, use_cache=False, logits_to_keep=1)
                for row in range(index, stop):
                    seq_ids.append(np.full(length, row, dtype=np.int32))
                    positions.append(np.arange(length, dtype=np.int32))
                index = stop
    finally:
        for handle in handles:
            handle.remove()

    num_tokens = sum(len(s) for s in sequences)
    expert_ids, weights, scores, biases = [], [], [], []
    for (layer, _, router), record in zip(layers, records, strict=True):
        # Prefer what the experts consumed; the router's own output is the fallback for
        # a block whose experts module is missing or bypassed.
        ids = record.ids if record.ids else record.router_ids
        gate_weights = record.weights if record.weights else record.router_weights
        layer_ids = torch.cat(ids).numpy()
        if layer_ids.shape[0] != num_tokens or torch.cat(record.scores).shape[0] != num_tokens:
            raise RuntimeError(
                f"layer {layer}: hooks saw {layer_ids.shape[0]} tokens, "
                f"{num_tokens} were fed (router called more than once?)"
            )
        expert_ids.append(layer_ids)
        weights.append(torch.cat(gate_weights).numpy())
        scores.append(torch.cat(record.scores).numpy())
        if family.bias_attr is not None:
            biases.append(getattr(router, family.bias_attr).detach().float().cpu().numpy())
    arrays = {
        "expert_ids": np.stack(expert_ids).astype(np.int16),
        "weights": np.stack(weights).astype(np.float32),
        "scores": np.stack(scores).astype(np.float32),
        "bias": np.stack(biases).astype(np.float32) if biases else None,
        "seq_id": np.concatenate(seq_ids),
        "pos": np.concatenate(positions),
    }
    return [layer for layer, _, _ in layers], arrays


def capture_hf(
    path: str | Path,
    *,
    text: str | None,
    num_tokens: int,
    seq_len: int,
    seed: int,
    device: str = "cpu",
) -> RoutingTrace:
    """Capture the routing of a local Hugging Face MoE checkpoint into a RoutingTrace.

    ``text`` is tokenized with the checkpoint's tokenizer; a checkpoint without one (or
    ``text=None``) is fed seeded random token ids instead, and the metadata says so in
    ``tokens_from``. Nothing is ever fetched from the hub.
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    if num_tokens < 1:
        raise InputError(f"{num_tokens} tokens", field="num_tokens", allowed=">= 1")
    if seq_len < 1:
        raise InputError(f"sequence length {seq_len}", field="seq_len", allowed=">= 1")
    if text is not None and not text.strip():
        raise InputError("empty text", field="text", allowed="some text, or none for random ids")
    torch_device = resolve_device(device)
    config = _load_config(path)
    family = _family_for(config, path)
    gate = family.gate(config)
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is not None and seq_len > max_positions:
        raise InputError(
            f"sequence length {seq_len} exceeds the model's "
            f"max_position_embeddings {max_positions}",
            field="seq_len",
            allowed=f"1..{max_positions}",
        )

    corpus: dict[str, Any]
    text_ids = bos_id = None
    tokens_note = None
    if text is not None and _has_tokenizer(path):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InputError(
                f"cannot load the checkpoint's tokenizer ({err})".splitlines()[0], source=str(path)
            ) from None
        text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        bos_id = tokenizer.bos_token_id
        if text_ids and max(text_ids) >= config.vocab_size:
            raise InputError(
                f"tokenizer gives id {max(text_ids)} but the model's vocabulary "
                f"has {config.vocab_size} entries",
                source=str(path),
                field="tokenizer",
            )
        tokens_from = "text"
        corpus = {
            "kind": "text",
            "chars": len(text),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "tokenizer": type(tokenizer).__name__,
            "text_tokens": len(text_ids),
            "bos_per_sequence": bos_id is not None,
        }
    else:
        if text is not None:
            tokens_note = "the checkpoint has no tokenizer; the text was not used"
            warnings.warn(f"{path}: {tokens_note}; capturing from random token ids", stacklevel=2)
        tokens_from = "random-token-ids"
        corpus = {"kind": "random-token-ids", "seed": seed, "vocab_size": int(config.vocab_size)}
    sequences = token_sequences(
        num_tokens=num_tokens,
        seq_len=seq_len,
        vocab_size=int(config.vocab_size),
        seed=seed,
        text_ids=text_ids,
        bos_id=bos_id,
    )

    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise InputError(
            f"cannot load the model ({err})".splitlines()[0], source=str(path)
        ) from None
    model.to(torch_device).eval()
    layer_indices, arrays = capture_hf_model(model, sequences, family=family, device=torch_device)

    params = gate["params"]
    source = {
        "kind": "hf-checkpoint",
        "path": str(path.resolve()),
        "model_type": config.model_type,
        "architectures": list(getattr(config, "architectures", None) or []),
        "router_class": family.router_class,
        "num_hidden_layers": int(config.num_hidden_layers),
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    metadata: dict[str, Any] = {
        "num_experts": int(params["num_experts"]),
        "top_k": int(params["top_k"]),
        "layer_indices": layer_indices,
        "gate": gate,
        "source": source,
        "corpus": corpus,
        "tokens_from": tokens_from,
        "seq_len": seq_len,
        "seed": seed,
        "device": describe_device(torch_device),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "moesim_version": moesim.__version__,
    }
    if tokens_note:
        metadata["tokens_note"] = tokens_note
    return RoutingTrace(metadata=metadata, **arrays)
