"""Removability metrics (accuracy with and without the context, harm, help, length change) and
per-layer hidden-state cosine similarity. Pure numpy; the inputs are host arrays.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _as_bool_N(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {arr.shape}")
    if arr.dtype != bool:
        if not (np.issubdtype(arr.dtype, np.number) and np.isin(arr, (0, 1)).all()):
            raise ValueError(f"{name} must be booleans (or 0/1), got dtype {arr.dtype}")
        arr = arr.astype(bool)
    return arr


def _as_len_N(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {arr.shape}")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError(f"{name} must be finite and >= 0")
    return arr


def removability_metrics(
    correct_x: Any, correct_xc: Any, len_x: Any, len_xc: Any
) -> dict[str, float | int]:
    """Metrics comparing answers without (x) and with (xc) the context, over the same N items.

    Args:
      correct_x, correct_xc: [N] bool, item answered right without / with the context.
      len_x, len_xc: [N] response lengths (tokens) without / with the context.

    Returns a dict of Python numbers:
      n, acc_x, acc_xc, both_correct (right in both views);
      harm = P(wrong with c | right without c), 0.0 when no item is right without c
        (`n_right_x` = 0 tells the two apart);
      help = P(right with c | wrong without c), 0.0 when no item is wrong without c (`n_wrong_x`);
      delta_len = mean(len_xc) / mean(len_x) - 1, NaN when mean(len_x) is 0 (a ratio to nothing
        is undefined; 0.0 would claim "no change").
    """
    cx, cxc = _as_bool_N("correct_x", correct_x), _as_bool_N("correct_xc", correct_xc)
    lx, lxc = _as_len_N("len_x", len_x), _as_len_N("len_xc", len_xc)
    n = cx.shape[0]
    if not cxc.shape[0] == lx.shape[0] == lxc.shape[0] == n:
        raise ValueError(
            f"inputs must share N: correct_x {cx.shape}, correct_xc {cxc.shape}, "
            f"len_x {lx.shape}, len_xc {lxc.shape}"
        )
    if n == 0:
        raise ValueError("no items: metrics of an empty evaluation are undefined")
    n_right_x = int(cx.sum())
    n_wrong_x = n - n_right_x
    harmed = int((cx & ~cxc).sum())
    helped = int((~cx & cxc).sum())
    mean_len_x = float(lx.mean())
    return {
        "n": n,
        "acc_x": float(cx.mean()),
        "acc_xc": float(cxc.mean()),
        "both_correct": float((cx & cxc).mean()),
        "harm": harmed / n_right_x if n_right_x else 0.0,
        "n_right_x": n_right_x,
        "help": helped / n_wrong_x if n_wrong_x else 0.0,
        "n_wrong_x": n_wrong_x,
        "delta_len": float(lxc.mean()) / mean_len_x - 1.0 if mean_len_x > 0 else float("nan"),
    }


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


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table with one line per row dict and the given columns, in order.

    Cells go through `format_value`; a key a row lacks shows "-".
    """
    if not columns:
        raise ValueError("markdown_table needs at least one column")
    lines = [
        "| " + " | ".join(format_value(c) for c in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(format_value(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)
