"""The evaluation report of one model (`scripts/eval.py`): `eval.json`, a markdown table (`eval.md`)
and PNG plots for a result of `ctxjax.evaluate.evaluate_checkpoint` / `evaluate_context`,
optionally next to a baseline's (e.g. base vs distilled).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ctxjax.evaluate import evaluate_checkpoint
from experiments.plots import plot_accuracy, plot_layer_cosine, plot_lengths, plot_retention, seq
from experiments.tables import compare_table

JSON_FILE = "eval.json"
MARKDOWN_FILE = "eval.md"
_SAMPLES_SHOWN = 5


def _cosine_rows(cos: Sequence[float]) -> dict[str, float]:
    # Layer 0 (embeddings) is 1 by construction (the same tokens in both views), so the summary is
    # over the transformer blocks 1..L; a mean with it would read higher than any block.
    if len(cos) < 2:
        return {}
    blocks = [float(c) for c in cos[1:]]
    last = len(cos) - 1
    return {
        f"cosine mean (layers 1-{last})": float(np.mean(blocks)),
        "cosine layer 1 (first block)": blocks[0],
        f"cosine layer {last} (last)": blocks[-1],
    }


def summary_rows(result: dict) -> dict[str, Any]:
    """{row label: value} of the table: the removability metrics, retention, cosine summary."""
    rows = {
        "n": result.get("n"),
        "Acc_x": result.get("acc_x"),
        "Acc_xc": result.get("acc_xc"),
        "Harm": result.get("harm"),
        # Sampled only: Harm between two independent no-context draws, and Harm above it.
        **(
            {"Harm floor": result["harm_floor"], "excess Harm": result.get("excess_harm")}
            if "harm_floor" in result
            else {}
        ),
        "BothCorrect": result.get("both_correct"),
        "Help": result.get("help"),
        "Δlen": result.get("delta_len"),
    }
    for name, acc in sorted((result.get("retention") or {}).items()):
        rows[f"retention: {name}"] = acc
    if "retention_mean" in result:
        rows["retention mean"] = result["retention_mean"]
    rows.update(_cosine_rows(seq(result, "layer_cosine")))
    return rows


def metrics_table(result: dict, baseline: dict | None = None) -> str:
    """The metric table of `eval.md`: a `model` column, and a `baseline` column when given."""
    ours = summary_rows(result)
    theirs = summary_rows(baseline) if baseline is not None else {}
    labels = list(ours) + [k for k in theirs if k not in ours]
    rows = [{"metric": k, "model": ours.get(k), "baseline": theirs.get(k)} for k in labels]
    columns = ["metric", "model"] + (["baseline"] if baseline is not None else [])
    return compare_table(rows, columns)


def _markdown(result: dict, baseline: dict | None, title: str, plots: dict[str, str]) -> str:
    parts = [f"# {title or 'Evaluation'}", ""]
    where = [f"{k}: `{result[k]}`" for k in ("model", "task", "context") if result.get(k)]
    if where:
        parts += [", ".join(where), ""]
    parts += [metrics_table(result, baseline), ""]
    n_right = result.get("n_right_x")
    if n_right is not None:
        harm = (
            f"Harm is over the {n_right} items right without the context"
            if n_right
            else "Harm is undefined here (no item is right without the context) and shown as -"
        )
        parts += [
            f"{harm}. Cosine compares the hidden states of the no-context answer's tokens read "
            "without and with the context (layer 0 = embeddings, always 1).",
            "",
        ]
    samples = result.get("samples") or []
    if samples:
        parts += [
            "## Sample answers",
            "",
            compare_table(
                [dict(s) for s in samples[:_SAMPLES_SHOWN]], ["prompt", "answer", "y_x", "y_xc"]
            ),
            "",
            "(`y_x`: answer without the context, `y_xc`: with it.)",
            "",
        ]
    if plots:
        parts += ["## Plots", ""] + [
            f"![{name}]({os.path.basename(p)})" for name, p in plots.items()
        ]
    return "\n".join(parts) + "\n"


def _jsonable(value: Any) -> Any:
    """Numpy values to Python ones, and non-finite floats to None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(
    result: dict,
    out_dir: str,
    title: str = "",
    *,
    baseline: dict | None = None,
    labels: tuple[str, str] = ("model", "baseline"),
) -> dict[str, str]:
    """Writes `eval.json`, `eval.md` and the PNG plots of `result` into `out_dir`.

    `eval.json` is `result` (NaN written as null) with the baseline's result under "baseline" when
    given; the baseline also gets a column in `eval.md` and its bars / line in the accuracy,
    retention and cosine plots. Plots whose data the result lacks (no `layer_cosine`, no
    `retention`) are skipped. Returns {name: path}: "json", "markdown", "accuracy", "layer_cosine",
    "lengths", "retention".
    """
    os.makedirs(out_dir, exist_ok=True)
    plots = {
        "accuracy": plot_accuracy(
            result, os.path.join(out_dir, "accuracy.png"), baseline, labels=labels
        )
    }
    if seq(result, "layer_cosine"):
        plots["layer_cosine"] = plot_layer_cosine(
            result, os.path.join(out_dir, "layer_cosine.png"), baseline, labels=labels
        )
    if seq(result, "lengths_x") or seq(result, "lengths_xc"):
        plots["lengths"] = plot_lengths(result, os.path.join(out_dir, "lengths.png"))
    if result.get("retention"):
        plots["retention"] = plot_retention(
            result, os.path.join(out_dir, "retention.png"), baseline, labels=labels
        )
    payload = dict(result) if baseline is None else {**result, "baseline": baseline}
    paths = {
        "json": os.path.join(out_dir, JSON_FILE),
        "markdown": os.path.join(out_dir, MARKDOWN_FILE),
    }
    with open(paths["json"], "w") as f:
        json.dump(_jsonable(payload), f, indent=2, allow_nan=False)
    with open(paths["markdown"], "w") as f:
        f.write(_markdown(result, baseline, title, plots))
    return {**paths, **plots}


def evaluate_and_report(
    model_path: str, task_name: str, context: str, *, out_dir: str, title: str = "", **kwargs: Any
) -> dict:
    """`evaluate_checkpoint` (its keyword arguments; bad input raises `ctxjax.evaluate.InputError`
    before anything is loaded or written), then its report written into `out_dir`."""
    out = evaluate_checkpoint(model_path, task_name, context, **kwargs)
    result = {k: v for k, v in out.items() if k != "baseline"}
    title = (
        title or f"{os.path.basename(os.path.normpath(model_path))}: {task_name} / {out['context']}"
    )
    write_report(result, out_dir, title, baseline=out.get("baseline"))
    return out
