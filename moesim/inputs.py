"""The one way user files and YAML texts are read: bounded in size and depth, UTF-8, no
duplicate keys, no aliases, and every problem one :class:`InputError` naming the source.

Scenario, hardware, topology and recorded-run files, ``--set`` values and loads files go
through here, so a file of ``/dev/zero``, a billion-laughs YAML or a key written twice
never reaches the parser's corners or silently keeps the last value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from moesim.errors import InputError

MAX_FILE_BYTES = 16 * 2**20  # a scenario, topology or recorded-run file is a few kB
MAX_DEPTH = 32  # the deepest schema (recorded runs) nests 5 levels
MAX_DIGITS = 100  # an integer longer than this is a mistake (and Python's own limit is 4300)
# A number read back from a results folder past this is damage, not a result: a report's
# figures scale their axes by it, and 1e308 x 1.02 is no longer finite.
MAX_RESULT_MAGNITUDE = 1e100


def read_text(path: str | Path, *, what: str = "file",
              limit: int = MAX_FILE_BYTES) -> str:
    """The UTF-8 text of ``path``, at most ``limit`` bytes."""
    source = str(path)
    try:
        # A named pipe with no writer would block open() forever; opened without
        # blocking it reads as empty instead, and a writer's data still arrives.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(limit + 1)
    except IsADirectoryError:
        raise InputError(f"is a folder, not a {what}", source=source) from None
    except OSError as err:
        raise InputError(f"cannot read file ({err.strerror or err})", source=source) from None
    if len(data) > limit:
        raise InputError(f"larger than {limit // 2**20} MiB", source=source,
                         allowed=f"a {what} of at most {limit // 2**20} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"not UTF-8 text (byte {err.start})", source=source,
                         allowed=f"a UTF-8 {what}") from None


class _Refused(Exception):
    def __init__(self, problem: str, mark) -> None:
        super().__init__(problem)
        self.problem, self.mark = problem, mark


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases, duplicate keys and deep nesting."""

    depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _Refused("YAML aliases (*name) are not supported", self.peek_event().start_mark)
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _Refused(f"nested deeper than {MAX_DEPTH} levels",
                               self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_yaml_int(self, node):
        if len(node.value) > MAX_DIGITS:
            raise _Refused(f"an integer of more than {MAX_DIGITS} digits", node.start_mark)
        return super().construct_yaml_int(node)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base loader says so
                break
            if duplicate:
                raise _Refused(f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)


def _where(mark) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def load_yaml(text: str, *, source: str) -> Any:
    """Parse YAML ``text``; every problem is one InputError naming ``source``."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except _Refused as err:
        raise InputError(f"{err.problem}{_where(err.mark)}", source=source) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or "not valid YAML"
        raise InputError(f"broken YAML{_where(mark)}: {problem}", source=source) from None
    except RecursionError:
        raise InputError(f"nested deeper than {MAX_DEPTH} levels", source=source) from None


def read_yaml(path: str | Path, *, what: str = "YAML file") -> Any:
    """Read and parse a YAML file (see :func:`read_text` and :func:`load_yaml`)."""
    return load_yaml(read_text(path, what=what), source=str(path))


def load_json(text: str | bytes, *, source: str) -> Any:
    """Parse JSON ``text`` (a trace's metadata, a Megatron line, a results file) with the
    limits YAML has: nesting depth, integer length; every problem is one InputError
    naming ``source``."""
    import json

    def bounded_int(digits: str) -> int:
        if len(digits) > MAX_DIGITS:
            raise InputError(f"an integer of more than {MAX_DIGITS} digits", source=source)
        return int(digits)

    try:
        value = json.loads(text, parse_int=bounded_int)
    except RecursionError:
        raise InputError(f"nested deeper than {MAX_DEPTH} levels", source=source) from None
    except json.JSONDecodeError as err:
        raise InputError(f"broken JSON at line {err.lineno}, column {err.colno}: {err.msg}",
                         source=source) from None
    except UnicodeDecodeError as err:
        raise InputError(f"not UTF-8 text (byte {err.start})", source=source) from None
    if _depth(value) > MAX_DEPTH:
        raise InputError(f"nested deeper than {MAX_DEPTH} levels", source=source)
    return value


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth + 1)
            if depth + 1 > MAX_DEPTH:
                break
            todo.extend((child, depth + 1)
                        for child in (item.values() if isinstance(item, dict) else item))
    return deepest
