"""Terminal tables (reports/terminal.py): aligned columns, plain text, byte-identical
reruns, long cells wrapped inside their column."""

from __future__ import annotations

import pytest

from moesim.reports.terminal import render_table

ROWS = [("dgx-b200", "b200", "8", "One DGX B200 node"),
        ("h800-cluster", "h800", "2,048", "DeepSeek-V3 H800 cluster [bold]x[/bold]")]


def test_columns_align_and_numbers_are_right_aligned():
    text = render_table(("preset", "GPU", "max GPUs", "description"), ROWS)
    head, rule, *body = text.splitlines()
    assert set(rule) == {"-"}
    assert len(body) == 2
    # Left-aligned columns start at the same offset on every line ...
    assert body[0].index(" b200") + 1 == body[1].index(" h800") + 1 == head.index("GPU")
    assert body[0].index("One") == body[1].index("DeepSeek") == head.index("description")
    # ... numbers end where their header ends.
    end = head.index("max GPUs") + len("max GPUs")
    assert body[0].index("8") + 1 == end and body[1].index("2,048") + 5 == end


def test_plain_text_without_markup_or_colour_and_deterministic():
    text = render_table(("a", "b"), [("x", "[bold]y[/bold]")], title="T")
    assert "\x1b[" not in text
    assert "[bold]y[/bold]" in text  # cells are text, never rich markup
    assert text.splitlines()[0] == "T"
    assert text == render_table(("a", "b"), [("x", "[bold]y[/bold]")], title="T")
    assert all(line == line.rstrip() for line in text.splitlines())


def test_long_cells_wrap_inside_their_column_within_the_width():
    long = " ".join(["word"] * 60)
    text = render_table(("name", "text"), [("n", long)], width=60, indent=2)
    lines = text.splitlines()
    assert len(lines) > 3 and all(len(line) <= 60 for line in lines)
    assert all(line.startswith("  ") for line in lines)
    start = lines[0].index("text")
    assert all(line[start:start + 4] == "word" for line in lines[2:])
    whole = render_table(("name", "text"), [("n", long)], width=None)
    assert len(whole.splitlines()) == 3  # width=None never wraps


def test_no_header_and_explicit_justify():
    text = render_table(None, [("step time", "4.01 ms"), ("tokens/s", "12,345")],
                        justify="ll")
    lines = text.splitlines()
    assert len(lines) == 2
    assert lines[0].index("4.01") == lines[1].index("12,345")


def test_rows_of_the_wrong_length_are_refused():
    with pytest.raises(ValueError):
        render_table(("a", "b"), [("only one",)])
