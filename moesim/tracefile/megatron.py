"""Import Megatron-Core router traces (``--moe-routing-trace-path``) as a RoutingTrace.

Megatron-Core's ``megatron/core/transformer/moe/router_trace.py`` writes one JSONL file
per rank, ``router_trace_rank{rank}.jsonl``, one record per (step, block, layer)::

    {"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 3, "rank": 0,
     "num_tokens": 128, "topk": 8, "top_indices": [[12, 45, ...], ...]}

MTP records have ``"block": "mtp"`` and an ``"mtp_idx"``. With logit capture, each
record also has ``logit_offset``, ``logit_bytes`` and ``logit_shape`` locating bfloat16
pre-top-k logits ``[num_tokens, num_experts]`` in the sidecar ``logits_rank{rank}.bin``
next to the JSONL file.

How records become a trace (:func:`import_megatron`):

* one step is taken (default: the smallest step number present); every rank must have it;
* layers are the decoder layers sorted by layer number, then (with ``include_mtp``) the
  MTP layers sorted by ``(mtp_idx, layer)``; every rank must have the same layers;
* tokens are the ranks' tokens concatenated in rank order; ``src_rank`` keeps the rank.
  When a layer has several records in one step on one rank (training micro-batches),
  the k-th record of every layer is taken as the same micro-batch, in file order;
* ``seq_id``: one sequence per (rank, micro-batch record), numbered in that order; the
  trace carries no sequence boundaries, so ``pos`` is the index within that record;
* weights: with logits, ``scores = score_function(logits)`` over all experts (kept as
  float16 ``scores``) and the weights are the scores of the chosen experts (not
  renormalised); without logits, the weights are unknown and set to ``1/K``, and
  ``metadata.weights.known`` is false.

Every record of every step is checked, a line at a time (at most ``MAX_LINE_BYTES``);
only the imported step's expert ids are kept. Each problem is an :class:`InputError`
naming the file and line (``router_trace_rank0.jsonl:17``), the field and what is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from moesim.errors import InputError
from moesim.inputs import load_json
from moesim.tracefile.format import RoutingTrace, repeats_an_expert

_FILE_RE = re.compile(r"router_trace_rank(\d+)\.jsonl$")
_FIELDS = ("step", "block", "layer", "rank", "num_tokens", "topk", "top_indices")
_LOGIT_FIELDS = ("logit_offset", "logit_bytes", "logit_shape")
_BLOCKS = ("decoder", "mtp")
# One record holds one micro-batch of one layer on one rank: 32,768 tokens x top-8 is
# about 1.3 MB of JSON, 64 MiB about 2 million tokens x top-8. A longer line is a
# mistake (or /dev/zero), refused before it is parsed: parsing takes about 12 bytes of
# memory per byte of JSON (measured: 0.5 GB and 10 s for a 44 MiB line).
MAX_LINE_BYTES = 64 * 2**20
SCORE_FUNCTIONS = ("softmax", "sigmoid", "sqrtsoftplus")

LayerKey = tuple[int, int, int]  # (0 decoder / 1 mtp, mtp_idx or -1, layer): sorts as wanted


@dataclass(frozen=True, kw_only=True, eq=False)
class _Record:
    where: str  # "path:line"
    step: int
    key: LayerKey
    rank: int
    topk: int
    ids_tk: np.ndarray | None  # int16 [num_tokens, topk]; None for a step not imported
    logits: tuple[int, int] | None  # (offset, bytes) in the rank's logits sidecar


def _layer_name(key: LayerKey) -> str:
    block, mtp_idx, layer = key
    return f"decoder layer {layer}" if block == 0 else f"mtp {mtp_idx} layer {layer}"


def _int_field(rec: dict, name: str, where: str, lo: int = 0) -> int:
    value = rec[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise InputError(f"got {value!r}", field=name, source=where,
                         allowed=f"an integer >= {lo}")
    return value


def _parse_record(line: str, where: str, *, num_experts: int) -> _Record:
    try:
        rec = load_json(line, source=where)
    except InputError as err:
        raise InputError(err.problem, source=where,
                         allowed="one JSON object per line") from None
    if not isinstance(rec, dict):
        raise InputError(f"a JSON {type(rec).__name__}, not an object", source=where,
                         allowed="one JSON object per line")
    for name in _FIELDS:
        if name not in rec:
            raise InputError("missing field", field=name, source=where,
                             allowed="records with " + ", ".join(_FIELDS))
    if rec.get("stage", "pre_dispatch") != "pre_dispatch":
        raise InputError(f"unsupported stage {rec['stage']!r}", field="stage", source=where,
                         allowed="pre_dispatch")
    step = _int_field(rec, "step", where)
    layer = _int_field(rec, "layer", where)
    rank = _int_field(rec, "rank", where)
    n_tokens = _int_field(rec, "num_tokens", where)
    topk = _int_field(rec, "topk", where, lo=1)
    if rec["block"] not in _BLOCKS:
        raise InputError(f"unknown block {rec['block']!r}", field="block", source=where,
                         allowed=", ".join(_BLOCKS))
    if rec["block"] == "mtp":
        if "mtp_idx" not in rec:
            raise InputError("MTP record without mtp_idx", field="mtp_idx", source=where,
                             allowed="an integer >= 0")
        key = (1, _int_field(rec, "mtp_idx", where), layer)
    else:
        key = (0, -1, layer)

    shape_text = f"[num_tokens, topk] = [{n_tokens}, {topk}] integers"
    try:
        ids_tk = np.asarray(rec["top_indices"])
    except ValueError:  # ragged rows
        ids_tk = None
    if ids_tk is not None and n_tokens == 0 and ids_tk.size == 0:
        ids_tk = np.zeros((0, topk), dtype=np.int64)
    if ids_tk is None or ids_tk.shape != (n_tokens, topk) or ids_tk.dtype.kind not in "iu":
        got = "ragged rows" if ids_tk is None else f"{ids_tk.dtype} {list(ids_tk.shape)}"
        raise InputError(f"got {got}", field="top_indices", source=where, allowed=shape_text)
    if ids_tk.size and (ids_tk.min() < 0 or ids_tk.max() >= num_experts):
        raise InputError(f"expert ids range {ids_tk.min()}..{ids_tk.max()}",
                         field="top_indices", source=where,
                         allowed=f"0..{num_experts - 1} (num_experts = {num_experts})")
    if repeats_an_expert(ids_tk):
        raise InputError("a token chooses the same expert twice", field="top_indices",
                         source=where, allowed=f"{topk} distinct experts per token")

    logits = None
    present = [name for name in _LOGIT_FIELDS if name in rec]
    if present:
        for name in _LOGIT_FIELDS:
            if name not in rec:
                raise InputError("logit fields come together", field=name, source=where,
                                 allowed=", ".join(_LOGIT_FIELDS))
        offset = _int_field(rec, "logit_offset", where)
        n_bytes = _int_field(rec, "logit_bytes", where)
        if rec["logit_shape"] != [n_tokens, num_experts]:
            raise InputError(f"got {rec['logit_shape']!r}", field="logit_shape", source=where,
                             allowed=f"[num_tokens, num_experts] = [{n_tokens}, {num_experts}]")
        if n_bytes != 2 * n_tokens * num_experts:
            raise InputError(f"got {n_bytes}", field="logit_bytes", source=where,
                             allowed=f"2 bytes (bfloat16) x {n_tokens} x {num_experts}")
        logits = (offset, n_bytes)
    return _Record(where=where, step=step, key=key, rank=rank, topk=topk,
                   ids_tk=ids_tk.astype(np.int16), logits=logits)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """The file's non-blank lines with their numbers, read one at a time (a rank's file
    holds every step); a line longer than MAX_LINE_BYTES, or not UTF-8, is refused."""
    try:
        with path.open("rb") as handle:
            for number, line in enumerate(iter(lambda: handle.readline(MAX_LINE_BYTES + 1),
                                               b""), start=1):
                if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                    raise InputError(f"a line longer than {MAX_LINE_BYTES // 2**20} MiB",
                                     source=f"{path}:{number}",
                                     allowed="one JSON record per line")
                if line.strip():
                    yield number, _decoded(line, f"{path}:{number}")
    except OSError as err:
        raise InputError(f"cannot read file ({err.strerror or err})", source=str(path)
                         ) from None


def _decoded(line: bytes, where: str) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"not UTF-8 text (byte {err.start})", source=where,
                         allowed="UTF-8 JSON lines") from None


def _read_file(path: Path, *, num_experts: int, step: int | None) -> list[_Record]:
    """Every record of one rank's file, checked; records keep only what import needs,
    and the expert ids only of the records of the step that can be imported (``step``,
    or the file's first: the import needs every rank's first step to be the same)."""
    match = _FILE_RE.search(path.name)
    name_rank = int(match.group(1)) if match else None
    records: list[_Record] = []
    kept, holding = step, []  # the step whose ids are kept, the records that hold them
    for number, line in _lines(path):
        rec = _parse_record(line, f"{path}:{number}", num_experts=num_experts)
        expected = records[0].rank if records else name_rank
        if expected is not None and rec.rank != expected:
            raise InputError(f"rank {rec.rank} in the file of rank {expected}", field="rank",
                             source=rec.where, allowed=str(expected))
        if step is None and (kept is None or rec.step < kept):
            for index in holding:  # each record loses its ids at most once
                records[index] = _dropped(records[index])
            kept, holding = rec.step, []
        if rec.step == kept:
            holding.append(len(records))
        records.append(rec if rec.step == kept else _dropped(rec))
    if not records:
        raise InputError("no records", source=str(path),
                         allowed="one JSON record per (step, block, layer)")
    return records


def _dropped(rec: _Record) -> _Record:
    """``rec`` without its expert ids (a step that is not imported)."""
    return replace(rec, ids_tk=None)


def _bf16_to_float32(raw: bytes) -> np.ndarray:
    # bfloat16 is the top half of a float32: widen the bits and reinterpret.
    return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)


def _scores(logits_te: np.ndarray, score_function: str) -> np.ndarray:
    """Affinities [T, E] in float64 from logits, as the router computes them."""
    u = logits_te.astype(np.float64)
    if score_function == "softmax":
        exp = np.exp(u - u.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)
    if score_function == "sigmoid":
        return 1.0 / (1.0 + np.exp(-u))
    assert score_function == "sqrtsoftplus", score_function
    return np.sqrt(np.logaddexp(0.0, u))


def _read_logits(rec: _Record, sidecar: Path, *, num_experts: int) -> np.ndarray:
    assert rec.logits is not None
    offset, n_bytes = rec.logits
    try:
        with sidecar.open("rb") as handle:
            handle.seek(offset)
            raw = handle.read(n_bytes)
    except FileNotFoundError:
        raise InputError(f"its logits sidecar {sidecar} does not exist", field="logit_offset",
                         source=rec.where, allowed=f"{sidecar.name} next to the JSONL file"
                         ) from None
    except OSError as err:
        raise InputError(f"cannot read logits sidecar {sidecar} ({err})", field="logit_offset",
                         source=rec.where) from None
    if len(raw) != n_bytes:
        raise InputError(f"logits sidecar {sidecar} ends before byte {offset + n_bytes}",
                         field="logit_offset", source=rec.where,
                         allowed=f"offsets within the {offset + len(raw)} bytes of the file")
    logits_te = _bf16_to_float32(raw).reshape(-1, num_experts)
    if not np.isfinite(logits_te).all():
        raise InputError(f"logits in {sidecar} contain NaN or infinite values",
                         field="logit_offset", source=rec.where, allowed="finite logits")
    return logits_te


def _resolve(paths: Sequence[str | Path] | str | Path) -> list[Path]:
    if isinstance(paths, (str, Path)):
        root = Path(paths)
        if root.is_dir():
            found = sorted(p for p in root.iterdir() if _FILE_RE.search(p.name))
            if not found:
                raise InputError("no router trace files", source=str(root),
                                 allowed="a directory with router_trace_rank{rank}.jsonl")
            return found
        return [root]
    files = [Path(p) for p in paths]
    if not files:
        raise InputError("no files given", field="paths",
                         allowed="router_trace_rank{rank}.jsonl files or their directory")
    return files


def import_megatron(
    paths: Sequence[str | Path] | str | Path,
    *,
    num_experts: int,
    step: int | None = None,
    include_mtp: bool = False,
    score_function: str = "softmax",
    gate: dict[str, Any] | None = None,
) -> RoutingTrace:
    """A RoutingTrace from Megatron-Core router trace files (or the directory holding them).

    ``num_experts`` is the model's routed expert count ``E`` (the JSONL does not say it);
    ``score_function`` turns recorded logits into scores (softmax, sigmoid or
    sqrtsoftplus, as ``moe_router_score_function``); ``gate`` goes to the metadata as is.
    """
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) \
            or not 1 <= num_experts < 2**15:
        raise InputError(f"got {num_experts!r}", field="num_experts", allowed="1..32767")
    if score_function not in SCORE_FUNCTIONS:
        raise InputError(f"unknown score function {score_function!r}", field="score_function",
                         allowed=", ".join(SCORE_FUNCTIONS))
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
        raise InputError(f"got {step!r}", field="step", allowed="an integer >= 0 or None")

    files = _resolve(paths)
    by_file = {path: _read_file(path, num_experts=num_experts, step=step) for path in files}
    chosen = step if step is not None else min(r.step for recs in by_file.values() for r in recs)

    ranks: dict[int, tuple[Path, list[_Record]]] = {}
    for path, recs in by_file.items():
        rank = recs[0].rank
        if rank in ranks:
            raise InputError(f"rank {rank} also comes from {ranks[rank][0]}", field="rank",
                             source=str(path), allowed="one file per rank")
        wanted = [r for r in recs if r.step == chosen and (include_mtp or r.key[0] == 0)]
        if not wanted:
            steps = sorted({r.step for r in recs})
            raise InputError(f"no {'' if include_mtp else 'decoder '}records for step {chosen}",
                             field="step", source=str(path),
                             allowed=", ".join(map(str, steps)))
        assert all(r.ids_tk is not None for r in wanted), "_read_file keeps this step's ids"
        ranks[rank] = (path, wanted)

    # The first rank's layers and micro-batch sizes are the reference for the others.
    layout: dict[int, dict[LayerKey, list[_Record]]] = {}
    for rank, (_path, wanted) in ranks.items():
        per_layer: dict[LayerKey, list[_Record]] = {}
        for rec in wanted:
            per_layer.setdefault(rec.key, []).append(rec)
        layout[rank] = per_layer
    rank_order = sorted(ranks)
    keys = sorted(layout[rank_order[0]])
    topk = layout[rank_order[0]][keys[0]][0].topk
    for rank in rank_order:
        path, wanted = ranks[rank]
        per_layer = layout[rank]
        missing = sorted(set(keys) ^ set(per_layer))
        if missing:
            ref = ranks[rank_order[0]][0]
            has = "lacks" if missing[0] in layout[rank_order[0]] else "has an extra"
            raise InputError(f"{has} {_layer_name(missing[0])} in step {chosen} (vs {ref})",
                             field="layer", source=str(path),
                             allowed=", ".join(_layer_name(k) for k in keys))
        sizes = [r.ids_tk.shape[0] for r in per_layer[keys[0]]]
        for key in keys:
            for i, rec in enumerate(per_layer[key]):
                if rec.topk != topk:
                    raise InputError(f"topk {rec.topk}", field="topk", source=rec.where,
                                     allowed=f"{topk}, as in every other record")
                if i >= len(sizes) or rec.ids_tk.shape[0] != sizes[i]:
                    raise InputError(
                        f"{_layer_name(key)} record {i} of step {chosen} has "
                        f"{rec.ids_tk.shape[0]} tokens", field="num_tokens", source=rec.where,
                        allowed=f"the token counts of {_layer_name(keys[0])}: {sizes}")
            if len(per_layer[key]) != len(sizes):
                rec = per_layer[key][-1]
                raise InputError(
                    f"{_layer_name(key)} has {len(per_layer[key])} records in step {chosen}",
                    field="layer", source=rec.where,
                    allowed=f"{len(sizes)}, as {_layer_name(keys[0])}")

    with_logits = [r for rank in rank_order for k in keys for r in layout[rank][k]]
    has_logits = with_logits[0].logits is not None
    for rec in with_logits:
        if (rec.logits is not None) != has_logits:
            raise InputError("logits recorded for some records but not for this one",
                             field="logit_offset", source=rec.where,
                             allowed="logit fields on every record of the step, or on none")

    ids_l, logits_l = [], []
    for key in keys:
        ids_l.append(np.concatenate([r.ids_tk for rank in rank_order
                                     for r in layout[rank][key]]))
        if has_logits:
            logits_l.append(np.concatenate([
                _read_logits(r, ranks[rank][0].parent / f"logits_rank{rank}.bin",
                             num_experts=num_experts)
                for rank in rank_order for r in layout[rank][key]]))
    ids_ltk = np.stack(ids_l)
    if not ids_ltk.shape[1]:
        raise InputError(f"step {chosen} has no tokens: every record of it has num_tokens 0",
                         field="num_tokens", source=_files(ranks), allowed="records with tokens")
    seq_parts, pos_parts, rank_parts = [], [], []
    for rank in rank_order:
        for rec in layout[rank][keys[0]]:
            n = rec.ids_tk.shape[0]
            seq_parts.append(np.full(n, len(seq_parts), dtype=np.int32))
            pos_parts.append(np.arange(n, dtype=np.int32))
            rank_parts.append(np.full(n, rank, dtype=np.int32))

    if has_logits:
        scores_lte = np.stack([_scores(lg, score_function) for lg in logits_l])
        weights_ltk = np.take_along_axis(scores_lte, ids_ltk.astype(np.int64), axis=2)
        weights_meta = {"known": True, "kind": "chosen-scores", "score_function": score_function,
                        "note": "scores of the chosen experts, not renormalised"}
        scores = scores_lte.astype(np.float16)
    else:
        weights_ltk = np.full(ids_ltk.shape, 1.0 / topk)
        weights_meta = {"known": False, "kind": "uniform-placeholder",
                        "note": "the trace records no weights; 1/K stands in"}
        scores = None

    n_decoder = sum(1 for k in keys if k[0] == 0)
    last_decoder = max((k[2] for k in keys if k[0] == 0), default=-1)
    # MTP layers get numbers after the last decoder layer so that indices stay unique;
    # metadata.layers says which record each trace layer came from.
    layer_indices = [k[2] if k[0] == 0 else last_decoder + 1 + (i - n_decoder)
                     for i, k in enumerate(keys)]
    layers_meta = [{"block": "decoder", "layer": k[2]} if k[0] == 0
                   else {"block": "mtp", "mtp_idx": k[1], "layer": k[2]} for k in keys]
    metadata = {
        "num_experts": num_experts,
        "top_k": topk,
        "layer_indices": layer_indices,
        "layers": layers_meta,
        "gate": dict(gate) if gate is not None else {"kind": "unknown"},
        "source": {
            "kind": "megatron-router-trace",
            "files": [str(ranks[r][0]) for r in rank_order],
            "step": chosen,
            "ranks": rank_order,
            "sequences": "one per rank and micro-batch record; pos = index within it",
        },
        "weights": weights_meta,
    }
    try:
        return RoutingTrace(
            expert_ids=ids_ltk,
            weights=weights_ltk.astype(np.float32),
            scores=scores,
            seq_id=np.concatenate(seq_parts),
            pos=np.concatenate(pos_parts),
            src_rank=np.concatenate(rank_parts),
            metadata=metadata,
        )
    except InputError as err:  # the records are checked one by one above; this names them
        raise err.with_source(_files(ranks)) from None


def _files(ranks: dict[int, tuple[Path, list[_Record]]]) -> str:
    """The imported files, as an error's source: the first rank's, and how many more."""
    first = ranks[min(ranks)][0]
    return str(first) if len(ranks) == 1 else f"{first} (and {len(ranks) - 1} more files)"
