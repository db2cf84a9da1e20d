"""Evaluation reports: `eval.json`, a markdown table (`eval.md`) and PNG plots for one result of
`ctxjax.evaluate.evaluate_context`, optionally next to a baseline's (e.g. base vs distilled); and
`evaluate_checkpoint`, the whole evaluation of an HF folder behind `scripts/eval.py`.

matplotlib is imported inside the plotting functions (it costs a second at import) and drawn on
`Figure` objects with the Agg canvas: no pyplot global state, no display needed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import yaml

from ctxjax.config import EvalConfig

JSON_FILE = "eval.json"
MARKDOWN_FILE = "eval.md"
# The keys of `evaluate_context` that accept a value from `evaluate_checkpoint(**eval_kwargs)`.
EVAL_KWARGS = (
    "examples",
    "max_new_tokens",
    "temperature",
    "batch_size",
    "seed",
    "retention",
    "with_cosine",
)
_SAMPLES_SHOWN = 5


class InputError(ValueError):
    """A bad model path, task, context, task option or evaluation setting (the CLI exits 2)."""


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------


def format_cell(value: Any) -> str:
    """A table cell: floats to 3 decimals, NaN / None as "-", text with `|` escaped, one line."""
    if value is None:
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "-" if math.isnan(value) else f"{float(value):.3f}"
    return " ".join(str(value).split()).replace("|", "\\|")


def compare_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table with one line per row dict and the given columns, in order.

    Cells go through `format_cell` (floats to 3 decimals, NaN as "-"); a key a row lacks shows "-".
    """
    if not columns:
        raise ValueError("compare_table needs at least one column")
    lines = ["| " + " | ".join(format_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _seq(result: dict | None, key: str) -> list:
    """`result[key]` as a list ([] when absent or None); numpy arrays are accepted."""
    value = (result or {}).get(key)
    return [] if value is None else list(value)


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
        "BothCorrect": result.get("both_correct"),
        "Help": result.get("help"),
        "Δlen": result.get("delta_len"),
    }
    for name, acc in sorted((result.get("retention") or {}).items()):
        rows[f"retention: {name}"] = acc
    if "retention_mean" in result:
        rows["retention mean"] = result["retention_mean"]
    rows.update(_cosine_rows(_seq(result, "layer_cosine")))
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
            else "Harm is undefined here (no item is right without the context) and shown as 0"
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


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def _figure(width: float = 6.0, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _grouped_bars(ax, labels: list[str], series: list[tuple[str, list[float]]]) -> None:
    """Bars of each series side by side per label; NaN draws no bar."""
    x = np.arange(len(labels))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series):
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
        ax.bar_label(bars, labels=[format_cell(v) for v in values], fontsize=7, padding=1)
    ax.set_xticks(
        x,
        labels,
        rotation=30 if len(labels) > 5 else 0,
        ha="right" if len(labels) > 5 else "center",
    )
    ax.set_ylim(0, 1.1)
    if len(series) > 1:
        ax.legend(fontsize=8)


def _value(result: dict, key: str) -> float:
    value = result.get(key)
    return float("nan") if value is None else float(value)


def plot_accuracy(
    result: dict,
    path: str,
    baseline: dict | None = None,
    title: str = "",
    labels: tuple[str, str] = ("model", "baseline"),
) -> str:
    """Bars of Acc_x, Acc_xc, BothCorrect and Harm (baseline's beside them when given)."""
    keys = {"Acc_x": "acc_x", "Acc_xc": "acc_xc", "BothCorrect": "both_correct", "Harm": "harm"}
    series = [(labels[0], [_value(result, k) for k in keys.values()])]
    if baseline is not None:
        series.append((labels[1], [_value(baseline, k) for k in keys.values()]))
    fig, ax = _figure()
    _grouped_bars(ax, list(keys), series)
    ax.set_ylabel("fraction of items")
    ax.set_title(title or "accuracy without (x) and with (xc) the context")
    return _save(fig, path)


def plot_layer_cosine(
    result: dict,
    path: str,
    baseline: dict | None = None,
    title: str = "",
    labels: tuple[str, str] = ("model", "baseline"),
) -> str:
    """Cosine similarity of the two views' hidden states per layer (0 = embeddings)."""
    fig, ax = _figure()
    for name, res, style in ((labels[0], result, "o-"), (labels[1], baseline, "s--")):
        cos = _seq(res, "layer_cosine")
        if cos:
            ax.plot(range(len(cos)), cos, style, label=name)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("cosine(h | x, h | c,x)")
    ax.set_title(title or "hidden-state similarity at the response tokens")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if baseline is not None:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_lengths(result: dict, path: str, title: str = "") -> str:
    """Overlaid histograms of the response lengths (tokens) without and with the context."""
    views = [
        ("without context", _seq(result, "lengths_x")),
        ("with context", _seq(result, "lengths_xc")),
    ]
    top = max([max(v) for _, v in views if len(v)] + [1])
    bins = np.arange(0.5, top + 1.5)  # one bin per integer length
    fig, ax = _figure()
    for name, lengths in views:
        if len(lengths):
            ax.hist(lengths, bins=bins, alpha=0.5, label=f"{name} (mean {np.mean(lengths):.1f})")
    ax.set_xlabel("response length (tokens, EOS included)")
    ax.set_ylabel("items")
    ax.set_title(title or "response lengths by view")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_retention(
    result: dict,
    path: str,
    baseline: dict | None = None,
    title: str = "",
    labels: tuple[str, str] = ("model", "baseline"),
) -> str:
    """Acc_xc under each other context, with the mean as a dashed line."""
    names = sorted(result.get("retention") or {})
    series = [(labels[0], [float(result["retention"][n]) for n in names])]
    if baseline is not None and baseline.get("retention"):
        series.append(
            (labels[1], [float(baseline["retention"].get(n, float("nan"))) for n in names])
        )
    fig, ax = _figure(max(6.0, 0.7 * len(names) + 2), 4.0)
    _grouped_bars(ax, names, series)
    mean = result.get("retention_mean")
    if mean is not None and not math.isnan(mean):
        ax.axhline(mean, linestyle="--", color="gray", label=f"{labels[0]} mean {mean:.3f}")
        ax.legend(fontsize=8)
    ax.set_ylabel("accuracy with that context")
    ax.set_title(title or "retention: following the other contexts")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


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
    if _seq(result, "layer_cosine"):
        plots["layer_cosine"] = plot_layer_cosine(
            result, os.path.join(out_dir, "layer_cosine.png"), baseline, labels=labels
        )
    if _seq(result, "lengths_x") or _seq(result, "lengths_xc"):
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


# --------------------------------------------------------------------------------------------------
# Whole evaluation of a checkpoint folder
# --------------------------------------------------------------------------------------------------


def parse_task_options(items: Sequence[str]) -> dict:
    """`["min_len=3", "families=[sum]"]` -> {"min_len": 3, "families": ["sum"]} (YAML values)."""
    options = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"task option {item!r} must look like key=value")
        try:
            options[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise InputError(f"task option {item!r}: value is not valid YAML ({e})") from None
    return options


def _check_model_folder(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise InputError(f"{what} folder not found: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise InputError(f"{what} folder {path} has no config.json (not an HF model folder)")


def _resolve_task(task_name: str, context: str, task_options: dict | None):
    from ctxjax.tasks import get_task

    try:
        task = get_task(task_name, **(task_options or {}))
    except (TypeError, ValueError) as e:
        raise InputError(str(e)) from None
    valid = task.contexts()
    if context not in valid:
        raise InputError(
            f"unknown context {context!r} for task {task_name!r}; valid: {sorted(valid)}"
        )
    return task


def _eval_settings(eval_kwargs: dict) -> dict:
    unknown = sorted(set(eval_kwargs) - set(EVAL_KWARGS))
    if unknown:
        raise InputError(f"unknown evaluation setting(s) {unknown}; valid: {list(EVAL_KWARGS)}")
    defaults = {k: v for k, v in dataclasses.asdict(EvalConfig()).items() if k in EVAL_KWARGS}
    settings = {**defaults, "retention": True, "with_cosine": True, **eval_kwargs}
    try:  # the same range checks as the `eval` section of a training config
        EvalConfig(**{k: settings[k] for k in defaults})
    except (TypeError, ValueError) as e:
        raise InputError(str(e)) from None
    return settings


def evaluate_checkpoint(
    model_path: str,
    task_name: str,
    context: str,
    *,
    task_options: dict | None = None,
    out_dir: str,
    baseline_path: str | None = None,
    tokenizer_path: str | None = None,
    param_dtype: str = "float32",
    title: str = "",
    **eval_kwargs: Any,
) -> dict:
    """Evaluates the HF folder `model_path` on one context of a task and writes the report.

    `eval_kwargs` are `evaluate_context`'s settings (`EVAL_KWARGS`; defaults from `EvalConfig`, with
    retention and cosine on). The tokenizer comes from `tokenizer_path`, else the model's folder
    (the baseline's likewise). Everything the user names is checked before any model is loaded;
    a bad value raises `InputError` naming it (and the valid choices). Returns what `eval.json`
    holds: the result, with "model", "task", "task_options", "settings", and "baseline" when given.
    """
    from ctxjax import hf
    from ctxjax.evaluate import evaluate_context
    from ctxjax.model import DTYPES

    if param_dtype not in DTYPES:
        raise InputError(f"param_dtype must be one of {sorted(DTYPES)}, got {param_dtype!r}")
    _check_model_folder(model_path, "model")
    if baseline_path is not None:
        _check_model_folder(baseline_path, "baseline model")
    if tokenizer_path is not None and not os.path.isdir(tokenizer_path):
        raise InputError(f"tokenizer folder not found: {tokenizer_path}")
    task = _resolve_task(task_name, context, task_options)
    settings = _eval_settings(eval_kwargs)

    def run(path: str) -> dict:
        model = hf.load_model(path, param_dtype=param_dtype)
        tokenizer = hf.load_tokenizer(tokenizer_path or path)
        result = evaluate_context(model, tokenizer, task, context, **settings)
        return {
            "model": os.path.abspath(path),
            "task": task_name,
            "task_options": dict(task_options or {}),
            "settings": settings,
            **result,
        }

    result = run(model_path)
    baseline = run(baseline_path) if baseline_path is not None else None
    title = title or f"{os.path.basename(os.path.normpath(model_path))}: {task_name} / {context}"
    write_report(result, out_dir, title, baseline=baseline)
    return result if baseline is None else {**result, "baseline": baseline}
