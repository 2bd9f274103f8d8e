"""Paired bootstrap confidence intervals for comparing two configurations on the same queries."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 10_000


@dataclass(frozen=True)
class Difference:
    """Mean of (treatment - baseline) over queries, with a percentile bootstrap interval."""

    delta: float
    low: float
    high: float
    n_queries: int
    n_resamples: int

    def as_metrics(self, name: str) -> dict[str, float]:
        return {
            f"{name}_delta": self.delta,
            f"{name}_delta_ci_low": self.low,
            f"{name}_delta_ci_high": self.high,
        }


def paired_bootstrap(
    baseline: np.ndarray,
    treatment: np.ndarray,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
    chunk: int = 500,
) -> Difference:
    """Bootstrap the mean per-query difference, resampling queries with replacement.

    Both arrays hold one value per query in the same query order (e.g. AP, or hit@1 as 0/1).
    Queries where either value is NaN (no relevant item) are left out of both. The interval is
    the percentile interval of the resampled means; resamples are drawn in chunks, so memory is
    `chunk` x n_queries, whatever `n_resamples` is. The same seed gives the same interval.
    """
    a, b = np.asarray(baseline, dtype=np.float64), np.asarray(treatment, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"baseline and treatment must be equal-length 1-D, got {a.shape}, {b.shape}"
        )
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    diff = (b - a)[np.isfinite(a) & np.isfinite(b)]
    if len(diff) == 0:
        return Difference(np.nan, np.nan, np.nan, 0, n_resamples)

    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for s in range(0, n_resamples, chunk):
        e = min(s + chunk, n_resamples)
        means[s:e] = diff[rng.integers(0, len(diff), size=(e - s, len(diff)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Difference(float(diff.mean()), float(low), float(high), len(diff), n_resamples)
