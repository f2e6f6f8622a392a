"""Plain-text tables for the operator commands (no colours, stable column order)."""

from __future__ import annotations

from collections.abc import Sequence


def render(headers: Sequence[str], rows: Sequence[Sequence[object]], *, max_width: int = 0) -> str:
    """Left-aligned columns separated by two spaces; the last column is never padded.

    With `max_width`, a cell longer than it is cut with an ellipsis so that one huge value
    (an image digest, an error message) does not push every other column off the screen.
    """
    cells = [[_cell(v, max_width) for v in row] for row in rows]
    table = [list(headers), *cells]
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
    lines = []
    for row in table:
        padded = [c.ljust(widths[i]) for i, c in enumerate(row[:-1])]
        lines.append("  ".join([*padded, row[-1]]).rstrip())
    return "\n".join(lines)


def _cell(value: object, max_width: int) -> str:
    text = "-" if value is None or value == "" else str(value)
    text = text.replace("\n", " ")
    if max_width and len(text) > max_width:
        return text[: max_width - 1] + "…"
    return text
