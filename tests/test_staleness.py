"""The cost-table probe: a table calibrated here is silent, one whose constants are off by 2x either way warns."""

from __future__ import annotations

import dataclasses

import pytest

import caee_jax
from caee_jax.calibration.costs import calibrate
from caee_jax.calibration.staleness import STALE_RATIO, Probe, probe_table, stale_warning


@pytest.mark.timing
def test_a_fresh_table_is_silent_and_a_table_off_by_2x_warns(tmp_path):
    """On the tiny preset with 256-wide experts (layer calls long enough to time). Timing on a shared machine:
    a load spike during calibration or probe can make one fresh table look stale, so calibration and probe are
    repeated (at most 3 times) until the fresh table is silent."""
    model = caee_jax.init_random(
        dataclasses.replace(caee_jax.preset("tiny"), hidden_size=256, moe_intermediate_size=256)
    )
    ratios = []
    for attempt in range(3):
        scratch = tmp_path / str(attempt)
        scratch.mkdir()
        table = calibrate(model, cases_per_size=3, repeats=6, scratch_dir=str(scratch))
        fresh = probe_table(model, table)
        ratios.append(round(fresh.ratio, 2))
        if not fresh.stale:
            break
    assert not fresh.stale, f"tables calibrated seconds ago predict {ratios}x the measured times"
    assert stale_warning(fresh, table, "python launch/calibrate.py") is None
    assert fresh.cases == 6 and fresh.seconds < 30
    # Off by 2x from what the fresh probe measured (scaled by 2 / fresh.ratio: the fresh table's own error does
    # not add to or hide it). One probe to the next varies up to ~1.25x (benchmarks/bench_probe_repeatability.py,
    # docs/RESULTS.md), inside the 2 / 1.5 margin.
    for factor in (2.0, 0.5):
        probe = probe_table(model, table.compute_scaled(factor / fresh.ratio))
        assert probe.stale, f"a table off by {factor}x reads {probe.ratio:.2f}x (fresh: {fresh.ratio:.2f}x)"
        warning = stale_warning(probe, table, "python launch/calibrate.py --preset tiny")
        assert warning.startswith("warning: the cost table for ") and warning.count("\n") == 0
        assert f"{probe.ratio:.2f}x the measured ones" in warning
        assert warning.endswith("recalibrate with: python launch/calibrate.py --preset tiny")
        assert ("faster" if factor > 1 else "slower") in warning


def test_the_bounds_are_a_factor_either_way():
    assert not Probe(STALE_RATIO, 1.0, 6).stale and not Probe(1 / STALE_RATIO, 1.0, 6).stale
    assert Probe(STALE_RATIO * 1.01, 1.0, 6).stale and Probe(0.99 / STALE_RATIO, 1.0, 6).stale
