"""What hashing static arguments once per object (`steps.step_jit`) saves per decode step.

The bundled model's teacher-forced decode step (`steps.teacher_forced_step`, as `launch/eval.py` times it)
runs through two jits of the same function, alternated step by step with the order flipped every round:
"per call", a plain `jax.jit` that hashes its static arguments (flax's GraphDef, the plan, the cost table)
at every call, as `step_jit` did before; and "once", today's `step_jit`. Both compile the same program;
only dispatch differs. Ratio: median(once) / median(per call) with a paired bootstrap 95% interval.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_step_dispatch.py --text runs/heldout-numpy-480k.txt
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import caee_jax
from caee_jax.caee.policy import CAEEConfig
from caee_jax.calibration.tables import select_table
from caee_jax.eval.decode_eval import windows_of
from caee_jax.runtime import steps
from caee_jax.stats import paired_ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", required=True, help="text to decode (windows of it, teacher-forced)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=6, help="rounds of 31 steps; the first is warm-up")
    args = parser.parse_args()
    model = caee_jax.load()
    table = select_table(model.config, None, model.dtype, model.execution.backend, weights=model.weights)
    model.execution = dataclasses.replace(model.execution, cost_table=table)
    with open(args.text, encoding="utf-8") as f:
        ids = model.text_ids(f.read())
    static = ("graphdef", "execution", "table")
    per_call = jax.jit(
        inspect.unwrap(steps.teacher_forced_step), static_argnames=static, donate_argnames=("cache", "expert_cache"),
        compiler_options=steps.CPU_COMPILER_OPTIONS,
    )  # fmt: skip
    steppers = {"per call": per_call, "once": steps.teacher_forced_step}
    caee = dataclasses.replace(model.execution, pruning=CAEEConfig(theta=1.0))
    plans = {"unpruned": model.execution, "caee 1.0": caee}
    print(f"load average {os.getloadavg()[0]:.2f}")
    print("| batch | plan | per call ms | once ms | once / per call [95% CI] |\n|---|---|---|---|---|")
    for batch in args.batches:
        windows, prefix = windows_of(ids, 64, batch), 32
        greedy = (np.uint32(0), np.float32(0), np.float32(1))
        lengths = jnp.full(batch, prefix, jnp.int32)
        _, prefilled, _, _ = steps.prefill(
            model.graphdef, model.state, jnp.asarray(windows[:, :prefix]), lengths, *greedy, None, None,
            cache_len=64, execution=model.execution,
        )  # fmt: skip
        for label, plan in plans.items():
            times = {name: [] for name in steppers}
            for round_ in range(args.rounds):
                caches = {name: jax.tree.map(jnp.copy, prefilled) for name in steppers}
                order = list(steppers) if round_ % 2 == 0 else list(steppers)[::-1]
                for t in range(prefix, 63):
                    tokens, positions = jnp.asarray(windows[:, t]), jnp.full(batch, t, jnp.int32)
                    for name in order:
                        start = time.perf_counter()
                        out = steppers[name](
                            model.graphdef, model.state, caches[name], tokens, positions, None, None,
                            execution=plan, table=table,
                        )  # fmt: skip
                        jax.block_until_ready(out)
                        if round_:
                            times[name].append(time.perf_counter() - start)
                        caches[name] = out[1]
            ratio, low, high = paired_ratio(times["per call"], times["once"])
            medians = [1e3 * np.median(times[name]) for name in steppers]
            print(f"| {batch} | {label} | {medians[0]:.2f} | {medians[1]:.2f} | {ratio:.3f} [{low:.3f}, {high:.3f}] |")


if __name__ == "__main__":
    main()
