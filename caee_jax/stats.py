"""Statistics for noisy measurements: ratios of medians (or means) with paired bootstrap intervals; standard
errors of means over correlated samples."""

from __future__ import annotations

import numpy as np

DRAWS = 2000  # bootstrap resamples


def paired_ratio(base, cand, statistic=np.median, seed: int = 0) -> tuple[float, float, float]:
    """statistic(cand) / statistic(base) (np.median, or np.mean: the ratio of totals) and its bootstrap 95%
    interval (low, high), for paired samples base[i], cand[i] (e.g. rounds or decode steps measured
    alternately) resampled together. base, cand: [N] > 0."""
    base, cand = np.asarray(base, np.float64), np.asarray(cand, np.float64)
    if base.shape != cand.shape or base.ndim != 1 or len(base) == 0:
        raise ValueError(f"need two equal-length, non-empty 1-d samples; got shapes {base.shape} and {cand.shape}")
    picks = np.random.default_rng(seed).integers(0, len(base), (DRAWS, len(base)))
    ratios = statistic(cand[picks], axis=1) / statistic(base[picks], axis=1)
    low, high = np.quantile(ratios, [0.025, 0.975])
    return float(statistic(cand) / statistic(base)), float(low), float(high)


def clustered_se(values, groups) -> float:
    """The standard error of values.mean() [M] with each group's members counted as one draw (groups [M]
    non-negative ids; e.g. the tokens of one window, which share a context and need not vary independently):
    sqrt(G / (G - 1) * sum over groups of (sum of deviations from the mean)^2) / M, G the groups present.
    With one member per group it is the usual s.e. (ddof 1)."""
    values = np.asarray(values, np.float64)
    deviation = np.bincount(groups, values - values.mean())  # [max id + 1] summed per group
    count = np.count_nonzero(np.bincount(groups))
    return float(np.sqrt(np.sum(deviation**2) * count / max(count - 1, 1)) / len(values))
