"""Pallas expert kernel vs `dense` vs `jax.lax.ragged_dot` as whole experts are pruned (run on a GPU or TPU).

A decode-like MoE call (default: 64 tokens, 64 experts, top-k 8, hidden 2048, expert width 1024, bf16):
reading expert weights dominates. All / 1/2 / 1/4 / 1/8 of the experts stay active, every pair routed to a
removed expert is dropped through `keep_mask`, and for each level three implementations run:

  pallas      run_experts(backend="pallas"): a pruned expert's weights are never loaded
  ragged_dot  the same sorted rows through three `lax.ragged_dot` calls (group sizes: pruned experts get 0)
  dense       every expert on every token (reference; one row, its cost does not depend on pruning)

Cases alternate in rounds (every case once per round, shuffled); medians over rounds are reported, ratios
are medians of per-round ratios ("vs all": against pallas with every expert active; "/ragged": pallas time
over ragged_dot time at the same pruning level). "weight GB/s" (pallas rows) divides the weight bytes the
kernel must read (active experts x 3 x D x F x itemsize) by its time: near the device's HBM bandwidth means
weight-bound.
Each case is first checked against `dense` under the same keep mask.

    python benchmarks/bench_pallas_gpu.py                     # on a GPU/TPU machine
    python benchmarks/bench_pallas_gpu.py --tokens 512 --json # one JSON object instead of a table

On a CPU-only machine it says so and runs a tiny interpret-mode smoke run (checks only; times meaningless).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_loop_backend import balanced_routing  # a sibling script: benchmarks/ is sys.path[0]

from caee_jax import ExpertBackend, ExpertWeights, run_experts
from caee_jax.pallas import default_blocks, run_pallas
from caee_jax.routing.ops import expert_groups

FRACTIONS = (1.0, 0.5, 0.25, 0.125)
TINY = dict(hidden=64, moe_intermediate=32, experts=8, top_k=2, tokens=8, rounds=2, warmup=1)


def run_ragged_dot(x, topk_ids, topk_weights, keep_mask, weights):
    """The same computation through lax.ragged_dot over expert-sorted rows: x [N, D] -> [N, D]."""
    num_experts, k = weights.gate.shape[0], topk_ids.shape[1]
    order, counts, _ = expert_groups(topk_ids, keep_mask, num_experts)
    token = order // k
    kept = jnp.arange(order.shape[0]) < jnp.sum(counts)
    xs = jnp.where(kept[:, None], x[token], 0).astype(x.dtype)
    sizes = counts.astype(jnp.int32)
    dot = functools.partial(jax.lax.ragged_dot, group_sizes=sizes, preferred_element_type=jnp.float32)
    hidden = (jax.nn.silu(dot(xs, weights.gate)) * dot(xs, weights.up)).astype(x.dtype)
    out = dot(hidden, weights.down)
    row_weight = jnp.where(keep_mask, topk_weights, 0).reshape(-1)[order].astype(jnp.float32)
    contribution = jnp.where(kept[:, None], out * row_weight[:, None], 0.0)
    return jnp.zeros(x.shape, jnp.float32).at[token].add(contribution).astype(x.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--moe-intermediate", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--block-m", type=int, default=None, help="rows per tile (default: per platform)")
    parser.add_argument("--block-f", type=int, default=None, help="F columns per block (default: per platform)")
    parser.add_argument("--block-d", type=int, default=None, help="D columns per block (default: per platform)")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (every case once per round)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object of results")
    args = parser.parse_args()

    platform = jax.default_backend()
    interpret = platform == "cpu"
    if interpret:
        print(
            "No GPU/TPU here: Pallas kernels only run in interpret mode on CPU. Running a tiny interpret-mode "
            "smoke run instead (checks the three implementations agree; its times mean nothing)."
        )
        for key, value in TINY.items():
            setattr(args, key, value)

    rng = np.random.default_rng(args.seed)
    dtype = jnp.dtype(args.dtype)
    d, f, e, k, n = args.hidden, args.moe_intermediate, args.experts, args.top_k, args.tokens
    keys = jax.random.split(jax.random.key(args.seed), 4)
    x = jax.random.normal(keys[0], (n, d), jnp.float32).astype(dtype)
    shapes = [(e, d, f), (e, d, f), (e, f, d)]
    weights = ExpertWeights(
        *(0.02 * jax.random.normal(key, s, jnp.float32).astype(dtype) for key, s in zip(keys[1:], shapes, strict=True))
    )
    topk_ids = jnp.asarray(balanced_routing(rng, n, e, k))
    topk_weights = jnp.asarray(rng.uniform(0.1, 1.0, (n, k)), jnp.float32)
    blocks = dict(block_m=args.block_m, block_f=args.block_f, block_d=args.block_d)
    pallas = jax.jit(functools.partial(run_pallas, interpret=interpret, **blocks))
    ragged = jax.jit(run_ragged_dot)
    dense = jax.jit(functools.partial(run_experts, backend=ExpertBackend.DENSE))
    kernel_platform = "gpu" if platform in ("gpu", "cuda", "rocm") else "tpu"
    resolved = default_blocks(kernel_platform, n * k, e, d, f, dtype)
    resolved = tuple(b or r for b, r in zip(blocks.values(), resolved, strict=True))

    # Prune whole experts: keep the first `fraction` of a random expert order.
    expert_order = rng.permutation(e)
    cases = {}  # name -> (function, keep_mask, active experts)
    for fraction in FRACTIONS:
        kept = expert_order[: max(1, round(fraction * e))]
        keep = jnp.asarray(np.isin(np.asarray(topk_ids), kept))
        active = len(np.unique(np.asarray(topk_ids)[np.asarray(keep)]))
        cases[f"pallas {active}/{e}"] = ("pallas", pallas, keep, active)
        cases[f"ragged_dot {active}/{e}"] = ("ragged_dot", ragged, keep, active)
    cases["dense (all experts)"] = ("dense", dense, jnp.ones((n, k), bool), e)

    tolerance = 1e-4 if dtype == jnp.float32 else 3e-2
    for name, (_, fn, keep, _) in cases.items():
        for _ in range(args.warmup):
            out = fn(x, topk_ids, topk_weights, keep, weights).block_until_ready()
        reference = np.asarray(dense(x, topk_ids, topk_weights, keep, weights), np.float32)
        error = np.abs(np.asarray(out, np.float32) - reference).max() / max(np.abs(reference).max(), 1e-30)
        assert error < tolerance, f"{name}: differs from dense under the same keep mask (relative error {error:.2e})"

    times = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name in rng.permutation(list(cases)):
            _, fn, keep, _ = cases[name]
            start = time.perf_counter()
            fn(x, topk_ids, topk_weights, keep, weights).block_until_ready()
            times[name].append(time.perf_counter() - start)

    baseline = np.asarray(times[next(iter(cases))])  # pallas with every routed expert active
    rows = []
    for name, (kind, _, keep, active) in cases.items():
        t = np.asarray(times[name])
        partner = name.replace("pallas", "ragged_dot") if kind == "pallas" else None
        weight_bytes = active * 3 * d * f * dtype.itemsize
        rows.append(
            dict(
                case=name,
                kind=kind,
                active_experts=active,
                kept_pairs=int(np.asarray(keep).sum()),
                median_ms=1e3 * float(np.median(t)),
                p10_ms=1e3 * float(np.percentile(t, 10)),
                p90_ms=1e3 * float(np.percentile(t, 90)),
                ratio_vs_pallas_all_active=float(np.median(t / baseline)),
                pallas_over_ragged_dot=None if partner is None else float(np.median(t / np.asarray(times[partner]))),
                weight_gb_per_s=weight_bytes / float(np.median(t)) / 1e9 if kind == "pallas" else None,
            )
        )
    setup = dict(
        hidden=d,
        moe_intermediate=f,
        experts=e,
        top_k=k,
        tokens=n,
        dtype=args.dtype,
        blocks=dict(zip(("block_m", "block_f", "block_d"), resolved, strict=True)),
        rounds=args.rounds,
        interpret=interpret,
        expert_weights_mib=3 * e * d * f * dtype.itemsize / 2**20,
        load_average=os.getloadavg()[0],
        jax=jax.__version__,
        device=str(jax.devices()[0]),
    )
    if args.json:
        print(json.dumps(dict(setup=setup, results=rows), indent=2))
        return
    print(
        f"run_experts: N={n}, E={e}, K={k}, D={d}, F={f}, {args.dtype}, blocks {setup['blocks']}, expert weights "
        f"{setup['expert_weights_mib']:.0f} MiB, {args.rounds} rounds, jax {jax.__version__} on {setup['device']}"
    )
    header = f"{'case':<22}{'pairs':>6}{'median ms':>11}{'p10':>8}{'p90':>8}{'vs all':>8}{'/ragged':>9}"
    print(f"{header}{'weight GB/s':>13}")
    for r in rows:
        vs_ragged = "-" if r["pallas_over_ragged_dot"] is None else f"{r['pallas_over_ragged_dot']:.3f}"
        bandwidth = "-" if r["weight_gb_per_s"] is None else f"{r['weight_gb_per_s']:.1f}"
        print(
            f"{r['case']:<22}{r['kept_pairs']:>6}{r['median_ms']:>11.3f}{r['p10_ms']:>8.3f}{r['p90_ms']:>8.3f}"
            f"{r['ratio_vs_pallas_all_active']:>8.3f}{vs_ragged:>9}{bandwidth:>13}"
        )
    if interpret:
        print("(interpret mode on CPU: the implementations agree; the times above are not kernel timings)")


if __name__ == "__main__":
    main()
