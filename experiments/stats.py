"""Aggregation of finished runs: per cell and variant, each metric's mean and 95% interval over all
its runs (base seeds x distillation seeds); the paired difference NCA - OPD per cell; and the
plain list of cells where NCA did not help.

The interval is Student's t over runs: `mean ± t(0.975, n-1) · sd / √n`, with `sd` the sample
standard deviation (ddof 1) of the run means. The runs are the unit because the largest source of
variation is the base model (a base rebuilt with another seed or on another CPU reads its contexts
differently) and then the distillation seed; a bootstrap over items would need per-item answers,
which a run's summary does not keep, and would count items as independent across runs that share
one base model. With one run there is no interval (shown as the mean alone).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ctxjax.metrics import SUMMARY_KEYS
from experiments.tables import Stat, format_cell

INTERVAL = 0.95
INTERVAL_METHOD = (
    "95% t-interval over runs (mean ± t(0.975, n-1) · sd / √n, n runs = base seeds x seeds)"
)
# The metrics the result tables show: the library's summary, Help, and the mean over the
# transformer blocks of the per-layer hidden cosine between the views.
METRICS = (*SUMMARY_KEYS[:3], "help", *SUMMARY_KEYS[3:], "cosine")
# The paired differences NCA - OPD reported per cell.
PAIRED_METRICS = ("harm", "acc_x", "acc_xc")


def _t_quantile(p: float, df: int) -> float:
    """Student's t quantile (scipy's, imported here: only the harness's aggregation needs it)."""
    from scipy import stats as scipy_stats

    return float(scipy_stats.t.ppf(p, df))


def _defined(values: list[Any]) -> list[float]:
    """The defined values: None and NaN (an empty ratio) are left out, never read as 0."""
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def interval(values: list[Any]) -> Stat:
    """Mean and 95% t-interval over the defined values; NaN bounds with fewer than 2 of them, an
    all-NaN `Stat` with none."""
    xs = _defined(values)
    n = len(xs)
    if n == 0:
        return Stat(math.nan, math.nan, math.nan, 0)
    mean = float(np.mean(xs))
    if n < 2:
        return Stat(mean, math.nan, math.nan, n)
    half = _t_quantile(0.5 + INTERVAL / 2, n - 1) * float(np.std(xs, ddof=1)) / math.sqrt(n)
    return Stat(mean, mean - half, mean + half, n)


def metric(result: dict, key: str) -> float | None:
    """One table metric of an evaluation; "cosine" is the mean over the transformer blocks (layer 0,
    the embeddings, is 1 by construction: the same tokens in both views)."""
    if key != "cosine":
        return result.get(key)
    blocks = (result.get("layer_cosine") or [])[1:]
    return float(np.mean(blocks)) if blocks else None


def _pair_key(rec: dict) -> tuple[int, int]:
    # Records written before base seeds were in the grid had one base model, seed 0.
    return rec["spec"].get("base_seed", 0), rec["spec"]["seed"]


def _base_rows(records: list[dict]) -> dict[str, list[dict]]:
    """cell -> the base model's evaluation, once per base seed (its runs share it)."""
    bases: dict[str, dict] = {}
    for rec in records:
        if rec["before"]:
            bases.setdefault(rec["cell"], {}).setdefault(_pair_key(rec)[0], rec["before"])
    return {cell: [by_seed[s] for s in sorted(by_seed)] for cell, by_seed in bases.items()}


# The retention anchor's table (issue 10, section 5): retention on the anchor's pool and on the
# contexts it never drew, and the median train step time.
RETENTION_METRICS = (
    "acc_x",
    "acc_xc",
    "harm",
    "retention_mean",
    "retention_pool",
    "retention_held_out",
    "step_time_s",
)


def aggregate(records: list[dict], keys: tuple[str, ...] = METRICS) -> dict:
    """cell -> variant -> metric (`keys`) -> `Stat` over the variant's runs (n counts the runs where
    the metric is defined); the model before distillation as 'base', over its base seeds. A run's
    `step_time_s` (the runner's median) is read beside its evaluation."""
    table: dict = {}
    for rec in records:
        table.setdefault(rec["cell"], {}).setdefault(rec["spec"]["variant"], []).append(
            {**(rec["after"] or {}), "step_time_s": rec.get("step_time_s")}
        )
    for cell, rows in _base_rows(records).items():
        table[cell] = {"base": rows, **table[cell]}
    return {
        cell: {
            variant: {k: interval([metric(r, k) for r in rows]) for k in keys}
            for variant, rows in variants.items()
        }
        for cell, variants in table.items()
    }


def paired_differences(records: list[dict], a: str = "nca", b: str = "opd") -> dict:
    """cell -> metric -> `Stat` of `a - b` over the pairs of runs with the same base seed and seed
    (a pair where either value is undefined is left out)."""
    runs: dict = {}
    for rec in records:
        runs.setdefault(rec["cell"], {})[(rec["spec"]["variant"], *_pair_key(rec))] = rec["after"]
    out = {}
    for cell, by_key in runs.items():
        pairs = [(r, by_key.get((b, *k[1:]))) for k, r in by_key.items() if k[0] == a]
        pairs = [(x, y) for x, y in pairs if x and y]
        if pairs:
            out[cell] = {
                k: interval([_difference(metric(x, k), metric(y, k)) for x, y in pairs])
                for k in PAIRED_METRICS
            }
    return out


def _difference(x: float | None, y: float | None) -> float | None:
    return None if x is None or y is None else x - y


def lowers_harm(diff: Stat) -> bool:
    """NCA lowers Harm in a cell only when the paired difference's interval lies below 0."""
    return diff.hi < 0  # NaN (one pair, or none defined) compares False


def harm_count(diffs: dict) -> tuple[int, int]:
    """(cells where NCA lowers Harm, cells with a defined interval of the Harm difference)."""
    defined = [d["harm"] for d in diffs.values() if not math.isnan(d["harm"].hi)]
    return sum(lowers_harm(d) for d in defined), len(defined)


def where_nca_did_not_help(diffs: dict) -> list[str]:
    """What was measured, nothing more: cells where the Harm difference's interval does not lie
    below 0 (or has none), and cells where NCA's paired Acc_x or Acc_xc interval lies below 0."""
    notes = []
    for cell, d in sorted(diffs.items()):
        harm = d["harm"]
        if math.isnan(harm.mean):
            notes.append(f"{cell}: Harm undefined in every pair (no item right without c)")
        elif not lowers_harm(harm):
            notes.append(f"{cell}: Harm NCA - OPD {_show(harm)}, interval not below 0")
        for key, label in (("acc_x", "Acc_x"), ("acc_xc", "Acc_xc")):
            if d[key].hi < 0:
                notes.append(f"{cell}: {label} NCA - OPD {_show(d[key])}, interval below 0")
    return notes


def _show(s: Stat) -> str:
    return f"{format_cell(s)} (n={s.n})"


# --- real checkpoint: seeds x items ---


def crossed_bootstrap(
    units: list[np.ndarray],
    stat,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    item_axis: int = 0,
    level: float = INTERVAL,
) -> dict:
    """A percentile bootstrap for units (training seeds) crossed with items: every unit holds the
    same items along `item_axis` of its array. Each draw resamples the units with replacement and,
    jointly, one resample of the items applied to every drawn unit (an item is one draw shared by
    all seeds, so its difficulty is not counted as independent noise in each seed). `stat(units)`
    -> float or None (undefined: that draw is left out). A pair of conditions is one unit holding
    both (stacked on axis 0, items on axis 1), so differences are paired.

    Returns {mean: stat on the data, ci95: [lo, hi] or None (fewer than 2 units, or no defined
    draw), n_units, n_items, undefined_draws}."""
    n_items = {u.shape[item_axis] for u in units}
    if len(n_items) != 1:
        raise ValueError(f"units must share their items: item counts {sorted(n_items)}")
    (n,) = n_items
    point = stat(units)
    out = dict(mean=point, ci95=None, n_units=len(units), n_items=n, undefined_draws=0)
    if point is None or len(units) < 2:
        return out
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        picks = rng.integers(0, len(units), len(units))
        items = rng.integers(0, n, n)
        value = stat([np.take(units[i], items, axis=item_axis) for i in picks])
        if value is not None:
            values.append(value)
    out["undefined_draws"] = n_boot - len(values)
    if values:
        tail = 100 * (1 - level) / 2
        out["ci95"] = [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]
    return out
