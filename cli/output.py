"""Writing results: every file appears whole or not at all, and a folder of results
appears only once every file in it is written (:func:`staged_folder`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from moesim.errors import InputError


def _check_file_target(path: Path) -> None:
    if str(path).strip() in ("", "."):
        raise InputError("an empty path", source=str(path), allowed="a file path")
    if path.exists() and not path.is_file():
        what = "a folder" if path.is_dir() else "not a regular file"
        raise InputError(f"is {what}; results are written as regular files",
                         source=str(path), allowed="a new or existing regular file")


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over."""
    _check_file_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise InputError(f"cannot write here ({err.strerror or err})",
                         source=str(path)) from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would surprise whoever reads the results
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except OSError as err:  # a full disk, a file system that refuses the rename
        raise InputError(f"cannot write ({err.strerror or err})", source=str(path)) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: Path, data: bytes) -> None:
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A hidden folder beside ``out`` to write results into; when the block ends without
    an error its files move into ``out`` (created if need be; files of the same name are
    replaced, others kept), otherwise it is removed and ``out`` is as it was."""
    check_out_target(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial",
                                      dir=out.parent))
    except OSError as err:
        raise InputError(f"cannot write into {out.parent} ({err.strerror or err})",
                         field="--out") from None
    try:
        yield stage
        for path in sorted(stage.rglob("*")):
            if path.is_file():
                target = out / path.relative_to(stage)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1) + "\n")


def write_parquet(path: Path, frame) -> None:
    write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))


def write_figure(path: Path, figure) -> None:
    kind = path.suffix.lstrip(".").lower() or "png"
    known = figure.canvas.get_supported_filetypes()
    if kind not in known:
        raise InputError(f"cannot draw a .{kind} file", source=str(path),
                         allowed=", ".join(f".{k}" for k in sorted(known)))
    write_atomic(path, lambda tmp: figure.savefig(tmp, format=kind, dpi=110,
                                                  bbox_inches="tight"))


def check_out_target(out: Path) -> None:
    """Say plainly, before any work, why results cannot go to folder ``out`` (creates
    nothing; an empty ``--out`` is refused by :func:`moesim.cli.common.out_folder`)."""
    for place in (out, *out.parents):
        if place.exists():
            if not place.is_dir():
                raise InputError(f"{place} is a file, not a folder", field="--out")
            if not os.access(place, os.W_OK | os.X_OK):
                raise InputError(f"folder {place} is not writable", field="--out")
            return
