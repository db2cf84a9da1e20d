"""Every plot of the harness, in one style: `figure` and `save` (a `Figure` on the Agg canvas, no
pyplot global state, no display), values read with `value`, bars labelled with `format_cell`.

matplotlib is imported inside `figure` (it costs a second at import).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from experiments.tables import format_cell

DPI = 100


def figure(width: float = 6.0, height: float = 4.0):
    """A fresh figure and its one axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def seq(result: dict | None, key: str) -> list:
    """`result[key]` as a list ([] when absent or None); numpy arrays are accepted."""
    value = (result or {}).get(key)
    return [] if value is None else list(value)


def value(result: dict, key: str) -> float:
    v = result.get(key)
    return float("nan") if v is None else float(v)


def grouped_bars(
    ax,
    labels: list[str],
    series: list[tuple[str, list[float]]],
    errors: list[list] | None = None,
    ylim: tuple[float, float] | None = (0, 1.1),
) -> None:
    """Bars of each series side by side per label, labelled with their values; NaN draws no bar.
    `errors[i]` is series i's error bars: one value per bar, or [below, above] lists."""
    x = np.arange(len(labels))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series):
        yerr = errors[i] if errors else None
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, yerr=yerr, label=name)
        ax.bar_label(bars, labels=[format_cell(v) for v in values], fontsize=7, padding=1)
    many = len(labels) > 5
    ax.set_xticks(x, labels, rotation=30 if many else 0, ha="right" if many else "center")
    if ylim:
        ax.set_ylim(*ylim)
    if len(series) > 1:
        ax.legend(fontsize=8)


def plot_accuracy(
    result: dict,
    path: str,
    baseline: dict | None = None,
    title: str = "",
    labels: tuple[str, str] = ("model", "baseline"),
) -> str:
    """Bars of Acc_x, Acc_xc, BothCorrect and Harm (baseline's beside them when given)."""
    keys = {"Acc_x": "acc_x", "Acc_xc": "acc_xc", "BothCorrect": "both_correct", "Harm": "harm"}
    series = [(labels[0], [value(result, k) for k in keys.values()])]
    if baseline is not None:
        series.append((labels[1], [value(baseline, k) for k in keys.values()]))
    fig, ax = figure()
    grouped_bars(ax, list(keys), series)
    ax.set_ylabel("fraction of items")
    ax.set_title(title or "accuracy without (x) and with (xc) the context")
    return save(fig, path)


def plot_layer_cosine(
    result: dict,
    path: str,
    baseline: dict | None = None,
    title: str = "",
    labels: tuple[str, str] = ("model", "baseline"),
) -> str:
    """Cosine similarity of the two views' hidden states per layer (0 = embeddings)."""
    fig, ax = figure()
    for name, res, style in ((labels[0], result, "o-"), (labels[1], baseline, "s--")):
        cos = seq(res, "layer_cosine")
        if cos:
            ax.plot(range(len(cos)), cos, style, label=name)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("cosine(h | x, h | c,x)")
    ax.set_title(title or "hidden-state similarity at the response tokens")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if baseline is not None:
        ax.legend(fontsize=8)
    return save(fig, path)


def plot_lengths(result: dict, path: str, title: str = "") -> str:
    """Overlaid histograms of the response lengths (tokens) without and with the context."""
    views = [
        ("without context", seq(result, "lengths_x")),
        ("with context", seq(result, "lengths_xc")),
    ]
    top = max([max(v) for _, v in views if len(v)] + [1])
    bins = np.arange(0.5, top + 1.5)  # one bin per integer length
    fig, ax = figure()
    for name, lengths in views:
        if len(lengths):
            ax.hist(lengths, bins=bins, alpha=0.5, label=f"{name} (mean {np.mean(lengths):.1f})")
    ax.set_xlabel("response length (tokens, EOS included)")
    ax.set_ylabel("items")
    ax.set_title(title or "response lengths by view")
    ax.legend(fontsize=8)
    return save(fig, path)


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
    fig, ax = figure(max(6.0, 0.7 * len(names) + 2), 4.0)
    grouped_bars(ax, names, series)
    mean = result.get("retention_mean")
    if mean is not None and not math.isnan(mean):
        ax.axhline(mean, linestyle="--", color="gray", label=f"{labels[0]} mean {mean:.3f}")
        ax.legend(fontsize=8)
    ax.set_ylabel("accuracy with that context")
    ax.set_title(title or "retention: following the other contexts")
    return save(fig, path)


def plot_harm_by_cell(agg: dict, cells: Sequence[str], path: str, mode: str = "sampled") -> str:
    """Harm of plain OPD and of NCA per cell: the mean over base models and its 95% interval
    (`experiments.stats.aggregate`) as error bars; a cell with fewer than 2 defined base models has
    no interval and draws no bar (undefined, not 0). `mode` (greedy, sampled) names the evaluation.
    """
    series, errors = [], []
    for variant, label in (("opd", "plain OPD"), ("nca", "OPD + NCA")):
        stats = [agg[c][variant]["harm"] for c in cells]
        series.append((label, [s.mean if s.n >= 2 else math.nan for s in stats]))
        below = [0.0 if math.isnan(s.lo) else s.mean - s.lo for s in stats]
        errors.append([below, [0.0 if math.isnan(s.hi) else s.hi - s.mean for s in stats]])
    fig, ax = figure(max(6, 0.9 * len(cells)), 4)
    grouped_bars(ax, list(cells), series, errors, ylim=None)
    ax.set_ylabel(f"{mode} Harm")
    ax.set_title("Harm = P(wrong with c | right without c), mean over base models", fontsize=9)
    return save(fig, path)
