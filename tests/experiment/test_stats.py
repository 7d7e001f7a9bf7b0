"""Paired bootstrap and best-epoch selection against answers known independently: degenerate
vectors, the exact bootstrap distribution enumerated over every resample of a small vector, and
the normal approximation at large n."""
import itertools
import math

import numpy as np
import pytest

from reft_jax.checkpoint import improves
from reft_jax.experiment.stats import best_epoch, paired_bootstrap


def test_identical_vectors_give_zero_interval():
    a = [1, 0, 1, 1, 0, 0, 1, 0]
    assert paired_bootstrap(a, list(a)) == (0.0, 0.0, 0.0)


def test_constant_difference_has_a_point_interval():
    # every question: a right, b wrong -> every resample's mean difference is exactly 1
    assert paired_bootstrap([1] * 7, [0] * 7, n_boot=500) == (1.0, 1.0, 1.0)
    assert paired_bootstrap([True] * 5, [True] * 5, n_boot=200) == (0.0, 0.0, 0.0)


def _exact_bootstrap_quantiles(diff, level):
    """Quantiles of the exact bootstrap distribution: every one of n^n resamples, equally likely."""
    n = len(diff)
    means = sorted(sum(diff[i] for i in idx) / n for idx in itertools.product(range(n), repeat=n))
    atoms, counts = np.unique(np.round(means, 12), return_counts=True)
    cdf = np.cumsum(counts) / len(means)
    tail = (1 - level) / 2
    lo = atoms[np.searchsorted(cdf, tail)]
    hi = atoms[np.searchsorted(cdf, 1 - tail)]
    # distance of each tail from the nearest jump of the CDF: the Monte Carlo percentile lands
    # on the exact atom when it exceeds the sampling error of a quantile (~0.0016 at 10,000 draws)
    margin = min(np.min(np.abs(cdf - tail)), np.min(np.abs(cdf - (1 - tail))))
    return lo, hi, margin


def test_small_vector_matches_the_exact_bootstrap_distribution():
    a = [1, 1, 1, 1, 0, 0]
    b = [0, 0, 1, 0, 0, 1]  # differences 1, 1, 0, 1, 0, -1: mean 1/3
    diff = [x - y for x, y in zip(a, b)]
    lo, hi, margin = _exact_bootstrap_quantiles(diff, 0.95)
    assert margin > 0.005  # both tails > 3 sampling sd (0.0016) away from a jump of the CDF
    mean, got_lo, got_hi = paired_bootstrap(a, b, n_boot=10000, seed=0)
    assert mean == pytest.approx(1 / 3)
    assert got_lo == pytest.approx(lo, abs=1e-12)
    assert got_hi == pytest.approx(hi, abs=1e-12)


def test_large_n_matches_the_normal_approximation():
    n = 4000
    # a right on 60% of questions, b on 50%, paired so that the differences are
    # +1 on 30%, -1 on 20%, 0 elsewhere: mean 0.1, variance 0.5 - 0.01 = 0.49
    a = np.zeros(n, int)
    b = np.zeros(n, int)
    a[:1200] = 1                      # +1
    b[1200:2000] = 1                  # -1
    a[2000:3200] = 1
    b[2000:3200] = 1                  # 0 (both right)
    perm = np.random.default_rng(7).permutation(n)
    a, b = a[perm], b[perm]
    assert a.mean() == pytest.approx(0.6) and b.mean() == pytest.approx(0.5)
    se = math.sqrt(0.49 / n)
    mean, lo, hi = paired_bootstrap(a, b, n_boot=10000, seed=3)
    assert mean == pytest.approx(0.1)
    # Monte Carlo error of a 2.5% quantile at 10,000 draws is ~0.03 se; skew is negligible here
    assert lo == pytest.approx(0.1 - 1.959964 * se, abs=0.12 * se)
    assert hi == pytest.approx(0.1 + 1.959964 * se, abs=0.12 * se)


def test_seed_makes_the_interval_reproducible_and_validates_input():
    a, b = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1], [0, 0, 1, 0, 1, 1, 0, 1, 0, 0]
    assert paired_bootstrap(a, b, seed=5) == paired_bootstrap(a, b, seed=5)
    with pytest.raises(ValueError):
        paired_bootstrap([1, 0], [1])
    with pytest.raises(ValueError):
        paired_bootstrap([], [])


def test_best_epoch_picks_the_maximum():
    points = [{"epoch": 1, "acc": 0.2}, {"epoch": 2, "acc": 0.5}, {"epoch": 3, "acc": 0.4}]
    assert best_epoch(points, "acc") == (2, 0.5)
    # order of the records does not matter; points without the key or an epoch are skipped
    shuffled = [points[2], {"epoch": 4}, points[0], {"acc": 0.9}, points[1], {"epoch": 5, "acc": float("nan")}]
    assert best_epoch(shuffled, "acc") == (2, 0.5)
    assert best_epoch([{"epoch": 1}], "acc") is None


def test_best_epoch_ties_follow_the_trainers_rule():
    points = [{"epoch": 1, "acc": 0.5}, {"epoch": 2, "acc": 0.3}, {"epoch": 3, "acc": 0.5}]
    # the trainers' loop: an epoch takes over when improves(value, best)
    best = None
    for p in points:
        if best is None or improves(p["acc"], best[1]):
            best = (p["epoch"], p["acc"])
    assert best_epoch(points, "acc") == best == (3, 0.5)


def test_best_epoch_keeps_the_last_record_of_a_re_evaluated_epoch():
    points = [{"epoch": 1, "acc": 0.9}, {"epoch": 2, "acc": 0.4}, {"epoch": 1, "acc": 0.1}]
    assert best_epoch(points, "acc") == (2, 0.4)
