"""Routed experts stored as float32, bf16 and fp8 (block-scaled), side by side: the MoE layer's routed
experts alone, on a stack larger than the last-level cache, and the bundled model's whole decode step.

layer   `run_experts` (loop backend, layer_index into a [L, E, D, F] stack; L layers visited in turn so a
        call never finds the previous call's experts in cache) at each batch, routing drawn once (top-k of
        random scores). Bytes read = the active experts' weights (+ fp8 scales); GB/s against this
        machine's read bandwidth, measured the same way (a jitted sum over a 1 GiB float32 array).
decode  one decode step of the bundled model loaded with each storage (compute float32).

Every round runs the three storages in an order reversed every other round; medians (ms), ratio of
medians f32 / storage (speed-up) with a bootstrap 95% interval.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_expert_storage.py --rounds 30
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_bf16_decode import compiled_step  # benchmarks/ is on sys.path when a script runs

import caee_jax
from caee_jax.experts import ExpertBackend, ExpertWeights, run_experts
from caee_jax.routing.storage import block_quantize
from caee_jax.runtime import steps
from caee_jax.stats import paired_ratio

STORAGES = ("f32", "bf16", "fp8")


def read_bandwidth(gib: float = 1.0, rounds: int = 10) -> float:
    """Bytes/s of a jitted float32 sum over `gib` GiB (median of rounds)."""
    a = jnp.ones(int(gib * 2**30) // 4, jnp.float32)
    total = jax.jit(jnp.sum)
    total(a).block_until_ready()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        total(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return a.nbytes / float(np.median(times))


def stacks(layers: int, experts: int, dim: int, width: int):
    """{storage: (ExpertWeights [L, E, ...], scales or None)} of the same random float32 experts."""
    rng = np.random.default_rng(0)
    shapes = ((layers, experts, dim, width), (layers, experts, dim, width), (layers, experts, width, dim))
    f32 = ExpertWeights(*(jnp.asarray(rng.normal(0, 0.02, s).astype(np.float32)) for s in shapes))
    quantised = [block_quantize(w) for w in f32]
    return {
        "f32": (f32, None),
        "bf16": (ExpertWeights(*(w.astype(jnp.bfloat16) for w in f32)), None),
        "fp8": (ExpertWeights(*(q for q, _ in quantised)), ExpertWeights(*(s for _, s in quantised))),
    }


def layer_runs(weights_by_storage, batch: int, top_k: int):
    """{storage: run() -> seconds} for one call of the routed experts at `batch` tokens, and the bytes
    each call reads per storage."""
    layers, experts, dim, _ = weights_by_storage["f32"][0].gate.shape
    rng = np.random.default_rng(batch)
    x = jnp.asarray(rng.normal(size=(batch, dim)).astype(np.float32))
    ids = jnp.asarray(np.argsort(rng.normal(size=(batch, experts)), axis=1)[:, :top_k].astype(np.int32))
    gates, keep = jnp.full(ids.shape, 1.0 / top_k), jnp.ones(ids.shape, bool)
    active = len(np.unique(np.asarray(ids)))
    jitted = jax.jit(
        lambda x, w, s, layer: run_experts(x, ids, gates, keep, w, ExpertBackend.LOOP, layer_index=layer, scales=s),
        compiler_options=steps.CPU_COMPILER_OPTIONS,
    )
    runs, nbytes = {}, {}
    for storage, (weights, scales) in weights_by_storage.items():
        compiled = jitted.lower(x, weights, scales, jnp.int32(0)).compile()
        per_expert = sum(w[0, 0].nbytes for w in weights) + (
            0 if scales is None else sum(s[0, 0].nbytes for s in scales)
        )
        nbytes[storage] = active * per_expert
        state = {"layer": 0}

        def run(compiled=compiled, weights=weights, scales=scales, state=state) -> float:
            state["layer"] = (state["layer"] + 1) % layers
            layer = jnp.int32(state["layer"])
            start = time.perf_counter()
            compiled(x, weights, scales, layer).block_until_ready()
            return time.perf_counter() - start

        run()
        runs[storage] = run
    return runs, nbytes, active


def alternate(runs: dict, rounds: int) -> dict[str, np.ndarray]:
    times = {name: [] for name in runs}
    for round_ in range(rounds):
        for name in list(runs) if round_ % 2 == 0 else list(runs)[::-1]:
            times[name].append(runs[name]())
    return {name: np.array(t) for name, t in times.items()}


def report(label: str, times: dict[str, np.ndarray], nbytes=None, bandwidth=None) -> None:
    for storage, t in times.items():
        line = f"{label} {storage:4s} {1e3 * np.median(t):8.2f} ms"
        if storage != "f32":
            ratio, low, high = paired_ratio(t, times["f32"])  # f32 / storage: the speed-up
            line += f"  speed-up vs f32 {ratio:.2f}x [{low:.2f}, {high:.2f}]"
        if nbytes is not None:
            rate = nbytes[storage] / np.median(t)
            share = 100 * rate / bandwidth
            line += f"  {nbytes[storage] / 2**20:.1f} MiB read, {rate / 1e9:.2f} GB/s = {share:.0f}% of read bw"
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--parts", default="layer,decode")
    parser.add_argument("--layer-shape", default="4,64,1024,512", help="L,E,D,F of the layer part's stack")
    parser.add_argument("--top-k", type=int, default=6)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    parts = args.parts.split(",")
    if "layer" in parts:
        bandwidth = read_bandwidth()
        print(f"read bandwidth (jitted f32 sum over 1 GiB): {bandwidth / 1e9:.2f} GB/s", flush=True)
        weights = stacks(*(int(n) for n in args.layer_shape.split(",")))
        for batch in batches:
            runs, nbytes, active = layer_runs(weights, batch, args.top_k)
            label = f"layer L,E,D,F={args.layer_shape} batch {batch:2d} ({active} active experts)"
            report(label, alternate(runs, args.rounds), nbytes, bandwidth)
    if "decode" in parts:
        models = {storage: caee_jax.load(weights=storage) for storage in STORAGES}
        for batch in batches:
            runs = {storage: compiled_step(model, batch, steps.decode_step) for storage, model in models.items()}
            report(f"decode step bundled model batch {batch:2d}", alternate(runs, args.rounds))


if __name__ == "__main__":
    main()
