"""`experiments.stats.crossed_bootstrap` (seeds crossed with items) against a simulation with a
known answer, and against the bootstrap that resampled items independently within each seed."""

import numpy as np
import pytest

from experiments.stats import crossed_bootstrap

SEEDS, ITEMS = 5, 30
SD_SEED, SD_ITEM, SD_NOISE = 0.05, 0.8, 0.2  # items differ most: the case the old one got wrong
TRUE_MEAN = 0.2


def _mean(units):
    return float(np.mean([u.mean() for u in units]))


def _simulate(rng):
    """One experiment: every seed answers the same items; value = mean + seed + item + noise."""
    item_BxI = rng.normal(0, SD_ITEM, ITEMS)
    return [
        TRUE_MEAN + rng.normal(0, SD_SEED) + item_BxI + rng.normal(0, SD_NOISE, ITEMS)
        for _ in range(SEEDS)
    ]


def _independent_items(units, n_boot, rng):
    """The old scheme: seeds with replacement, then items with replacement within each drawn
    seed, independently (as if each seed had its own items)."""
    values = []
    for _ in range(n_boot):
        picks = rng.integers(0, len(units), len(units))
        values.append(_mean([units[i][rng.integers(0, ITEMS, ITEMS)] for i in picks]))
    return np.percentile(values, [2.5, 97.5])


def test_coverage_against_a_known_answer_and_the_independent_items_bootstrap():
    rng = np.random.default_rng(0)
    hits_crossed = hits_old = 0
    widths_crossed, widths_old = [], []
    sims = 200
    for i in range(sims):
        units = _simulate(rng)
        lo, hi = crossed_bootstrap(units, _mean, n_boot=300, seed=i)["ci95"]
        old_lo, old_hi = _independent_items(units, 300, rng)
        hits_crossed += lo <= TRUE_MEAN <= hi
        hits_old += old_lo <= TRUE_MEAN <= old_hi
        widths_crossed.append(hi - lo)
        widths_old.append(old_hi - old_lo)
    # The crossed bootstrap covers near its level; the old one was anti-conservative: it treated
    # the item effect, shared by every seed, as independent noise in each.
    assert hits_crossed / sims >= 0.88, hits_crossed / sims
    assert hits_old / sims <= 0.8 and hits_crossed - hits_old >= 0.15 * sims, hits_old / sims
    assert np.median(widths_crossed) > 1.5 * np.median(widths_old)


def test_point_estimate_undefined_draws_and_errors():
    units = [np.array([1.0, 0.0, 1.0]), np.array([0.0, 0.0, 1.0])]
    out = crossed_bootstrap(units, _mean, n_boot=50)
    assert out["mean"] == pytest.approx(0.5) and out["n_units"] == 2 and out["n_items"] == 3
    assert out["ci95"][0] <= 0.5 <= out["ci95"][1]

    # A statistic undefined on some draws (here: when the drawn items hold no 1): left out, counted.
    def ratio(us):
        s = sum(u.sum() for u in us)
        return None if s == 0 else 1 / s

    out = crossed_bootstrap(units, ratio, n_boot=400)
    assert 0 < out["undefined_draws"] < 400
    one = crossed_bootstrap(units[:1], _mean, n_boot=50)  # one seed: no interval
    assert one["mean"] == pytest.approx(2 / 3) and one["ci95"] is None
    with pytest.raises(ValueError, match="share their items"):
        crossed_bootstrap([np.zeros(3), np.zeros(4)], _mean)


def test_pairs_resample_the_same_items_and_seeds():
    """A pair is one unit [2, items]: identical conditions give a difference of exactly 0 on every
    draw; a constant shift gives exactly that shift."""
    rng = np.random.default_rng(1)
    base = [rng.random(20) for _ in range(4)]

    def diff(us):
        return float(np.mean([u[0].mean() - u[1].mean() for u in us]))

    same = crossed_bootstrap([np.stack([b, b]) for b in base], diff, n_boot=100, item_axis=1)
    assert same["mean"] == 0 and same["ci95"] == [0, 0]
    shifted = [np.stack([b + 0.25, b]) for b in base]
    out = crossed_bootstrap(shifted, diff, n_boot=100, item_axis=1)
    assert out["ci95"] == pytest.approx([0.25, 0.25])
