"""RoutingTrace: token-to-expert routing of several MoE layers (schema ``moesim.trace/1``).

One ``.npz`` archive, loaded without pickle, with these arrays (L MoE layers in model
order, T tokens, K experts per token, E routed experts):

* ``expert_ids`` int16 [L, T, K]: chosen experts; ``-1`` marks a dropped slot
* ``weights`` float32 [L, T, K]: their gate weights
* ``scores`` float16 [L, T, E], optional: affinities after softmax/sigmoid, before any
  bias, so that replay can re-route under another ``M``, groups or capacity
* ``bias`` float32 [L, E], optional: DeepSeek-V3 selection bias at capture time
* ``seq_id``, ``pos`` int32 [T]; ``src_rank`` int32 [T], optional: the rank each token
  lived on when recorded on a cluster
* ``metadata``: JSON (schema, num_experts, top_k, layer_indices, gate, source, ...)

Loading validates everything and turns any problem into one :class:`InputError`.
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moesim.errors import InputError

SCHEMA = "moesim.trace/1"
_REQUIRED_META = ("schema", "num_experts", "top_k", "layer_indices", "gate", "source")
_ARRAYS = ("expert_ids", "weights", "scores", "bias", "seq_id", "pos", "src_rank")


@dataclass(frozen=True, kw_only=True, eq=False)
class RoutingTrace:
    expert_ids: np.ndarray
    weights: np.ndarray
    seq_id: np.ndarray
    pos: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)
    scores: np.ndarray | None = None
    bias: np.ndarray | None = None
    src_rank: np.ndarray | None = None

    def __post_init__(self) -> None:
        meta = dict(self.metadata)
        meta.setdefault("schema", SCHEMA)
        if self.expert_ids.ndim == 3:  # any other shape is refused by validate()
            meta.setdefault("top_k", int(self.expert_ids.shape[-1]))
            meta.setdefault("layer_indices", list(range(self.expert_ids.shape[0])))
        if self.scores is not None and self.scores.ndim:
            meta.setdefault("num_experts", int(self.scores.shape[-1]))
        object.__setattr__(self, "metadata", meta)
        validate(self)

    # ------------------------------------------------------------ shape

    @property
    def num_layers(self) -> int:
        return int(self.expert_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.expert_ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.expert_ids.shape[2])

    @property
    def num_experts(self) -> int:
        return int(self.metadata["num_experts"])

    # ------------------------------------------------------------ files

    def to_bytes(self) -> bytes:
        """The ``.npz`` archive as bytes (compressed; no pickled objects)."""
        arrays = {name: getattr(self, name) for name in _ARRAYS
                  if getattr(self, name) is not None}
        meta = json.dumps(self.metadata, sort_keys=True).encode("utf-8")
        arrays["metadata"] = np.frombuffer(meta, dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "<trace>") -> RoutingTrace:
        if not data.startswith(b"PK"):
            raise InputError("not a .npz (zip) archive", source=source,
                             allowed=f"a .npz written by moesim ({SCHEMA})")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        # Damaged members fail inside zlib or with an unknown compression method.
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error,
                NotImplementedError) as err:
            raise InputError(f"not a moesim trace archive ({err})", source=source,
                             allowed=f"a .npz written by moesim ({SCHEMA})") from None
        try:
            raw = arrays.pop("metadata")
        except KeyError:
            raise InputError("no metadata in the archive", field="metadata",
                             source=source) from None
        try:
            metadata = json.loads(raw.astype(np.uint8).tobytes().decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise InputError("metadata is not JSON", field="metadata", source=source) from None
        if not isinstance(metadata, dict):
            raise InputError(f"metadata is a JSON {type(metadata).__name__}", field="metadata",
                             source=source, allowed="a JSON object")
        unknown = sorted(set(arrays) - set(_ARRAYS))
        if unknown:
            raise InputError(f"unknown arrays {unknown}", field=unknown[0], source=source,
                             allowed=", ".join(_ARRAYS))
        for name in ("expert_ids", "weights", "seq_id", "pos"):
            if name not in arrays:
                raise InputError("missing array", field=name, source=source)
        try:
            return cls(metadata=metadata, **arrays)
        except InputError as err:
            raise err.with_source(source) from None

    def save(self, path: str | Path) -> None:
        """Write the archive to ``path`` (the CLI writes through a temporary file)."""
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        """Read and validate a trace; every problem is an InputError naming the file."""
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise InputError(f"cannot read file ({err.strerror})", source=str(path)) from None
        return cls.from_bytes(data, source=str(path))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fail(problem: str, field: str, allowed: str | None = None):
    raise InputError(problem, field=field, allowed=allowed)


def _check_finite(name: str, array: np.ndarray) -> None:
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        _fail(f"expected numbers, got {array.dtype}", name, "integer or float arrays")
    if not np.isfinite(array).all():
        _fail("contains NaN or infinite values", name, "finite numbers")


def _narrow(name: str, array: np.ndarray, dtype) -> np.ndarray:
    """``array`` in the schema's float dtype; values beyond its range would turn into
    inf and make a file that cannot be read back, so they are an error here."""
    with np.errstate(over="ignore"):
        out = array.astype(dtype, copy=False)
    if not np.isfinite(out).all():
        _fail(f"values beyond the range of {np.dtype(dtype).name}", name,
              f"|value| <= {float(np.finfo(dtype).max):g}")
    return out


def validate(trace: RoutingTrace) -> None:
    """Raise InputError unless every array and the metadata agree with the schema.

    Arrays are normalised to the schema's dtypes in place of the given ones.
    """
    meta = trace.metadata
    for key in _REQUIRED_META:
        if key not in meta:
            _fail("missing metadata key", f"metadata.{key}", ", ".join(_REQUIRED_META))
    if meta["schema"] != SCHEMA:
        _fail(f"unknown trace schema {meta['schema']!r}", "metadata.schema", SCHEMA)
    ids = trace.expert_ids
    if ids.ndim != 3:
        _fail(f"expected [layers, tokens, K], got shape {ids.shape}", "expert_ids")
    if not np.issubdtype(ids.dtype, np.integer):
        _fail(f"expected integers, got {ids.dtype}", "expert_ids")
    n_layers, n_tokens, top_k = ids.shape
    for size, what in ((n_layers, "layers"), (n_tokens, "tokens"), (top_k, "experts per "
                                                                         "token (K)")):
        if size == 0:
            _fail(f"no {what}: expert_ids has shape {ids.shape}", "expert_ids",
                  "at least one layer, one token and one expert per token")
    n_experts = meta["num_experts"]
    if not _is_int(n_experts) or n_experts < 1 or n_experts >= 2**15:
        _fail(f"bad expert count {n_experts!r}", "metadata.num_experts", "1..32767")
    if not _is_int(meta["top_k"]) or meta["top_k"] != top_k:
        _fail(f"says top_k {meta['top_k']!r} but expert_ids has K = {top_k}",
              "metadata.top_k")
    layers = meta["layer_indices"]
    if not isinstance(layers, list) or not all(_is_int(i) and i >= 0 for i in layers):
        _fail(f"expected a list of layer numbers, got {layers!r}"[:120],
              "metadata.layer_indices", "a list of the MoE layers' indices (integers >= 0)")
    if len(layers) != n_layers or len(set(layers)) != n_layers:
        _fail(f"{len(layers)} layer indices ({len(set(layers))} distinct) for {n_layers} "
              "layers", "metadata.layer_indices", f"{n_layers} distinct layer numbers")
    if ids.min() < -1 or ids.max() >= n_experts:
        _fail(f"expert ids range {ids.min()}..{ids.max()}", "expert_ids",
              f"-1 (dropped) or 0..{n_experts - 1}")
    ordered = np.sort(ids, axis=-1)
    if ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any():
        _fail("a token chooses the same expert twice", "expert_ids",
              "K distinct experts per token (or -1 for dropped slots)")
    if not (ids >= 0).any(axis=(1, 2)).all():
        empty = int(np.flatnonzero(~(ids >= 0).any(axis=(1, 2)))[0])
        _fail(f"layer {empty} has every slot dropped", "expert_ids",
              "at least one routed assignment per layer")
    if trace.weights.shape != ids.shape:
        _fail(f"shape {trace.weights.shape} differs from expert_ids {ids.shape}", "weights")
    _check_finite("weights", trace.weights)
    if (trace.weights < 0).any():
        _fail("negative gate weights", "weights", ">= 0")
    normalized = {"expert_ids": ids.astype(np.int16, copy=False),
                  "weights": _narrow("weights", trace.weights, np.float32)}
    if trace.scores is not None:
        if trace.scores.shape != (n_layers, n_tokens, n_experts):
            _fail(f"shape {trace.scores.shape}, expected {(n_layers, n_tokens, n_experts)}",
                  "scores")
        _check_finite("scores", trace.scores)
        normalized["scores"] = _narrow("scores", trace.scores, np.float16)
    if trace.bias is not None:
        if trace.bias.shape != (n_layers, n_experts):
            _fail(f"shape {trace.bias.shape}, expected {(n_layers, n_experts)}", "bias")
        _check_finite("bias", trace.bias)
        normalized["bias"] = _narrow("bias", trace.bias, np.float32)
    for name in ("seq_id", "pos", "src_rank"):
        array = getattr(trace, name)
        if array is None:
            continue
        if array.shape != (n_tokens,) or not np.issubdtype(array.dtype, np.integer):
            _fail(f"expected int32 [{n_tokens}], got {array.dtype} {array.shape}", name)
        if array.size and array.min() < 0:
            _fail("negative values", name, ">= 0")
        normalized[name] = array.astype(np.int32, copy=False)
    for name, array in normalized.items():
        object.__setattr__(trace, name, array)
