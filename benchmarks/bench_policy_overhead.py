"""What CAEE's decision costs a decode step when it prunes nothing.

The bundled model's teacher-forced decode step (`steps.teacher_forced_step`, as `launch/eval.py` times it)
under three plans, alternated step by step with the order flipped every round: unpruned; CAEE with the
one-device settings (`cost_exponent` 0.5, both importance options) and theta 1e-9, so that it decides on
every slot and prunes none; and mass_ratio with knob 1e-9 (a per-token rule, likewise pruning none). Each
plan's median step over the unpruned one's, with a paired bootstrap 95% interval; the logits are checked
equal, so the three plans run the same experts and differ only by the decision.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_policy_overhead.py --text runs/heldout-numpy-1800k.txt
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import caee_jax
from caee_jax.api import BUNDLED_MODEL
from caee_jax.caee.importance import default_path, load_importance
from caee_jax.caee.peer_rules import PeerRule
from caee_jax.caee.policy import CAEEConfig
from caee_jax.calibration.tables import select_table
from caee_jax.eval.decode_eval import windows_of
from caee_jax.runtime import steps
from caee_jax.stats import paired_ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", required=True, help="text to decode (windows of it, teacher-forced)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=9, help="rounds of 31 steps; the first is warm-up")
    args = parser.parse_args()
    model = caee_jax.load()
    load_importance(model, default_path(BUNDLED_MODEL))
    table = select_table(model.config, None, model.dtype, model.execution.backend, weights=model.weights)
    model.execution = dataclasses.replace(model.execution, cost_table=table)
    caee = CAEEConfig(theta=1e-9, expert_importance=True, layer_sensitivity=True, cost_exponent=0.5)
    plans = {
        "unpruned": model.execution,
        "CAEE, theta 1e-9": dataclasses.replace(model.execution, pruning=caee),
        "mass_ratio, knob 1e-9": dataclasses.replace(model.execution, pruning=PeerRule("mass_ratio", 1e-9)),
    }
    with open(args.text, encoding="utf-8") as f:
        windows, prefix = windows_of(model.text_ids(f.read()), 64, args.batch), 32
    greedy = (np.uint32(0), np.float32(0), np.float32(1))
    _, prefilled, _, _ = steps.prefill(
        model.graphdef, model.state, jnp.asarray(windows[:, :prefix]), jnp.full(args.batch, prefix, jnp.int32),
        *greedy, None, None, cache_len=64, execution=model.execution,
    )  # fmt: skip
    times = {name: [] for name in plans}
    for round_ in range(args.rounds):
        caches = {name: jax.tree.map(jnp.copy, prefilled) for name in plans}
        order = list(plans) if round_ % 2 == 0 else list(plans)[::-1]
        for t in range(prefix, 63):
            tokens, positions = jnp.asarray(windows[:, t]), jnp.full(args.batch, t, jnp.int32)
            logprobs = {}
            for name in order:
                start = time.perf_counter()
                out = steps.teacher_forced_step(
                    model.graphdef, model.state, caches[name], tokens, positions, None, None,
                    execution=plans[name], table=table,
                )  # fmt: skip
                jax.block_until_ready(out)
                if round_:
                    times[name].append(time.perf_counter() - start)
                logprobs[name], caches[name] = np.asarray(out[0]), out[1]
            if any(not np.array_equal(logprobs["unpruned"], lp) for lp in logprobs.values()):
                raise SystemExit(f"step {t}: a plan that prunes nothing changed the logits")
    print(f"load average {os.getloadavg()[0]:.2f}, batch {args.batch}, {len(times['unpruned'])} steps per plan")
    print("| plan | median ms | / unpruned [95% CI] |\n|---|---|---|")
    for name, samples in times.items():
        ratio, low, high = paired_ratio(times["unpruned"], samples)
        print(f"| {name} | {1e3 * np.median(samples):.3f} | {ratio:.4f} [{low:.4f}, {high:.4f}] |")


if __name__ == "__main__":
    main()
