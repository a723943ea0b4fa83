"""bf16 decode step with and without XLA's while-loop-invariant code motion, beside float32.

XLA:CPU upcasts bf16 dot operands to f32; with code motion on (plain `jax.jit`) the conversion of every
whole weight stack is hoisted out of the layer/expert loops and runs on every step. `runtime/steps.py`
compiles the steps without that pass on CPU (`step_jit`). This runs the bundled model's decode step
compiled four ways (bf16 and f32, each with plain jit and step_jit) at batch 1 and 16, alternating
the four within each round, and prints medians (ms) and ratios of medians with bootstrap 95% intervals.

    .venv/bin/python benchmarks/bench_bf16_decode.py --rounds 30
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import caee_jax
from caee_jax.model.cache import LatentCache
from caee_jax.runtime import steps
from caee_jax.stats import paired_ratio

CACHE_LEN = 128


def compiled_step(model, batch: int, jitted):
    """A function running one decode step (fresh cache, position 40) and returning its seconds."""
    tokens, positions = jnp.full(batch, 7, jnp.int32), jnp.full(batch, 40, jnp.int32)
    scalars = (np.uint32(0), np.int32(1), np.float32(0), np.float32(1))

    def cache():
        return LatentCache.zeros(model.config, batch, CACHE_LEN, model.dtype)

    step = jitted.lower(
        model.graphdef, model.state, cache(), tokens, positions, *scalars, None, execution=model.execution
    ).compile()

    def run() -> float:
        fresh = cache()
        jax.block_until_ready(fresh)
        start = time.perf_counter()
        jax.block_until_ready(step(model.state, fresh, tokens, positions, *scalars, None))
        return time.perf_counter() - start

    run()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batches", default="1,16")
    args = parser.parse_args()
    models = {dtype: caee_jax.load(dtype=dtype) for dtype in ("bfloat16", "float32")}
    plain = jax.jit(
        steps.decode_step.__wrapped__, static_argnames=("graphdef", "execution"), donate_argnames=("cache",)
    )
    for batch in [int(b) for b in args.batches.split(",")]:
        runs = {
            "bf16 plain jit": compiled_step(models["bfloat16"], batch, plain),
            "bf16 step_jit": compiled_step(models["bfloat16"], batch, steps.decode_step),
            "f32 plain jit": compiled_step(models["float32"], batch, plain),
            "f32 step_jit": compiled_step(models["float32"], batch, steps.decode_step),
        }
        times = {name: [] for name in runs}
        for round_ in range(args.rounds):
            order = list(runs) if round_ % 2 == 0 else list(runs)[::-1]
            for name in order:
                times[name].append(runs[name]())
        times = {name: np.array(t) for name, t in times.items()}
        print(
            f"batch {batch}, {args.rounds} rounds: "
            + ", ".join(f"{n} {1e3 * np.median(t):.2f} ms" for n, t in times.items())
        )
        pairs = (
            ("bf16 plain jit", "bf16 step_jit"),
            ("f32 plain jit", "f32 step_jit"),
            ("f32 step_jit", "bf16 step_jit"),
        )
        for base, cand in pairs:
            ratio, low, high = paired_ratio(times[base], times[cand])
            print(f"  {cand} / {base}: {ratio:.3f} [{low:.3f}, {high:.3f}]")


if __name__ == "__main__":
    main()
