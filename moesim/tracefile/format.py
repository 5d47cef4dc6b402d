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

Arrays are stored, not deflated, each one's data 64-byte aligned in the file, so that
:meth:`RoutingTrace.load` maps the large ones into memory instead of reading them: a
run reads the layers it routes, when it routes them, and the pages of a layer it is
done with can be handed back (:meth:`RoutingTrace.release`). Deflated archives (older
files, ``np.savez_compressed``) load too, read whole.
"""

from __future__ import annotations

import io
import json
import math
import mmap
import os
import struct
import tokenize
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moesim.config.feasibility import MAX_ASSIGNMENTS
from moesim.config.model import MAX_LAYERS
from moesim.errors import InputError
from moesim.inputs import MAX_DEPTH, MAX_FILE_BYTES, load_json

SCHEMA = "moesim.trace/1"
_REQUIRED_META = ("schema", "num_experts", "top_k", "layer_indices", "gate", "source")
_ARRAYS = ("expert_ids", "weights", "scores", "bias", "seq_id", "pos", "src_rank")
MAP_BYTES = 1 << 20  # stored members at least this large are mapped, not read
_ALIGN = 64  # a stored array's data starts at a multiple of this in the file
_PAD_ID = 0xD935  # the zip extra field that pads a local header (as zipalign's)
# What damaged archives raise: in zip and zlib (RuntimeError: a member flagged as
# encrypted), in a member's .npy header (numpy parses it as Python literals).
_READ_ERRORS = (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error,
                NotImplementedError, struct.error, SyntaxError, tokenize.TokenError,
                RuntimeError)
# What a trace may declare (README: Limits), checked on each member's .npy header before
# anything is allocated: a simulation's own bounds on layers and on one layer's routed
# assignments (moesim.config: 1,024 and MAX_ASSIGNMENTS), and for members read into
# memory rather than mapped (deflated ones, small ones) a total that fits beside a run.
MAX_READ_BYTES = 4 * 2**30
_LAYERED = ("expert_ids", "weights", "scores", "bias")  # axis 0: layers
_PER_TOKEN = ("seq_id", "pos", "src_rank")


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
        """The ``.npz`` archive as bytes (arrays stored, aligned; no pickled objects)."""
        buffer = io.BytesIO()
        self._write(buffer)
        return buffer.getvalue()

    def _write(self, out) -> None:
        arrays = {name: getattr(self, name) for name in _ARRAYS
                  if getattr(self, name) is not None}
        meta = json.dumps(self.metadata, sort_keys=True).encode("utf-8")
        arrays["metadata"] = np.frombuffer(meta, dtype=np.uint8)
        with zipfile.ZipFile(out, "w", allowZip64=True) as archive:
            for name, array in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_STORED
                # The local header: 30 bytes, the name, this padding, 20 bytes of zip64
                # sizes; numpy pads its own header to a multiple of 64.
                pad = -(out.tell() + 30 + len(info.filename) + 4 + 20) % _ALIGN
                info.extra = struct.pack("<HH", _PAD_ID, pad) + bytes(pad)
                with archive.open(info, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.ascontiguousarray(array),
                                              allow_pickle=False)

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "<trace>") -> RoutingTrace:
        if not data.startswith(b"PK"):
            raise InputError("not a .npz (zip) archive", source=source,
                             allowed=f"a .npz written by moesim ({SCHEMA})")
        return cls._from_archive(io.BytesIO(data), source=source)

    @classmethod
    def _from_archive(cls, file, *, source: str, path: str | None = None) -> RoutingTrace:
        """The trace in the zip archive ``file``; with ``path`` (the file's), large
        stored members are mapped rather than read."""
        try:
            with np.load(file, allow_pickle=False) as archive:
                names = _member_names(archive.zip, source=source)
                arrays = _read_members(archive, names, source=source, path=path)
        except InputError:
            raise
        # Damaged members fail inside zlib or with an unknown compression method.
        except _READ_ERRORS as err:
            raise InputError(f"not a moesim trace archive ({err})", source=source,
                             allowed=f"a .npz written by moesim ({SCHEMA})") from None
        metadata = _metadata(arrays.pop("metadata"), source=source)
        try:
            return cls(metadata=metadata, **arrays)
        except InputError as err:
            raise err.with_source(source) from None

    def save(self, path: str | Path) -> None:
        """Write the archive to ``path``, through a temporary file beside it renamed
        into place (a reader that maps the old file keeps reading the old file)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as out:
                self._write(out)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        """Read and validate a trace; every problem is an InputError naming the file.
        Large stored arrays are mapped (read-only), not read."""
        try:
            with open(path, "rb") as file:
                head = file.read(2)
        except OSError as err:
            raise InputError(f"cannot read file ({err.strerror})", source=str(path)) from None
        if head != b"PK":
            raise InputError("not a .npz (zip) archive", source=str(path),
                             allowed=f"a .npz written by moesim ({SCHEMA})")
        return cls._from_archive(str(path), source=str(path), path=str(path))

    def release(self, layer: int) -> None:
        """Hand back the memory pages of ``layer``'s mapped arrays (read again from the
        file, or the page cache, when next used); nothing for arrays in memory."""
        for array in (self.scores, self.expert_ids, self.weights):
            if array is not None:
                release_pages(array[layer])


def _member_names(archive: zipfile.ZipFile, *, source: str) -> list[str]:
    """The arrays the archive holds, each a ``{name}.npy`` member; any other member, or a
    missing required one, is refused before anything is read."""
    names = [member[:-4] if member.endswith(".npy") else member
             for member in archive.namelist()]
    unknown = sorted({name for name, member in zip(names, archive.namelist(), strict=True)
                      if name not in (*_ARRAYS, "metadata") or not member.endswith(".npy")})
    if unknown:
        raise InputError(f"unknown arrays {unknown}", field=unknown[0], source=source,
                         allowed=", ".join(_ARRAYS))
    if "metadata" not in names:
        raise InputError("no metadata in the archive", field="metadata", source=source)
    for name in ("expert_ids", "weights", "seq_id", "pos"):
        if name not in names:
            raise InputError("missing array", field=name, source=source)
    return list(dict.fromkeys(names))


def _read_members(archive, names: list[str], *, source: str,
                  path: str | None) -> dict[str, np.ndarray]:
    """Every member as an array: mapped where it can be, else read, after its header
    has been checked against the member's size and the limits."""
    arrays, in_memory = {}, 0
    for name in names:
        nbytes = _declared_bytes(archive.zip, name, source=source)
        mapped = None if path is None else _mapped(archive.zip, name, path)
        if mapped is None:
            in_memory += nbytes
            if in_memory > MAX_READ_BYTES:
                raise InputError(
                    f"arrays to read into memory reach {_gib(in_memory)} at {name}",
                    field=name, source=source,
                    allowed=f"at most {_gib(MAX_READ_BYTES)} of arrays read into memory "
                            "(deflated ones; stored ones, as moesim writes them, are mapped)")
            arrays[name] = archive[name]
        else:
            arrays[name] = mapped
    return arrays


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.3g} GiB"


def _declared_bytes(archive: zipfile.ZipFile, name: str, *, source: str) -> int:
    """The bytes member ``name``'s .npy header declares, read from the header alone;
    numpy would allocate them before reading a byte of data, so a size the member
    cannot hold, or beyond what a trace may be, is refused here."""
    info = archive.getinfo(f"{name}.npy")
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(member)
        elif version in ((2, 0), (3, 0)):  # 3.0 differs only in the header's encoding
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise ValueError(f"{name}.npy: unknown .npy format version {version}")
        held = info.file_size - member.tell()
    if any(size < 0 for size in shape):
        raise InputError(f"its header declares the shape {shape}", field=name, source=source,
                         allowed="sizes >= 0")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > held:
        raise InputError(
            f"its .npy header declares shape {shape} of {dtype}, {nbytes:,} bytes, but the "
            f"member holds {max(held, 0):,}", field=name, source=source,
            allowed="arrays no larger than the data the archive holds")
    _check_declared_shape(name, shape, nbytes, source=source)
    return nbytes


def _check_declared_shape(name: str, shape: tuple[int, ...], nbytes: int, *,
                          source: str) -> None:
    """The trace limits, on a shape before its array exists (the exact shapes are
    checked after loading, by validate)."""
    layers = shape[0] if shape else 1
    per_layer = math.prod(shape[1:])
    if name in _LAYERED and layers > MAX_LAYERS:
        raise InputError(f"{layers:,} layers (shape {shape})", field=name, source=source,
                         allowed=f"at most {MAX_LAYERS:,} layers")
    if name in ("expert_ids", "weights") and per_layer > MAX_ASSIGNMENTS:
        raise InputError(f"{per_layer:,} assignments (tokens x K) per layer (shape {shape})",
                         field=name, source=source,
                         allowed=f"at most {MAX_ASSIGNMENTS:,} assignments per layer")
    if name in _PER_TOKEN and math.prod(shape) > MAX_ASSIGNMENTS:
        raise InputError(f"{math.prod(shape):,} tokens (shape {shape})", field=name,
                         source=source, allowed=f"at most {MAX_ASSIGNMENTS:,} tokens")
    if name == "metadata" and nbytes > MAX_FILE_BYTES:
        raise InputError(f"{_gib(nbytes)} of metadata", field=name, source=source,
                         allowed=f"at most {MAX_FILE_BYTES // 2**20} MiB of JSON")


def _metadata(raw: np.ndarray, *, source: str) -> dict[str, Any]:
    """The metadata member's JSON object (bounded in depth and numbers, as every input)."""
    try:
        text = raw.astype(np.uint8).tobytes().decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise InputError("metadata is not JSON", field="metadata", source=source,
                         allowed="UTF-8 JSON text") from None
    try:
        metadata = load_json(text, source=source)
    except InputError as err:
        raise InputError(err.problem, field="metadata", source=source,
                         allowed=f"a JSON object nested at most {MAX_DEPTH} levels") from None
    if not isinstance(metadata, dict):
        raise InputError(f"metadata is a JSON {type(metadata).__name__}", field="metadata",
                         source=source, allowed="a JSON object")
    return metadata


def _mapped(archive: zipfile.ZipFile, name: str, path: str) -> np.ndarray | None:
    """Member ``name`` of ``archive`` (the file ``path``) as a read-only array over a
    memory map of the file, or None where it is not a large stored C-order ``.npy`` of
    numbers (then it is read as usual, and any damage reported then)."""
    try:
        info = archive.getinfo(f"{name}.npy")
    except KeyError:
        return None
    if (info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1
            or info.file_size < MAP_BYTES):
        return None
    with open(path, "rb") as file:
        file.seek(info.header_offset)
        local = file.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        file.seek(start)
        version = np.lib.format.read_magic(file)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(file)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(file)
        data = file.tell()
        size = os.fstat(file.fileno()).st_size
        if fortran or dtype.kind not in "biuf" or dtype.hasobject:
            return None
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0 or data - start + nbytes != info.file_size or data + nbytes > size:
            return None
        whole = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    return np.ndarray(shape, dtype=dtype, buffer=whole, offset=data)


def release_pages(array: np.ndarray) -> None:
    """Drop the resident pages of a contiguous ``array`` that views a read-only file
    map (MADV_DONTNEED: the next read faults them in again from the file); nothing for
    other arrays."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if not isinstance(base, mmap.mmap) or not array.flags.c_contiguous or not array.size:
        return
    start = array.ctypes.data - np.frombuffer(base, dtype=np.uint8, count=1).ctypes.data
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (start + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > first and hasattr(base, "madvise"):
        base.madvise(mmap.MADV_DONTNEED, first, end - first)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fail(problem: str, field: str, allowed: str | None = None):
    raise InputError(problem, field=field, allowed=allowed)


def _blocks(array: np.ndarray, size: int = 1 << 21):
    """Views of at most about ``size`` elements that together cover ``array``: checks
    run block by block, in bounded memory, over arrays mapped from a file too."""
    if array.ndim == 0 or array.size <= size:
        yield array
    elif array.flags.c_contiguous:
        flat = array.reshape(-1)
        for start in range(0, flat.size, size):
            yield flat[start:start + size]
    else:
        for part in array:
            yield from _blocks(part, size)


def _all_finite(array: np.ndarray) -> bool:
    """No NaN or infinity in ``array``; the pages of a mapped one are handed back."""
    if np.issubdtype(array.dtype, np.integer):
        return True
    for part in _blocks(array):
        if part.dtype == np.float16:  # on the bits: exponent all ones is inf or NaN
            bits = part.view(np.uint16)
            finite = bits.max(initial=0) < 0x7C00 or (bits & 0x7FFF).max() < 0x7C00
        else:
            finite = bool(np.isfinite(part).all())
        release_pages(part)
        if not finite:
            return False
    return True


def _all_at_least_zero(array: np.ndarray) -> bool:
    for part in _blocks(array):
        low = part.min(initial=0)
        release_pages(part)
        if low < 0:
            return False
    return True


def _check_finite(name: str, array: np.ndarray) -> None:
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        _fail(f"expected numbers, got {array.dtype}", name, "integer or float arrays")
    if not _all_finite(array):
        _fail("contains NaN or infinite values", name, "finite numbers")


def _narrow(name: str, array: np.ndarray, dtype) -> np.ndarray:
    """``array`` (checked finite) in the schema's float dtype; values beyond its range
    would turn into inf and make a file that cannot be read back, so they are an error
    here."""
    with np.errstate(over="ignore"):
        out = array.astype(dtype, copy=False)
    if out is not array and not _all_finite(out):
        _fail(f"values beyond the range of {np.dtype(dtype).name}", name,
              f"|value| <= {float(np.finfo(dtype).max):g}")
    return out


def _check_choices(ids: np.ndarray, n_experts: int) -> None:
    """Expert ids in -1..E-1, distinct within a token, and some routed in every layer;
    layer by layer (a sorted copy of one layer at a time, a mapped layer's pages handed
    back after each look)."""
    low_l, high_l = [], []
    for layer in ids:
        low_l.append(int(layer.min()))
        high_l.append(int(layer.max()))
        release_pages(layer)
    if min(low_l) < -1 or max(high_l) >= n_experts:
        _fail(f"expert ids range {min(low_l)}..{max(high_l)}", "expert_ids",
              f"-1 (dropped) or 0..{n_experts - 1}")
    for layer in ids:
        repeated = repeats_an_expert(layer)
        release_pages(layer)
        if repeated:
            _fail("a token chooses the same expert twice", "expert_ids",
                  "K distinct experts per token (or -1 for dropped slots)")
    for index, high in enumerate(high_l):
        if high < 0:
            _fail(f"layer {index} has every slot dropped", "expert_ids",
                  "at least one routed assignment per layer")


def repeats_an_expert(ids_tk: np.ndarray) -> bool:
    """Whether a token (row) names an expert (>= 0) twice: slot against earlier slots
    for a few slots (contiguous compares), by sorting each row for many."""
    top_k = ids_tk.shape[1]
    if top_k > 16:
        ordered = np.sort(ids_tk, axis=-1)
        return bool(((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any())
    ids_kt = np.ascontiguousarray(ids_tk.T)
    return any(((ids_kt[:k] == ids_kt[k]) & (ids_kt[k] >= 0)).any() for k in range(1, top_k))


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
    if n_layers > MAX_LAYERS or n_tokens * top_k > MAX_ASSIGNMENTS:
        _fail(f"{n_layers:,} layers of {n_tokens:,} tokens x top-{top_k}", "expert_ids",
              f"at most {MAX_LAYERS:,} layers and {MAX_ASSIGNMENTS:,} assignments per layer")
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
    _check_choices(ids, n_experts)
    if trace.weights.shape != ids.shape:
        _fail(f"shape {trace.weights.shape} differs from expert_ids {ids.shape}", "weights")
    _check_finite("weights", trace.weights)
    if not _all_at_least_zero(trace.weights):
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
