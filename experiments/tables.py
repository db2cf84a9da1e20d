"""The one table and cell formatter of the harness: every markdown table it writes goes through
`compare_table`, every cell through `format_cell`."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np


class Stat(NamedTuple):
    """A metric over runs (seeds): mean, standard deviation and count; NaN mean when undefined."""

    mean: float
    std: float
    n: int


def format_cell(value: Any) -> str:
    """A table cell: floats to 3 decimals, NaN / None as "-", a `Stat` as "mean ± std" (the mean
    alone for one run), text with `|` escaped, one line."""
    if value is None:
        return "-"
    if isinstance(value, Stat):
        if math.isnan(value.mean):
            return "-"
        mean = format_cell(value.mean)
        return f"{mean} ± {format_cell(value.std)}" if value.n > 1 else mean
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "-" if math.isnan(value) else f"{float(value):.3f}"
    return " ".join(str(value).split()).replace("|", "\\|")


def compare_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table with one line per row dict and the given columns, in order.

    Cells go through `format_cell`; a key a row lacks shows "-".
    """
    if not columns:
        raise ValueError("compare_table needs at least one column")
    lines = ["| " + " | ".join(format_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)
