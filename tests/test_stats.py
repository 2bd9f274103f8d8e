"""Paired bootstrap intervals on cases with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from visual_search.stats import paired_bootstrap


def test_a_constant_difference_has_a_zero_width_interval():
    base = np.linspace(0, 1, 50)
    result = paired_bootstrap(base, base + 0.1, n_resamples=200)
    assert result.delta == pytest.approx(0.1)
    assert result.low == pytest.approx(0.1) and result.high == pytest.approx(0.1)


def test_interval_matches_the_normal_approximation_for_a_large_sample():
    # Differences ~ N(0.05, 0.2): the 95% interval of the mean is 0.05 +- 1.96 * 0.2 / sqrt(n).
    rng = np.random.default_rng(0)
    n = 4000
    base = rng.uniform(size=n)
    diff = rng.normal(0.05, 0.2, size=n)
    result = paired_bootstrap(base, base + diff, n_resamples=4000, seed=1)
    half = 1.96 * diff.std() / np.sqrt(n)
    assert result.delta == pytest.approx(diff.mean())
    assert result.low == pytest.approx(diff.mean() - half, abs=0.1 * half)
    assert result.high == pytest.approx(diff.mean() + half, abs=0.1 * half)


def test_pairing_removes_between_query_variance():
    # Queries differ wildly, the treatment adds exactly 0.01 to each: paired CI excludes 0.
    rng = np.random.default_rng(2)
    base = rng.uniform(size=300)
    result = paired_bootstrap(base, base + 0.01 + rng.normal(0, 0.001, 300), n_resamples=1000)
    assert result.low > 0


def test_same_seed_same_interval_and_nan_queries_dropped_pairwise():
    a = np.array([0.1, np.nan, 0.5, 0.7, 0.2])
    b = np.array([0.2, 0.9, np.nan, 0.8, 0.4])
    first = paired_bootstrap(a, b, n_resamples=500, seed=7)
    assert first == paired_bootstrap(a, b, n_resamples=500, seed=7)
    assert first.n_queries == 3 and first.delta == pytest.approx((0.1 + 0.1 + 0.2) / 3)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap(np.zeros(3), np.zeros(3), confidence=1.5)
