"""A real-text corpus that is always offline: the Python standard library's own source.

Tokens are bytes (vocabulary 256), so no tokenizer has to be downloaded. Files are taken
in sorted order of their path relative to the stdlib root; a file is held out when the
SHA-256 of that relative path falls in the held-out bucket, so the split does not move
when the byte budgets change. The metadata records the Python version and a digest of
the bytes used, since the stdlib differs between Python releases.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moesim.errors import InputError

VOCAB_SIZE = 256
_BUCKETS = 1000  # held-out share is resolved in steps of 0.1 %
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True, kw_only=True, eq=False)
class Corpus:
    """Byte tokens for training and for held-out capture, and where they came from."""

    train: np.ndarray  # uint8 [N_train]
    heldout: np.ndarray  # uint8 [N_heldout]
    metadata: dict[str, Any] = field(default_factory=dict)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _source_files(root: Path) -> list[str]:
    """Relative posix paths of every ``*.py`` under ``root``, sorted; no third-party code."""
    found = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        base = Path(directory).relative_to(root)
        found.extend((base / name).as_posix() for name in files if name.endswith(".py"))
    return sorted(found)


def _is_heldout(relative: str, fraction: float) -> bool:
    digest = hashlib.sha256(relative.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % _BUCKETS < round(fraction * _BUCKETS)


def _part(files: list[str], chunks: list[bytes]) -> dict[str, Any]:
    data = b"".join(chunks)
    return {
        "files": len(files),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "first_file": files[0] if files else None,
        "last_file": files[-1] if files else None,
    }


@functools.lru_cache(maxsize=4)
def load_corpus(
    *,
    max_train_bytes: int = 4 << 20,
    max_heldout_bytes: int = 256 << 10,
    heldout_fraction: float = 0.1,
    root: str | None = None,
) -> Corpus:
    """Read the stdlib sources into byte tokens (cached; the arrays are read-only).

    Files are added whole, in sorted order, until each part holds its byte budget.
    """
    if not 0 < heldout_fraction < 1:
        raise InputError(
            f"held-out fraction {heldout_fraction}",
            field="heldout_fraction",
            allowed="between 0 and 1",
        )
    base = Path(root) if root is not None else stdlib_root()
    if not base.is_dir():
        raise InputError("no such directory", source=str(base), field="corpus root")
    parts: dict[str, tuple[list[str], list[bytes], int]] = {
        "train": ([], [], max_train_bytes),
        "heldout": ([], [], max_heldout_bytes),
    }
    sizes = {"train": 0, "heldout": 0}
    for relative in _source_files(base):
        name = "heldout" if _is_heldout(relative, heldout_fraction) else "train"
        files, chunks, budget = parts[name]
        if sizes[name] >= budget:
            if all(sizes[n] >= parts[n][2] for n in parts):
                break
            continue
        data = (base / relative).read_bytes()
        files.append(relative)
        chunks.append(data)
        sizes[name] += len(data)
    for name, (files, _, _) in parts.items():
        if not files:
            raise InputError(
                f"no {name} files (*.py) found",
                source=str(base),
                field="corpus root",
                allowed="a directory of Python sources",
            )

    def tokens(name: str) -> np.ndarray:
        array = np.frombuffer(b"".join(parts[name][1]), dtype=np.uint8)
        array.flags.writeable = False
        return array

    metadata = {
        "kind": "python-stdlib",
        "root": str(base),
        "python_version": platform.python_version(),
        "tokenizer": "bytes (vocab 256)",
        "order": "files sorted by path relative to the root",
        "split": f"held out when int(sha256(relative path)[:4]) % {_BUCKETS} < "
        f"{round(heldout_fraction * _BUCKETS)}",
        "train": _part(parts["train"][0], parts["train"][1]),
        "heldout": {
            **_part(parts["heldout"][0], parts["heldout"][1]),
            "file_list": parts["heldout"][0],
            "file_bytes": [len(chunk) for chunk in parts["heldout"][1]],
        },
    }
    return Corpus(train=tokens("train"), heldout=tokens("heldout"), metadata=metadata)


def training_batches(
    tokens: np.ndarray,
    *,
    batch_size: int,
    seq_len: int,
    seed: int,
) -> Iterator[np.ndarray]:
    """Endless int64 [batch, seq_len + 1] windows at seeded random offsets.

    One extra token per row so inputs are ``row[:-1]`` and targets ``row[1:]``.
    """
    if len(tokens) <= seq_len + 1:
        raise InputError(
            f"corpus of {len(tokens)} tokens is shorter than one sequence",
            field="seq_len",
            allowed=f"< {len(tokens) - 1}",
        )
    rng = np.random.default_rng(seed)
    span = np.arange(seq_len + 1)
    while True:
        starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
        yield tokens[starts[:, None] + span].astype(np.int64)


def heldout_sequences(
    tokens: np.ndarray,
    *,
    num_sequences: int,
    seq_len: int,
) -> np.ndarray:
    """The first ``num_sequences`` consecutive, non-overlapping windows: int64 [B, S]."""
    needed = num_sequences * seq_len
    if needed > len(tokens):
        raise InputError(
            f"{num_sequences} sequences of {seq_len} need {needed} held-out "
            f"tokens, the corpus has {len(tokens)}",
            field="num_tokens",
            allowed=f"<= {len(tokens)}",
        )
    return tokens[:needed].reshape(num_sequences, seq_len).astype(np.int64)
