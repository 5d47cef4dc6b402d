"""A tiny document model rendered to Markdown and to one self-contained HTML file.

The HTML comes from the Jinja2 template ``templates/report.html.j2`` (autoescaped) with
every figure embedded as a data URI, so the file can be mailed or archived alone; the
Markdown links the figures' PNG files beside it.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Figure:
    path: str  # relative to the document
    caption: str


Block = Heading | Paragraph | Table | Figure
# A cell that reads as a number, maybe with a unit or a spread: right-aligned in HTML.
_NUMBER = re.compile(r"^[-+]?[\d.,]+(e[-+]?\d+)?%?( ?(± ?[\d.,]+|[A-Za-z/%$-]+( ?[A-Za-z/]+)?))?$")


def to_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Paragraph):
            out.append(block.text)
        elif isinstance(block, Table):
            out.append("| " + " | ".join(block.header) + " |")
            out.append("|" + "---|" * len(block.header))
            out.extend("| " + " | ".join(row) + " |" for row in block.rows)
        else:
            out.append(f"![{block.caption}]({block.path})\n\n*{block.caption}*")
        out.append("")
    return "\n".join(out)


@cache
def _template():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("moesim.reports", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.tests["numeric"] = lambda cell: bool(_NUMBER.match(str(cell)))
    return env.get_template("report.html.j2")


def to_html(blocks: list[Block], *, title: str, images: Mapping[str, bytes]) -> str:
    """One standalone HTML page; ``images`` maps each figure's ``path`` to its PNG bytes,
    which are embedded (a figure without bytes is an error, not a broken link)."""
    items = []
    for block in blocks:
        if isinstance(block, Heading):
            items.append({"kind": "heading", "text": block.text, "level": block.level})
        elif isinstance(block, Paragraph):
            items.append({"kind": "paragraph", "text": block.text})
        elif isinstance(block, Table):
            items.append({"kind": "table", "header": block.header, "rows": block.rows})
        else:
            data = base64.b64encode(images[block.path]).decode("ascii")
            items.append({"kind": "figure", "src": f"data:image/png;base64,{data}",
                          "caption": block.caption})
    return _template().render(title=title, blocks=items)


def figure_png(figure) -> bytes:
    """A matplotlib figure as PNG bytes (closed afterwards: reports draw many)."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight",
                   metadata={"Software": None})  # no version stamp: reruns are identical
    plt.close(figure)
    return buffer.getvalue()
