"""Writing results: every file appears whole or not at all."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would surprise whoever reads the results
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1) + "\n")


def write_parquet(path: Path, frame) -> None:
    write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))


def write_figure(path: Path, figure) -> None:
    write_atomic(path, lambda tmp: figure.savefig(tmp, format=path.suffix.lstrip(".") or "png",
                                                  dpi=110, bbox_inches="tight"))


def check_out_dir(out: Path) -> None:
    """Make ``out`` a folder results can go to, or say plainly why it cannot be."""
    from moesim.errors import InputError

    if str(out).strip() == "":
        raise InputError("an empty path", field="--out", allowed="a folder path")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file, not a folder", field="--out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create folder {out} ({err.strerror or err})",
                         field="--out") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"folder {out} is not writable", field="--out")
