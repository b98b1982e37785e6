"""The one table type of every report, its two renderings (aligned text, Markdown) and the cell formats.

A table is built once from result numbers and rendered either way, so the summary a command prints
and the Markdown it writes cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

MISSING = "-"


@dataclass
class Table:
    """A titled grid of already formatted cells."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    note: Optional[str] = None
    text_columns: int = 1  # leading columns of names, aligned left; the rest are numbers, aligned right


# --------------------------------------------------------------------------------------------
# Renderers


def render_text(table: Table) -> str:
    """Columns padded to their widest cell; names left-aligned, numbers right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(table.headers, *table.rows, strict=True)]

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(cell.ljust(w) if i < table.text_columns else cell.rjust(w) for i, (cell, w) in pairs)

    out = [table.title, line(table.headers), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in table.rows] or ["(no rows)"]
    if table.note:
        out.append(f"({table.note})")
    return "\n".join(out)


def _md_cell(cell: str) -> str:
    return str(cell).replace("|", "\\|")


def render_markdown(table: Table, level: int = 3) -> str:
    """A Markdown table under a heading of `level` (0: no heading, for a table inside a section)."""
    align = ["---"] * table.text_columns + ["---:"] * (len(table.headers) - table.text_columns)
    out = [f"{'#' * level} {table.title}", ""] if level > 0 else []
    out += ["| " + " | ".join(table.headers) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    if not table.rows:
        out.append("| (no rows) |" + " |" * (len(table.headers) - 1))
    if table.note:
        out += ["", f"_{table.note}._"]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Cell formats: every one turns a missing value into MISSING


def fmt_number(value: Any, pattern: str) -> str:
    return MISSING if value is None else pattern.format(value)


def fmt_int(value: Optional[int]) -> str:
    return fmt_number(value, "{:,}")


def fmt_ms(value: Optional[float]) -> str:
    return fmt_number(value, "{:.2f}")


def fmt_mb(value: Optional[float]) -> str:
    return fmt_number(value, "{:.1f}")


def fmt_s(value: Optional[float]) -> str:
    return fmt_number(value, "{:.2f}")


def fmt_times(value: Optional[float]) -> str:
    """A ratio as a multiple (speed-ups, peak against a reference)."""
    return fmt_number(value, "{:.2f}x")


def fmt_reduction(value: Optional[float]) -> str:
    """Three significant digits below 100 (full fine-tuning's reduction is a small fraction)."""
    if value is None:
        return MISSING
    return f"{value:,.0f}x" if value >= 99.5 else f"{value:#.3g}x"


def fmt_pct(value: Optional[float]) -> str:
    return fmt_number(value, "{:.1f}%")


def fmt_ratio(value: Optional[float]) -> str:
    """A fraction shown as a percentage with three decimals (trainable / all parameters)."""
    return fmt_number(None if value is None else 100.0 * value, "{:.3f}%")


def fmt_mean_std(stat: Optional[Mapping], pattern: str) -> str:
    """'mean ± std' of a mean_std dict; the mean alone when std is None (one seed); MISSING without a mean."""
    if not stat or stat.get("mean") is None:
        return MISSING
    text = pattern.format(stat["mean"])
    return text if stat.get("std") is None else f"{text} ± {pattern.format(stat['std'])}"
