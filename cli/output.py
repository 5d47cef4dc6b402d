"""Writing results: every file appears whole or not at all, and a folder of results
appears only once every file in it is written (:func:`staged_folder`).

A results folder holds a marker file, :data:`MARKER`: writing results again to the same
``--out`` replaces that folder whole (no file of the earlier run stays beside the new
ones), and a folder without it that holds anything is refused rather than written into.
Temporary files and folders carry the writing process's id, so the leftovers of a
process that was killed are removed by the next write to the same place.
"""

from __future__ import annotations

import contextlib
import glob
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


MARKER = ".moesim"  # in every results folder moesim writes
_MARKER_TEXT = "A results folder written by moesim: writing to it again replaces it whole.\n"


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _remove_leftovers(path: Path, suffix: str) -> None:
    """Temporary files or folders for ``path`` left by processes that no longer run."""
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*{suffix}"):
        pid = leftover.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    leftover.unlink()


def _umask() -> int:
    """This process's umask (reading it means setting it, so it is set back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over."""
    _check_file_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(path, ".tmp")
        fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp",
                                   dir=path.parent)
    except OSError as err:
        raise InputError(f"cannot write here ({err.strerror or err})",
                         source=str(path)) from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would surprise whoever reads the results
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
def staged_folder(out: Path, *, adding: bool = False) -> Iterator[Path]:
    """A hidden folder beside ``out`` to write results into. When the block ends without
    an error it becomes ``out``, replacing a results folder there whole; with ``adding``
    (a report into the results it describes) its files move into ``out`` instead, over
    files of the same name. On an error it is removed and ``out`` is as it was."""
    check_out_target(out, adding=adding)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(out, ".partial")
        stage = Path(tempfile.mkdtemp(prefix=_temporary_prefix(out), suffix=".partial",
                                      dir=out.parent))
    except OSError as err:
        raise InputError(f"cannot write into {out.parent} ({err.strerror or err})",
                         field="--out") from None
    try:
        yield stage
        if adding:
            for path in sorted(stage.rglob("*")):
                if path.is_file():
                    target = out / path.relative_to(stage)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(path, target)
        else:
            (stage / MARKER).write_text(_MARKER_TEXT, encoding="utf-8")
            _replace_folder(out, stage)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _replace_folder(out: Path, stage: Path) -> None:
    """Rename ``stage`` to ``out``; an ``out`` already there (a results folder or an
    empty one) is renamed aside first and removed once the new one is in place."""
    os.chmod(stage, 0o777 & ~_umask())  # mkdtemp's 0700 would hide the results from others
    earlier = None
    if out.exists():
        earlier = Path(tempfile.mkdtemp(prefix=_temporary_prefix(out), suffix=".partial",
                                        dir=out.parent))
        os.replace(out, earlier / out.name)
    os.replace(stage, out)
    if earlier is not None:
        shutil.rmtree(earlier, ignore_errors=True)


def mark_results_folder(out: Path) -> None:
    """Create ``out`` (checked by :func:`check_out_target`) as a results folder written
    in place, file by file (a sweep's)."""
    if not (out / MARKER).is_file():
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / MARKER, _MARKER_TEXT)


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


def check_out_target(out: Path, *, adding: bool = False) -> None:
    """Say plainly, before any work, why results cannot go to folder ``out`` (creates
    nothing; an empty ``--out`` is refused by :func:`moesim.cli.common.out_folder`): a
    file on the way, a folder not writable, or a folder of files moesim did not write
    (unless ``adding`` a report to results)."""
    for place in (out, *out.parents):
        if place.exists():
            if not place.is_dir():
                raise InputError(f"{place} is a file, not a folder", field="--out")
            if not os.access(place, os.W_OK | os.X_OK):
                raise InputError(f"folder {place} is not writable", field="--out")
            break
    if (not adding and out.is_dir() and not (out / MARKER).is_file()
            and any(out.iterdir())):
        raise InputError(f"folder {out} holds files moesim did not write (it has no {MARKER} "
                         "marker), which new results would mix with or replace",
                         field="--out", allowed="a new or empty folder, or a results folder "
                         "moesim wrote, which is replaced whole")
