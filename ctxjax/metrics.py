"""Removability metrics (accuracy with and without the context, harm, help, length change) and
per-layer hidden-state cosine similarity. Pure numpy; the inputs are host arrays. A ratio with an
empty denominator is None (undefined), never 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np


def _as_bool_NxK(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim not in (1, 2):
        raise ValueError(f"{name} must be [N] or [N, K], got shape {arr.shape}")
    if arr.dtype != bool:
        if not (np.issubdtype(arr.dtype, np.number) and np.isin(arr, (0, 1)).all()):
            raise ValueError(f"{name} must be booleans (or 0/1), got dtype {arr.dtype}")
        arr = arr.astype(bool)
    return arr[:, None] if arr.ndim == 1 else arr


def _as_len_NxK(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim not in (1, 2):
        raise ValueError(f"{name} must be [N] or [N, K], got shape {arr.shape}")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError(f"{name} must be finite and >= 0")
    return arr[:, None] if arr.ndim == 1 else arr


def _ratio(num: float, den: float) -> float | None:
    """num / den, or None when den is 0: a ratio over nothing is undefined, and 0.0 would claim a
    measured "never" (None is JSON null, shown "-", left out of means)."""
    return num / den if den else None


def removability_metrics(
    correct_x: Any, correct_xc: Any, len_x: Any, len_xc: Any, correct_x_again: Any = None
) -> dict[str, float | int | None]:
    """Metrics comparing answers without (x) and with (xc) the context, over the same N items.

    Args:
      correct_x, correct_xc: [N] or [N, K] bool, item i's answer (draw j) right without / with
        the context. Column j of the two views must be independent draws (never shared sampling
        noise), else agreeing views give identical answers and Harm is 0 by construction.
      len_x, len_xc: the matching response lengths (tokens) without / with the context.

    Returns a dict of Python numbers, None where a ratio's denominator is empty:
      n (items), draws (K), acc_x, acc_xc (means over all N * K answers), both_correct;
      harm = P(wrong with c | right without c) over the (item, draw) pairs, None when no pair is
        right without c (`n_right_x`, a count of pairs, is then 0);
      help = P(right with c | wrong without c), None when no pair is wrong without c (`n_wrong_x`);
      delta_len = mean(len_xc) / mean(len_x) - 1, None when mean(len_x) is 0.

    `correct_x_again` ([N] or [N, K], optional): a second no-context draw, independent of the
    first. Under sampling a model disagrees with itself, so Harm has a floor that the context plays
    no part in: with harm_floor = P(second no-context draw wrong | first right) over the same pairs
    as Harm (expectation 1 - sum p_i^2 / sum p_i for item accuracies p_i), the result also holds
    harm_floor and excess_harm = harm - harm_floor (None with Harm). Without it neither key is set:
    a floor never measured is not 0.
    """
    cx, cxc = _as_bool_NxK("correct_x", correct_x), _as_bool_NxK("correct_xc", correct_xc)
    lx, lxc = _as_len_NxK("len_x", len_x), _as_len_NxK("len_xc", len_xc)
    if not cx.shape == cxc.shape == lx.shape == lxc.shape:
        raise ValueError(
            f"inputs must share one shape [N] or [N, K]: correct_x {cx.shape}, "
            f"correct_xc {cxc.shape}, len_x {lx.shape}, len_xc {lxc.shape}"
        )
    if cx.size == 0:
        raise ValueError("no items: metrics of an empty evaluation are undefined")
    n_right_x = int(cx.sum())
    n_wrong_x = cx.size - n_right_x
    mean_len_x = float(lx.mean())
    floor = {} if correct_x_again is None else _harm_floor(cx, cxc, correct_x_again)
    return {
        "n": cx.shape[0],
        "draws": cx.shape[1],
        "acc_x": float(cx.mean()),
        "acc_xc": float(cxc.mean()),
        "both_correct": float((cx & cxc).mean()),
        "harm": _ratio(int((cx & ~cxc).sum()), n_right_x),
        "n_right_x": n_right_x,
        "help": _ratio(int((~cx & cxc).sum()), n_wrong_x),
        "n_wrong_x": n_wrong_x,
        "delta_len": float(lxc.mean()) / mean_len_x - 1.0 if mean_len_x > 0 else None,
        **floor,
    }


def _harm_floor(cx: np.ndarray, cxc: np.ndarray, correct_x_again: Any) -> dict:
    """{harm_floor, excess_harm} from a second no-context draw (`removability_metrics`)."""
    again = _as_bool_NxK("correct_x_again", correct_x_again)
    if again.shape != cx.shape:
        raise ValueError(f"correct_x_again {again.shape} must match correct_x {cx.shape}")
    n_right_x = int(cx.sum())
    harm = _ratio(int((cx & ~cxc).sum()), n_right_x)
    harm_floor = _ratio(int((cx & ~again).sum()), n_right_x)
    return {"harm_floor": harm_floor, "excess_harm": None if harm is None else harm - harm_floor}


def cosine_by_layer(h_x: Any, h_xc: Any, eps: float = 1e-8) -> np.ndarray:
    """[L] mean over N of the cosine similarity between matching hidden-state vectors.

    `h_x[l, i]` and `h_xc[l, i]` ([L, N, D] arrays) are layer l's hidden states at the same
    response position i without and with the context. Computed in float64; each norm product is
    floored at `eps`, so a zero vector gives similarity 0 instead of NaN.
    """
    a_LxNxD = np.asarray(h_x, dtype=np.float64)
    b_LxNxD = np.asarray(h_xc, dtype=np.float64)
    if a_LxNxD.ndim != 3 or a_LxNxD.shape != b_LxNxD.shape:
        raise ValueError(
            f"need two [L, N, D] arrays of one shape, got {a_LxNxD.shape} and {b_LxNxD.shape}"
        )
    if a_LxNxD.shape[1] == 0:
        raise ValueError("no positions (N = 0): the mean cosine is undefined")
    dot_LxN = (a_LxNxD * b_LxNxD).sum(-1)
    norms_LxN = np.linalg.norm(a_LxNxD, axis=-1) * np.linalg.norm(b_LxNxD, axis=-1)
    return (dot_LxN / np.maximum(norms_LxN, eps)).mean(axis=1)


# --------------------------------------------------------------------------------------------------
# Reporting: the metric keys a run summarizes and the one way a value or a table is written
# --------------------------------------------------------------------------------------------------

# The removability metrics a run reports before and after distillation, in table order.
SUMMARY_KEYS = ("acc_x", "acc_xc", "harm", "both_correct", "delta_len", "retention_mean")


def format_value(value: Any) -> str:
    """A table cell: floats to 3 decimals, NaN / None as "-", text with `|` escaped, one line."""
    if value is None:
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        # An undefined ratio is "-", never a number (it is also left out of means).
        return "-" if math.isnan(value) else f"{float(value):.3f}"
    return " ".join(str(value).split()).replace("|", "\\|")


def markdown_table(
    rows: list[dict], columns: list[str], format_cell: Callable[[Any], str] = format_value
) -> str:
    """A markdown table with one line per row dict and the given columns, in order.

    Cells go through `format_cell` (a caller with its own cell types wraps `format_value`); a key
    a row lacks shows "-".
    """
    if not columns:
        raise ValueError("markdown_table needs at least one column")
    lines = [
        "| " + " | ".join(format_value(c) for c in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)
