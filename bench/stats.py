"""Statistics for the benchmarks: one definition of each, so every table in bench/results means the same."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
MIN_ROUNDS = 10  # fewer rounds than this give no interval worth printing


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile, interpolated between the two nearest samples (numpy's default); NaN
    for no samples, so an empty class shows as such instead of failing the run."""
    return float(np.percentile(values, q)) if len(values) else float("nan")


def estimate(statistic: Callable[..., np.ndarray], *samples: Sequence[float]) -> float:
    """`statistic(*samples)` on the measured samples: the point estimate whose `interval` the table
    prints beside it (the same function, so the two cannot disagree on what they measure)."""
    return float(statistic(*(np.asarray(s, dtype=float) for s in samples)))


def interval(statistic: Callable[..., np.ndarray], *samples: Sequence[float]) -> tuple[float, float] | None:
    """The 95% bootstrap confidence interval (scipy's BCa) of `statistic(*samples, axis=...)`.

    The samples are paired: position i of each was measured in the same round, so rounds are
    resampled whole and the machine's drift from round to round stays inside every resample.
    What it answers: would another run of the same length on this machine likely land on the
    other side of a target? On a shared machine llama-server's own speed varies from one round
    to the next, so a median over a few dozen rounds can miss a target by chance; the interval
    says when it could have. None for fewer than MIN_ROUNDS rounds. The resampling is seeded, so
    the same results give the same interval.
    """
    if len(samples[0]) < MIN_ROUNDS:
        return None
    result = stats.bootstrap(tuple(np.asarray(s, dtype=float) for s in samples), statistic, paired=True, vectorized=True,
                             confidence_level=CONFIDENCE, n_resamples=9999, rng=np.random.default_rng(0))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def added_percentile(q: float) -> Callable[..., np.ndarray]:
    """Statistic for `interval`: the q-th percentile of the first sample minus the second's."""
    def statistic(through: np.ndarray, direct: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.percentile(through, q, axis=axis) - np.percentile(direct, q, axis=axis)
    return statistic


def median_ratio(through: np.ndarray, direct: np.ndarray, axis: int = -1) -> np.ndarray:
    """Statistic for `interval`: the median of the per-round ratios."""
    return np.median(through / direct, axis=axis)


def median_difference(through: np.ndarray, direct: np.ndarray, axis: int = -1) -> np.ndarray:
    """Statistic for `interval`: the median of the per-round differences."""
    return np.median(through - direct, axis=axis)
