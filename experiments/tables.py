"""The one table and cell formatter of the harness: every markdown table it writes goes through
`compare_table`, every cell through `format_cell`."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from ctxjax.metrics import format_value, markdown_table


class Stat(NamedTuple):
    """A metric over independent units: mean, the bounds of its interval
    (`experiments.stats.interval`), the count of units where it is defined, and the two-sided
    p-value of the t-test of mean 0 (read for differences); NaN mean when undefined, NaN bounds
    and p with no interval."""

    mean: float
    lo: float
    hi: float
    n: int
    p: float = math.nan


def format_cell(value: Any) -> str:
    """A table cell: a `Stat` as "mean [lo, hi]" (the mean alone without an interval, "-" when
    undefined), anything else as the library formats it (`ctxjax.metrics.format_value`)."""
    if isinstance(value, Stat):
        if math.isnan(value.mean):
            return "-"
        mean = format_value(value.mean)
        if math.isnan(value.lo):
            return mean
        return f"{mean} [{format_value(value.lo)}, {format_value(value.hi)}]"
    return format_value(value)


def compare_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table with one line per row dict and the given columns, in order; cells through
    `format_cell`, a key a row lacks shows "-"."""
    return markdown_table(rows, columns, format_cell)
