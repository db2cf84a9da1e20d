"""Aggregation of finished runs on the toy grid, with the base model as the unit of replication.

Runs that share a base model are not independent (most of the variation between runs lies between
base models: a base rebuilt with another seed, or on another CPU, reads its contexts differently),
so a cell's variant is first reduced to one value per base model (`unit_value`): a ratio such as
Harm pooled from counts over the base's runs (numerators and denominators summed over their
(item, draw) pairs, never a mean of ratios), any other metric the mean over its runs. The interval
is then Student's t over those base values, df = bases - 1, clipped to the metric's range
(`INTERVAL_METHOD`); a unit whose ratio rests on fewer than `MIN_PAIRS` pairs is undefined, and
with fewer than 2 defined units there is no interval and no verdict. Clipped, not a bootstrap over
bases or a logit interval: with 3-5 bases a percentile bootstrap has a handful of distinct
resamples and undercovers, and a logit breaks on the 0s and 1s a greedy Harm or accuracy takes;
clipping keeps the t-interval's coverage, since the true value lies inside the range.

Paired NCA - OPD differences are taken within each base model (the same distillation seeds on both
sides), then over bases; each cell's t-test p-value is corrected with Holm's method across the
cells of a table, and NCA's verdict is given only where plain OPD degraded the cell
(`cell_comparisons`). A bootstrap over items would need per-item answers, which the saved
document does not keep.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from ctxjax.metrics import SUMMARY_KEYS
from experiments.tables import Stat, format_cell

INTERVAL = 0.95
ALPHA = 1 - INTERVAL
# A unit's Harm (Help, floor) needs this many (item, draw) pairs in its denominator: below it one
# or two items decide the ratio (a base whose Acc_x collapsed gives Harm 0 of 1 or 1 of 1).
MIN_PAIRS = 10
INTERVAL_METHOD = (
    "95% t-interval over base models (each base's runs pooled first: Harm and Help from their "
    f"counts, undefined under {MIN_PAIRS} pairs; other metrics averaged), df = bases - 1, "
    "clipped to the metric's range"
)
PRIMARY_ENDPOINT = (
    "The primary endpoint is greedy Harm (temperature 0): sampled Harm also counts a model "
    "disagreeing with itself between two draws (its floor)."
)
# The metrics the result tables show: the library's summary, Help, and the mean over the
# transformer blocks of the per-layer hidden cosine between the views.
METRICS = (*SUMMARY_KEYS[:3], "help", *SUMMARY_KEYS[3:], "cosine")
# Sampled evaluations add Harm's floor (two independent no-context draws) and the excess over it.
FLOOR_METRICS = ("harm_floor", "excess_harm")
# The paired differences NCA - OPD reported per cell.
PAIRED_METRICS = ("harm", "help", "acc_x", "acc_xc")
# Ratios pooled from counts: metric -> the count of pairs its denominator holds.
POOLED = {"harm": "n_right_x", "help": "n_wrong_x", "harm_floor": "n_right_x"}
# The range each bounded metric lives in (an interval never reaches outside it).
RANGES = {
    **dict.fromkeys(
        (
            "acc_x",
            "acc_xc",
            "harm",
            "help",
            "both_correct",
            "harm_floor",
            "retention_mean",
            "retention_pool",
            "retention_held_out",
        ),
        (0.0, 1.0),
    ),
    "excess_harm": (-1.0, 1.0),
    "cosine": (-1.0, 1.0),
    "delta_len": (-1.0, math.inf),
    "step_time_s": (0.0, math.inf),
}
UNBOUNDED = (-math.inf, math.inf)


def _t_quantile(p: float, df: int) -> float:
    """Student's t quantile (scipy's, imported here: only the harness's aggregation needs it)."""
    from scipy import stats as scipy_stats

    return float(scipy_stats.t.ppf(p, df))


def _t_p_value(mean: float, sd: float, n: int) -> float:
    """Two-sided p-value of Student's t-test of mean 0 from n values (NaN with fewer than 2)."""
    if n < 2:
        return math.nan
    if sd == 0:  # every unit gave the same value: the limit of the test
        return 1.0 if mean == 0 else 0.0
    from scipy import stats as scipy_stats

    return float(2 * scipy_stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))


def _defined(values: list[Any]) -> list[float]:
    """The defined values: None and NaN (an empty ratio) are left out, never read as 0."""
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def interval(values: list[Any], bounds: tuple[float, float] = UNBOUNDED) -> Stat:
    """Mean, 95% t-interval (clipped to `bounds`) and t-test p-value over the defined values, one
    per independent unit; NaN bounds and p with fewer than 2 of them, an all-NaN `Stat` with none.
    Clipping keeps the t-interval's coverage: the true value lies inside the range."""
    xs = _defined(values)
    n = len(xs)
    if n == 0:
        return Stat(math.nan, math.nan, math.nan, 0)
    mean = float(np.mean(xs))
    if n < 2:
        return Stat(mean, math.nan, math.nan, n)
    sd = float(np.std(xs, ddof=1))
    half = _t_quantile(0.5 + INTERVAL / 2, n - 1) * sd / math.sqrt(n)
    lo, hi = max(mean - half, bounds[0]), min(mean + half, bounds[1])
    return Stat(mean, lo, hi, n, _t_p_value(mean, sd, n))


def _difference_bounds(key: str) -> tuple[float, float]:
    lo, hi = RANGES.get(key, UNBOUNDED)
    return lo - hi, hi - lo


def metric(result: dict, key: str) -> float | None:
    """One table metric of an evaluation; "cosine" is the mean over the transformer blocks (layer 0,
    the embeddings, is 1 by construction: the same tokens in both views)."""
    if key != "cosine":
        return result.get(key)
    blocks = (result.get("layer_cosine") or [])[1:]
    return float(np.mean(blocks)) if blocks else None


def _pooled(results: list[dict], key: str) -> tuple[int, int] | None:
    """(numerator, denominator) of the ratio `key` summed over `results`' (item, draw) pairs, None
    when a result lacks the ratio or its count (the count is recovered as round(ratio * pairs))."""
    den_key = POOLED[key]
    num = den = 0
    for r in results:
        pairs = r.get(den_key)
        if pairs is None or key not in r:
            return None
        if pairs:
            if r[key] is None:
                return None
            num += round(r[key] * pairs)
            den += pairs
    return num, den


def unit_value(results: list[dict], key: str) -> float | None:
    """One independent unit's value of metric `key` from its evaluations (a base model's runs, or
    the base model itself): ratios pooled from their counts and undefined under `MIN_PAIRS` pairs,
    excess Harm as pooled Harm minus the pooled floor, anything else the mean of its defined
    values (None when it has none)."""
    if key == "excess_harm":
        harm, floor = unit_value(results, "harm"), unit_value(results, "harm_floor")
        return None if harm is None or floor is None else harm - floor
    if key in POOLED:
        counts = _pooled(results, key)
        return None if counts is None or counts[1] < MIN_PAIRS else counts[0] / counts[1]
    values = _defined([metric(r, key) for r in results])
    return float(np.mean(values)) if values else None


def _base_seed(rec: dict) -> int:
    # Records written before base seeds were in the grid had one base model, seed 0.
    return rec["spec"].get("base_seed", 0)


def units(records: list[dict]) -> dict:
    """cell -> variant -> base seed -> {distillation seed: evaluation}; the model before
    distillation as variant 'base', once per base seed (its runs share it), under seed None. A
    run's `step_time_s` (the runner's median) is read beside its evaluation."""
    table: dict = {}
    for rec in records:
        by_base = table.setdefault(rec["cell"], {})
        if rec["before"]:
            by_base.setdefault("base", {}).setdefault(_base_seed(rec), {None: rec["before"]})
        if rec["after"]:
            after = {**rec["after"], "step_time_s": rec.get("step_time_s")}
            variant = by_base.setdefault(rec["spec"]["variant"], {})
            variant.setdefault(_base_seed(rec), {})[rec["spec"]["seed"]] = after
    return {cell: {"base": v.pop("base"), **v} if "base" in v else v for cell, v in table.items()}


# The retention anchor's table: retention on the anchor's pool and on the contexts it never drew,
# and the median train step time.
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
    """cell -> variant -> metric (`keys`) -> `Stat` over base models (n counts the bases where the
    metric is defined), each base's runs reduced by `unit_value` first; 'base' is the model before
    distillation."""
    return {
        cell: {
            variant: {
                k: interval(
                    [unit_value(list(runs.values()), k) for runs in by_base.values()],
                    RANGES.get(k, UNBOUNDED),
                )
                for k in keys
            }
            for variant, by_base in variants.items()
        }
        for cell, variants in units(records).items()
    }


def _paired_units(a: dict, b: dict) -> list[tuple[list[dict], list[dict]]]:
    """Per base seed both variants ran on: (a's runs, b's runs) on the distillation seeds both
    have; a base model's own evaluation (seed None) pairs with all of the other side's runs."""
    out = []
    for base in sorted(set(a) & set(b)):
        runs_a, runs_b = a[base], b[base]
        if None in runs_a or None in runs_b:
            out.append((list(runs_a.values()), list(runs_b.values())))
            continue
        seeds = sorted(set(runs_a) & set(runs_b))
        if seeds:
            out.append(([runs_a[s] for s in seeds], [runs_b[s] for s in seeds]))
    return out


def paired(variants: dict, a: str, b: str, keys: tuple[str, ...]) -> dict | None:
    """metric -> (`Stat` of `a`, `Stat` of `b`, `Stat` of `a - b`), each over the base models where
    the difference is defined (`a` and `b` pooled on the same distillation seeds within a base);
    None when the cell lacks either variant."""
    if a not in variants or b not in variants:
        return None
    pairs = _paired_units(variants[a], variants[b])
    out = {}
    for k in keys:
        values = [(unit_value(x, k), unit_value(y, k)) for x, y in pairs]
        values = [(x, y) for x, y in values if x is not None and y is not None]
        bounds = RANGES.get(k, UNBOUNDED)
        out[k] = (
            interval([x for x, _ in values], bounds),
            interval([y for _, y in values], bounds),
            interval([x - y for x, y in values], _difference_bounds(k)),
        )
    return out


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values (family-wise error control across the keys): sorted
    ascending, the i-th (from 0) of m is max over j <= i of min(1, (m - j) p_(j))."""
    adjusted, running = {}, 0.0
    order = sorted(p_values, key=p_values.get)
    for i, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * p_values[key]))
        adjusted[key] = running
    return adjusted


class Comparison(NamedTuple):
    """One cell of the paired table: did plain OPD degrade it (against the base model), and what
    NCA did against plain OPD, each over the base models."""

    degradation_harm: Stat  # OPD - base Harm
    degradation_acc_xc: Stat  # base - OPD Acc_xc
    opd: dict  # metric -> Stat of plain OPD over the bases of the NCA - OPD difference
    nca: dict  # metric -> Stat of OPD + NCA over the same bases
    diff: dict  # metric -> Stat of NCA - OPD
    p_holm: float  # Harm difference's p-value, Holm-corrected across the table's verdict cells
    verdict: str


NO_DEGRADATION = "no degradation to fix"
NO_VERDICT = "-"
LOWERS, RAISES, UNRESOLVED = "NCA lowers Harm", "NCA raises Harm", "no significant difference"


def degraded(c: Comparison) -> bool | None:
    """Whether plain OPD degraded the cell (by direction: mean Harm above the base's, or mean
    Acc_xc below it); None when neither is defined."""
    signs = [
        s.mean > 0 for s in (c.degradation_harm, c.degradation_acc_xc) if not math.isnan(s.mean)
    ]
    return any(signs) if signs else None


def cell_comparisons(records: list[dict], keys: tuple[str, ...] = PAIRED_METRICS) -> dict:
    """cell -> `Comparison` for every cell with both plain OPD and NCA runs. A cell gets a verdict
    on Harm only where OPD degraded it and at least 2 bases define the difference; across those
    cells the p-values are Holm-corrected, and NCA lowers (raises) Harm where the corrected p is
    below `ALPHA`."""
    out = {}
    for cell, variants in units(records).items():
        nca_opd = paired(variants, "nca", "opd", keys)
        if nca_opd is None:
            continue
        against_base = paired(variants, "opd", "base", ("harm", "acc_xc")) or {}
        harm_d = against_base.get("harm", (None, None, Stat(math.nan, math.nan, math.nan, 0)))[2]
        acc_d = against_base.get("acc_xc", (None, None, Stat(math.nan, math.nan, math.nan, 0)))[2]
        acc_d = Stat(-acc_d.mean, -acc_d.hi, -acc_d.lo, acc_d.n, acc_d.p)
        out[cell] = Comparison(
            degradation_harm=harm_d,
            degradation_acc_xc=acc_d,
            opd={k: v[1] for k, v in nca_opd.items()},
            nca={k: v[0] for k, v in nca_opd.items()},
            diff={k: v[2] for k, v in nca_opd.items()},
            p_holm=math.nan,
            verdict=NO_VERDICT,
        )
    family = {
        cell: c.diff["harm"].p
        for cell, c in out.items()
        if degraded(c) and not math.isnan(c.diff["harm"].p)
    }
    adjusted = holm(family)
    for cell, c in out.items():
        p_holm = adjusted.get(cell, math.nan)
        out[cell] = c._replace(p_holm=p_holm, verdict=_verdict(c, p_holm))
    return out


def _verdict(c: Comparison, p_holm: float) -> str:
    if math.isnan(c.diff["harm"].p) or degraded(c) is None:
        return NO_VERDICT  # fewer than 2 bases define the difference, or OPD's effect is unknown
    if not degraded(c):
        return NO_DEGRADATION
    if p_holm >= ALPHA:
        return UNRESOLVED
    return LOWERS if c.diff["harm"].mean < 0 else RAISES


def direction_count(comparisons: dict) -> tuple[int, int]:
    """The paper's kind of count: (cells where NCA's mean Harm is below plain OPD's, cells where
    the difference is defined on at least one base)."""
    defined = [c.diff["harm"] for c in comparisons.values() if not math.isnan(c.diff["harm"].mean)]
    return sum(d.mean < 0 for d in defined), len(defined)


def significance_count(comparisons: dict) -> tuple[int, int]:
    """(cells where NCA lowers Harm after Holm's correction, cells given a verdict)."""
    judged = [c for c in comparisons.values() if not math.isnan(c.p_holm)]
    return sum(c.verdict == LOWERS for c in judged), len(judged)


def where_nca_did_not_help(comparisons: dict) -> list[str]:
    """What was measured, nothing more: every cell where NCA's Harm verdict is not "lowers", and
    cells where NCA's paired Acc_x or Acc_xc interval lies below 0."""
    notes = []
    for cell, c in sorted(comparisons.items()):
        harm = c.diff["harm"]
        if math.isnan(harm.mean):
            notes.append(f"{cell}: Harm undefined on every base (under {MIN_PAIRS} pairs)")
        elif c.verdict == NO_VERDICT:
            notes.append(f"{cell}: Harm NCA - OPD {_show(harm)}, no verdict (under 2 bases)")
        elif c.verdict == NO_DEGRADATION:
            notes.append(
                f"{cell}: {NO_DEGRADATION} (OPD - base Harm {_show(c.degradation_harm)}); "
                f"Harm NCA - OPD {_show(harm)}, Help NCA - OPD {_show(c.diff['help'])}"
            )
        elif c.verdict != LOWERS:
            notes.append(
                f"{cell}: Harm NCA - OPD {_show(harm)}, Holm p = {c.p_holm:.3f}: {c.verdict}"
            )
        for key, label in (("acc_x", "Acc_x"), ("acc_xc", "Acc_xc")):
            if key in c.diff and c.diff[key].hi < 0:
                notes.append(f"{cell}: {label} NCA - OPD {_show(c.diff[key])}, interval below 0")
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
