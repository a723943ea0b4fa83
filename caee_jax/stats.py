"""Timing statistics for noisy machines: ratios of medians with paired bootstrap intervals."""

from __future__ import annotations

import numpy as np

DRAWS = 2000  # bootstrap resamples


def median_ratio(base, cand, seed: int = 0) -> tuple[float, float, float]:
    """median(cand) / median(base) and its bootstrap 95% interval (low, high), for paired samples base[i],
    cand[i] (e.g. rounds or decode steps measured alternately) resampled together. base, cand: [N] > 0."""
    base, cand = np.asarray(base, np.float64), np.asarray(cand, np.float64)
    if base.shape != cand.shape or base.ndim != 1 or len(base) == 0:
        raise ValueError(f"need two equal-length, non-empty 1-d samples; got shapes {base.shape} and {cand.shape}")
    picks = np.random.default_rng(seed).integers(0, len(base), (DRAWS, len(base)))
    ratios = np.median(cand[picks], axis=1) / np.median(base[picks], axis=1)
    low, high = np.quantile(ratios, [0.025, 0.975])
    return float(np.median(cand) / np.median(base)), float(low), float(high)
