"""The toy grid's statistics against independent references: a simulation with a known base effect
and seed effect (coverage of the interval over base models, and the old pooled-over-runs interval
failing it), counts pooled over (item, draw) pairs, degenerate cells, Holm by hand, scipy's
t-test."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from experiments import stats


def _record(cell, variant, seed, base_seed, before=None, **after):
    return dict(
        cell=cell,
        spec=dict(variant=variant, seed=seed, base_seed=base_seed),
        before=before,
        after=after,
    )


def _harm(count: int, pairs: int) -> dict:
    """An evaluation's Harm as the records keep it: the ratio and its denominator."""
    return dict(harm=count / pairs if pairs else None, n_right_x=pairs)


def _simulated_cells(rng, sims, bases, seeds, truth, sd_base, sd_seed, pairs=10_000):
    """`sims` cells of records whose NCA - OPD Harm difference is `truth` plus a base effect (each
    base model's own, shared by its runs; sd `sd_base`) plus a seed effect (sd `sd_seed`)."""
    base_effect_SxB = rng.normal(0, sd_base, (sims, bases))
    opd_SxBxK = 0.4 + rng.normal(0, sd_seed, (sims, bases, seeds))
    nca_SxBxK = (
        0.4 + truth + base_effect_SxB[..., None] + rng.normal(0, sd_seed, (sims, bases, seeds))
    )
    records = []
    for i, b, k in np.ndindex(sims, bases, seeds):
        for variant, harm in (("opd", opd_SxBxK), ("nca", nca_SxBxK)):
            count = round(float(harm[i, b, k]) * pairs)
            records.append(_record(f"sim{i}", variant, k, b, **_harm(count, pairs)))
    return records, nca_SxBxK - opd_SxBxK


def test_interval_over_base_models_covers_the_truth_at_the_nominal_rate():
    """Most of the variation lies between base models (as on the grid): averaged within each base
    first, the 95% interval covers the true difference about 95% of the time; the old interval,
    over all runs as if independent (df = runs - 1), covers it far less often."""
    rng = np.random.default_rng(0)
    sims, bases, seeds, truth = 1000, 3, 2, -0.05
    records, diffs_SxBxK = _simulated_cells(rng, sims, bases, seeds, truth, 0.05, 0.01)
    comparisons = stats.cell_comparisons(records, ("harm",))
    new = [comparisons[f"sim{i}"].diff["harm"] for i in range(sims)]
    assert all(s.n == bases for s in new)
    covered = np.mean([s.lo <= truth <= s.hi for s in new])
    # Binomial sd of the rate over 1000 cells is 0.007: 3.5 of them either side of 0.95.
    assert 0.925 <= covered <= 0.975, covered
    old = [stats.interval(list(d.ravel())) for d in diffs_SxBxK]
    old_covered = np.mean([s.lo <= truth <= s.hi for s in old])
    assert old_covered < 0.9, old_covered


def test_base_means_match_scipys_t_interval_and_t_test():
    """The difference is taken within each base (pooled over its seeds), then scipy's t-interval
    and one-sample t-test over the bases (df = bases - 1)."""
    rng = np.random.default_rng(1)
    records, diffs_SxBxK = _simulated_cells(rng, 1, 4, 2, -0.05, 0.05, 0.02)
    base_diffs = diffs_SxBxK[0].mean(axis=1)
    got = stats.cell_comparisons(records, ("harm",))["sim0"].diff["harm"]
    lo, hi = scipy_stats.t.interval(
        0.95, len(base_diffs) - 1, base_diffs.mean(), scipy_stats.sem(base_diffs)
    )
    want_p = scipy_stats.ttest_1samp(base_diffs, 0.0).pvalue
    # The records round each Harm to a count out of 10,000 pairs.
    assert (got.mean, got.lo, got.hi) == pytest.approx((base_diffs.mean(), lo, hi), abs=2e-4)
    assert got.p == pytest.approx(want_p, rel=0.02) and got.n == 4


def test_harm_is_pooled_from_counts_and_undefined_under_the_minimum():
    # One base, two runs: 1 of 1 and 0 of 99 pairs is 1 of 100 pooled, not (1 + 0) / 2.
    runs = [_harm(1, 1), _harm(0, 99)]
    assert stats.unit_value(runs, "harm") == pytest.approx(0.01)
    assert stats.unit_value([_harm(0, 1), _harm(0, 8)], "harm") is None  # 9 pairs < MIN_PAIRS
    assert stats.unit_value([_harm(3, stats.MIN_PAIRS)], "harm") == pytest.approx(0.3)
    # An empty denominator in one run (Harm None, 0 pairs) adds nothing; a missing count (an old
    # record) leaves the unit undefined rather than guessing.
    assert stats.unit_value([_harm(2, 20), _harm(0, 0)], "harm") == pytest.approx(0.1)
    assert stats.unit_value([{"harm": 0.1}], "harm") is None
    # Help likewise, over the pairs wrong without the context; other metrics are means.
    helps = [dict(help=1.0, n_wrong_x=2), dict(help=0.5, n_wrong_x=18)]
    assert stats.unit_value(helps, "help") == pytest.approx(11 / 20)
    assert stats.unit_value([dict(acc_x=0.2), dict(acc_x=0.4)], "acc_x") == pytest.approx(0.3)
    # Excess Harm: pooled Harm minus the pooled floor, over the same pairs; no floor, no excess.
    floored = [dict(**_harm(6, 20), harm_floor=0.2), dict(**_harm(2, 20), harm_floor=0.1)]
    assert stats.unit_value(floored, "excess_harm") == pytest.approx(8 / 40 - 6 / 40)
    assert stats.unit_value([_harm(6, 20)], "excess_harm") is None


def test_aggregate_reduces_each_base_first_and_keeps_bounded_metrics_in_range():
    harms = {(0, 0): (3, 10), (0, 1): (40, 100), (1, 0): (5, 50), (1, 1): (5, 50), (2, 0): (1, 3)}
    recs = [
        _record(
            "a",
            "opd",
            s,
            b,
            before=dict(acc_xc=0.7 + 0.1 * b),
            **_harm(*h),
            layer_cosine=[1.0, 0.999, 0.95 + 0.02 * b],
        )
        for (b, s), h in harms.items()
    ]
    agg = stats.aggregate(recs)
    # Base 0 pools 43 of 110, base 1 10 of 100; base 2 rests on 3 pairs: undefined, left out.
    want = [43 / 110, 10 / 100]
    lo, hi = scipy_stats.t.interval(0.95, 1, np.mean(want), scipy_stats.sem(want))
    assert tuple(agg["a"]["opd"]["harm"])[:4] == pytest.approx((np.mean(want), 0.0, 1.0, 2))
    assert lo < 0 and hi > 1  # the t-interval (df 1) reached past both ends: clipped to [0, 1]
    # The base model: once per base seed (its runs share it), not once per run.
    assert agg["a"]["base"]["acc_xc"].n == 3
    assert agg["a"]["base"]["acc_xc"].mean == pytest.approx(0.8)
    cosine = agg["a"]["opd"]["cosine"]
    assert cosine.n == 3 and cosine.hi <= 1.0  # a cosine never reaches past 1
    assert math.isnan(agg["a"]["opd"]["retention_mean"].mean)  # never measured: "-", not 0


def test_holm_against_a_hand_worked_example():
    # Sorted: d 0.005, a 0.01, c 0.03, b 0.04 with m = 4: 4 x 0.005 = 0.02, 3 x 0.01 = 0.03,
    # 2 x 0.03 = 0.06, 1 x 0.04 = 0.04 -> 0.06 (never below an earlier step's).
    adjusted = stats.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005})
    assert adjusted == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06, "d": 0.02})
    assert stats.holm({"x": 0.6, "y": 0.7}) == pytest.approx({"x": 1.0, "y": 1.0})
    assert stats.holm({}) == {}


def _cell(cell, base_harm, opd_nca, pairs=100):
    """Records of one cell: per base seed (position), the base model's Harm count, and the
    (OPD, NCA) Harm counts of its one distillation seed, all out of `pairs`."""
    recs = []
    for b, (base, (opd, nca)) in enumerate(zip(base_harm, opd_nca, strict=True)):
        before = dict(**_harm(base, pairs), acc_xc=0.9)
        for variant, count in (("opd", opd), ("nca", nca)):
            recs.append(_record(cell, variant, 0, b, before=before, **_harm(count, pairs)))
    return recs


def test_verdicts_degradation_first_with_holm_across_the_degraded_cells():
    # a, b: OPD raised Harm above the base's; NCA lowered it (a clearly, b barely).
    # c: OPD lowered Harm below the base's and kept Acc_xc: no degradation to fix.
    recs = _cell("a", [10, 12, 11], [(30, 10), (32, 11), (35, 13)])
    recs += _cell("b", [10, 12, 11], [(30, 29), (32, 20), (35, 36)])
    recs += _cell("c", [40, 42, 41], [(30, 10), (32, 11), (35, 13)])
    comps = stats.cell_comparisons(recs)
    p = {
        cell: scipy_stats.ttest_1samp(
            np.array([n for _, n in pairs]) / 100 - np.array([o for o, _ in pairs]) / 100, 0.0
        ).pvalue
        for cell, pairs in (
            ("a", [(30, 10), (32, 11), (35, 13)]),
            ("b", [(30, 29), (32, 20), (35, 36)]),
        )
    }
    want = stats.holm(p)  # the family: the two degraded cells, not c
    assert comps["a"].p_holm == pytest.approx(want["a"]) and want["a"] < stats.ALPHA
    assert comps["b"].p_holm == pytest.approx(want["b"]) and want["b"] > stats.ALPHA
    assert comps["a"].verdict == stats.LOWERS and comps["b"].verdict == stats.UNRESOLVED
    assert comps["c"].verdict == stats.NO_DEGRADATION and math.isnan(comps["c"].p_holm)
    assert comps["c"].degradation_harm.mean == pytest.approx((-10 - 10 - 6) / 300)
    # The two counts, named apart: direction over every cell, significance over the verdicts.
    assert stats.direction_count(comps) == (3, 3)
    assert stats.significance_count(comps) == (1, 2)
    notes = stats.where_nca_did_not_help(comps)
    assert [n.split(":")[0] for n in notes] == ["b", "c"]
    assert stats.NO_DEGRADATION in notes[1] and "Help NCA - OPD" in notes[1]


def test_a_degenerate_cell_gets_no_interval_and_no_verdict():
    """Two bases whose NCA Harm rests on 0 of 1 pair each (a collapsed Acc_x): the old pairing
    read -1.000 [-1.000, -1.000] and counted a win; here both units are undefined."""
    recs = _cell("collapsed", [10, 12], [(20, 0), (20, 0)])
    for rec in recs:
        if rec["spec"]["variant"] == "nca":
            rec["after"] = _harm(0, 1)
    recs += _cell("one_base", [10, 12], [(30, 10), (30, 10)])
    recs[-1]["after"] = _harm(0, 5)  # the second base's NCA: under MIN_PAIRS
    # No base model's evaluation: whether OPD degraded the cell is unknown, so no verdict either.
    no_base = _cell("no_base", [10, 12, 11], [(30, 10), (32, 11), (35, 13)])
    recs += [dict(rec, before=None) for rec in no_base]
    comps = stats.cell_comparisons(recs)
    assert comps["no_base"].diff["harm"].n == 3 and comps["no_base"].verdict == stats.NO_VERDICT
    collapsed, one = comps["collapsed"].diff["harm"], comps["one_base"].diff["harm"]
    assert collapsed.n == 0 and math.isnan(collapsed.mean)
    assert one.n == 1 and math.isnan(one.lo) and math.isnan(one.p)
    assert comps["collapsed"].verdict == comps["one_base"].verdict == stats.NO_VERDICT
    assert stats.significance_count(comps) == (0, 0)
    assert stats.direction_count(comps) == (2, 2)  # the defined differences, by direction
