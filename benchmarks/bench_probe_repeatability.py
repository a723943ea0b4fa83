"""How repeatable is the stale-table probe (`calibration/staleness.py`), and does it tell a table off by 2x?

For each probe setting (token counts per call, cases per size, repeats) and each test model (the tiny preset
and the same with 256-wide experts), several fresh calibrations; per calibration the fresh table is probed
three times, then tables scaled to be off by 2x and 0.5x from the first fresh probe are probed once each.
Prints, per setting, the fresh ratios (predicted / measured, median over the probe's calls), the scaled
tables' ratios (stale beyond 1.5 either way) and the probe's seconds.

    .venv/bin/python benchmarks/bench_probe_repeatability.py --calibrations 3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

import caee_jax  # noqa: E402
from caee_jax.calibration import staleness  # noqa: E402
from caee_jax.calibration.costs import calibrate  # noqa: E402

SETTINGS = [((2, 16), 3, 5), ((2, 16), 6, 15), ((16, 64), 6, 15), ((16, 64), 3, 9)]  # (sizes, cases, repeats)


def scaled(table, factor: float):
    """The table with every compute time constant multiplied by `factor`."""
    devices = tuple(
        dataclasses.replace(
            d, fixed_s=d.fixed_s * factor, pair_s=d.pair_s * factor, activation_s=d.activation_s * factor
        )
        for d in table.devices
    )
    return dataclasses.replace(table, devices=devices)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibrations", type=int, default=3, help="fresh calibrations per model and setting")
    args = parser.parse_args(argv)
    tiny = caee_jax.preset("tiny")
    models = {"tiny": tiny, "tiny-256": dataclasses.replace(tiny, hidden_size=256, moe_intermediate_size=256)}
    print(f"load average {os.getloadavg()}")
    for name, config in models.items():
        model = caee_jax.init_random(config)
        for sizes, cases, repeats in SETTINGS:
            staleness.PROBE_SIZES, staleness.PROBE_CASES, staleness.PROBE_REPEATS = sizes, cases, repeats
            fresh, off, seconds = [], [], []
            for _ in range(args.calibrations):
                with tempfile.TemporaryDirectory() as scratch:
                    table = calibrate(model, cases_per_size=3, repeats=5, scratch_dir=scratch)
                probes = [staleness.probe_table(model, table) for _ in range(3)]
                fresh.append([round(p.ratio, 2) for p in probes])
                seconds.append(round(probes[-1].seconds, 2))
                off.append(
                    [round(staleness.probe_table(model, scaled(table, f / probes[0].ratio)).ratio, 2) for f in (2, 0.5)]
                )
            print(
                f"{name}, sizes {sizes}, {cases} x {repeats}: fresh {fresh}; off by 2x / 0.5x {off}; probe s {seconds}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
