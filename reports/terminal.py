"""Terminal tables: one renderer (rich) for every table a command prints.

Tables render to a plain string of a fixed width, without colour codes, so the output is
the same on a terminal, in a pipe and under typer's CliRunner, and reruns are
byte-identical. rich is imported inside the function: `moesim --help` never loads it.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

WIDTH = 100  # characters; longer cells wrap inside their column
_UNLIMITED = 10_000

# A cell that reads as a number (with an optional unit): right-aligned.
_NUMBER = re.compile(r"^[-+]?(\d[\d,]*(\.\d+)?([eE][-+]?\d+)?|\.\d+)( ?[%a-zA-Z/]{1,8})?"
                     r"( \(.*\))?$")


def _numeric(cells: list[str]) -> bool:
    filled = [c for c in cells if c not in ("", "-")]
    return bool(filled) and all(_NUMBER.match(c) for c in filled)


def render_table(header: Sequence[str] | None, rows: Sequence[Sequence[object]], *,
                 title: str | None = None, indent: int = 0, width: int | None = WIDTH,
                 justify: str | None = None) -> str:
    """``rows`` under ``header`` (``None``: no header line) as aligned text.

    Columns whose cells all read as numbers are right-aligned, the others left-aligned;
    ``justify`` (one letter per column, ``l``/``r``/``c``) overrides that. Cells longer
    than their share of ``width`` characters wrap inside their column; ``width=None``
    never wraps (for identifiers that must stay whole). Every line is prefixed by
    ``indent`` spaces and stripped of trailing blanks.
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    cells = [["" if c is None else str(c) for c in row] for row in rows]
    n_cols = len(header) if header is not None else max((len(r) for r in cells), default=0)
    if any(len(row) != n_cols for row in cells):
        raise ValueError(f"every row needs {n_cols} cells")
    if justify is None:
        justify = "".join("r" if _numeric([row[i] for row in cells]) else "l"
                          for i in range(n_cols))
    sides = {"l": "left", "r": "right", "c": "center"}
    # rich's SIMPLE box with an ASCII rule under the header: plain in any encoding.
    plain = box.Box("    \n    \n -- \n    \n    \n -- \n    \n    \n", ascii=True)
    table = Table(title=title, box=plain, show_header=header is not None, show_edge=False,
                  pad_edge=False, padding=(0, 1, 0, 0), title_justify="left", highlight=False)
    for i in range(n_cols):
        table.add_column("" if header is None else str(header[i]), justify=sides[justify[i]],
                         overflow="fold")
    for row in cells:
        table.add_row(*row)
    buffer = io.StringIO()
    limit = _UNLIMITED if width is None else max(width - indent, 20)
    console = Console(file=buffer, width=limit, color_system=None,
                      force_terminal=False, no_color=True, highlight=False, emoji=False,
                      markup=False, soft_wrap=False, legacy_windows=False)
    console.print(table)
    lines = [line.rstrip() for line in buffer.getvalue().splitlines()]
    return "\n".join((" " * indent + line) if line else "" for line in lines).rstrip("\n")
