"""How repeatable is the stale-table probe (`calibration/staleness.py`), and how often does it tell a table off
by 2x?

For each probe setting (token counts per call, cases per size, repeats, rounds) and each test model (the tiny preset
and the same with 256-wide experts), several fresh calibrations. Per calibration the fresh table is probed
three times (their median is the reference: what this machine measures now); then tables scaled to be off
by 2x and by 0.5x from that reference are probed `--scaled-probes` times each, alternating. Prints, per
setting, the fresh ratios (predicted / measured, median over the probe's calls), the scaled tables' ratios,
how many of those probes warned (stale beyond 1.5 either way) and the probe's seconds.

    .venv/bin/python benchmarks/bench_probe_repeatability.py --calibrations 5 --models tiny-256
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

import caee_jax  # noqa: E402
from caee_jax.calibration import staleness  # noqa: E402
from caee_jax.calibration.costs import calibrate  # noqa: E402

# (sizes, cases, repeats, rounds) of the probe; calibration takes the same number of rounds, capped at 3
SETTINGS = [((16, 64), 3, 9, 1), ((16, 64), 3, 30, 6)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibrations", type=int, default=3, help="fresh calibrations per model and setting")
    parser.add_argument("--scaled-probes", type=int, default=3, help="probes of each scaled table per calibration")
    parser.add_argument("--models", default="tiny,tiny-256", help="comma-separated: tiny, tiny-256")
    args = parser.parse_args(argv)
    tiny = caee_jax.preset("tiny")
    models = {"tiny": tiny, "tiny-256": dataclasses.replace(tiny, hidden_size=256, moe_intermediate_size=256)}
    print(f"load average {os.getloadavg()}")
    for name in args.models.split(","):
        model = caee_jax.init_random(models[name])
        for sizes, cases, repeats, rounds in SETTINGS:
            staleness.PROBE_SIZES, staleness.PROBE_CASES = sizes, cases
            staleness.PROBE_REPEATS, staleness.PROBE_ROUNDS = repeats, rounds
            fresh, seconds, read = [], [], {2.0: [], 0.5: []}
            for _ in range(args.calibrations):
                with tempfile.TemporaryDirectory() as scratch:
                    table = calibrate(model, cases_per_size=3, repeats=6, rounds=min(rounds, 3), scratch_dir=scratch)
                probes = [staleness.probe_table(model, table) for _ in range(3)]
                fresh.append([round(p.ratio, 2) for p in probes])
                seconds.append(probes[-1].seconds)
                reference = float(np.median([p.ratio for p in probes]))
                for _ in range(args.scaled_probes):
                    for factor, ratios in read.items():
                        ratios.append(staleness.probe_table(model, table.compute_scaled(factor / reference)).ratio)
            warned = {f: sum(staleness.Probe(r, 0.0, 0).stale for r in v) for f, v in read.items()}
            silent = sum(not staleness.Probe(r, 0.0, 0).stale for probes in fresh for r in probes)
            print(
                f"{name}, sizes {sizes}, {cases} x {repeats} in {rounds} rounds: "
                f"fresh {fresh} (silent {silent}/{3 * len(fresh)}); "
                + "; ".join(
                    f"off by {f}x read {min(v):.2f}-{max(v):.2f}, warned {warned[f]}/{len(v)}" for f, v in read.items()
                )
                + f"; probe s {min(seconds):.2f}-{max(seconds):.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
