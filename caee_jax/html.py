"""Small HTML tables for notebooks' rich display (`_repr_html_` of configs, rules, cost tables, statistics)."""

from __future__ import annotations

import dataclasses
import enum
import html
from collections.abc import Sequence

STYLE = "border-collapse:collapse;font-family:monospace;font-size:12px"
CELL = "padding:1px 8px;text-align:left;border-bottom:1px solid #ddd"


def _cell(value) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, float):
        value = f"{value:.6g}"
    return html.escape(str(value))


def table(title: str, header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """An HTML table with a caption, a header row and one row per entry of `rows`."""
    head = "".join(f'<th style="{CELL}">{html.escape(h)}</th>' for h in header)
    body = "".join("<tr>" + "".join(f'<td style="{CELL}">{_cell(v)}</td>' for v in row) + "</tr>" for row in rows)
    caption = f'<caption style="text-align:left;font-weight:bold">{html.escape(title)}</caption>'
    return f'<table style="{STYLE}">{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def fields_table(value, title: str | None = None, columns: int = 2) -> str:
    """A dataclass's fields as name/value pairs, `columns` pairs per row."""
    pairs = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    rows = []
    for start in range(0, len(pairs), columns):
        chunk = pairs[start : start + columns]
        rows.append([item for pair in chunk for item in pair] + ["", ""] * (columns - len(chunk)))
    return table(title or type(value).__name__, ["field", "value"] * columns, rows)
