"""caee_jax.stats: the ratio of medians (or means) and its paired bootstrap interval."""

from __future__ import annotations

import numpy as np
import pytest

from caee_jax.stats import clustered_se, paired_ratio


def test_paired_ratio_is_exact_and_its_interval_tightens_with_more_pairs():
    rng = np.random.default_rng(1)
    base = rng.lognormal(0.0, 0.3, 400)
    ratio, low, high = paired_ratio(base, 0.8 * base)  # every pair exactly 0.8: no spread at all
    assert ratio == pytest.approx(0.8) and low == pytest.approx(0.8) and high == pytest.approx(0.8)
    noisy = 0.8 * base * rng.lognormal(0.0, 0.2, 400)
    _, low_few, high_few = paired_ratio(base[:20], noisy[:20])
    ratio, low, high = paired_ratio(base, noisy)
    assert low < ratio < high and 0.7 < ratio < 0.9
    assert high - low < high_few - low_few


def test_paired_ratio_refuses_unpaired_samples():
    with pytest.raises(ValueError, match=r"shapes \(3,\) and \(2,\)"):
        paired_ratio([1.0, 2.0, 3.0], [1.0, 2.0])


def test_paired_ratio_of_means_is_the_ratio_of_totals():
    """Steps of two modes (e.g. layers that read or not): the median sits in one mode, the mean weighs both."""
    base = np.array([1.0, 1.0, 1.0, 3.0, 3.0])
    cand = np.array([1.0, 1.0, 1.0, 1.0, 1.0])
    assert paired_ratio(base, cand)[0] == pytest.approx(1.0)
    ratio, low, high = paired_ratio(base, cand, np.mean)
    assert ratio == pytest.approx(5 / 9) and low <= ratio <= high


def test_clustered_se_is_the_usual_one_for_singletons_and_wider_for_groups_that_move_together():
    values = np.random.default_rng(0).normal(size=400)
    assert clustered_se(values, np.arange(400)) == pytest.approx(values.std(ddof=1) / np.sqrt(400))
    together = np.repeat(values[:100], 4)  # 100 draws, each counted 4 times: the s.e. of 100 draws, not 400
    assert clustered_se(together, np.repeat(np.arange(100), 4)) == pytest.approx(values[:100].std(ddof=1) / 10)
    assert clustered_se(together, np.arange(400)) < 0.6 * clustered_se(together, np.repeat(np.arange(100), 4))
