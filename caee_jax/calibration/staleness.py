"""Does a stored cost table still describe this machine? A short probe on first use.

A table calibrated on one machine was measured at ~50% error on another of the same kind, and a machine
changes (other load, another CPU, a new jaxlib). Before CAEE decides with a table, `probe_table` times a
few MoE-layer calls on fresh routings (about a second) and compares them with the table's prediction;
`stale_warning` turns a median predicted/measured ratio outside [1/1.5, 1.5] into one warning line that
gives the measured ratio and the command that recalibrates.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from caee_jax.caee.cost_table import CostTable
from caee_jax.calibration.costs import validate

STALE_RATIO = 1.5  # a median prediction off by more than this factor, either way, is stale
# Tokens per probed call: a batch-16 decode step and a 64-token routing. Calls of a few tokens are too short
# to time on a shared machine; 6 rounds (the fastest counts) outlast most bursts of other load
# (benchmarks/bench_probe_repeatability.py, docs/RESULTS.md).
PROBE_SIZES = (16, 64)
PROBE_CASES, PROBE_REPEATS, PROBE_ROUNDS, PROBE_SEED = 3, 30, 6, 7


@dataclasses.dataclass(frozen=True)
class Probe:
    """ratio: median over the probed calls of predicted / measured layer time; seconds: the probe's cost
    (compilation included); cases: calls probed."""

    ratio: float
    seconds: float
    cases: int

    @property
    def stale(self) -> bool:
        return not 1 / STALE_RATIO <= self.ratio <= STALE_RATIO


def probe_table(model, table: CostTable) -> Probe:
    """Times PROBE_CASES routings per size in PROBE_SIZES on `model` (experts on device) against `table`, as
    calibration times them."""
    start = time.perf_counter()
    result = validate(
        model, table, cases_per_size=PROBE_CASES, repeats=PROBE_REPEATS, rounds=PROBE_ROUNDS, seed=PROBE_SEED,
        sizes=PROBE_SIZES, progress=False,
    )  # fmt: skip
    ratio = float(np.median(result.predicted_s / result.measured_s))
    return Probe(ratio, time.perf_counter() - start, len(result.measured_s))


def stale_warning(probe: Probe, table: CostTable, recalibrate: str) -> str | None:
    """One line when the table is stale (`recalibrate`: the command that makes a new one), else None."""
    if not probe.stale:
        return None
    direction = "slower" if probe.ratio < 1 else "faster"
    return (
        f"warning: the cost table for {table.signature.slug()} predicts MoE layer times {probe.ratio:.2f}x the "
        f"measured ones (median of {probe.cases} probed calls): this machine runs {direction} than where it was "
        f"calibrated, so CAEE's savings are mispriced; recalibrate with: {recalibrate}"
    )
