"""The `loop` expert backend's cost follows the active experts.

A decode-like MoE call (16 tokens, 64 experts, top-k 8, hidden 512, expert width 512: reading expert
weights dominates) runs through a jitted `run_experts` with backend "loop" while whole experts are
pruned: all / 1/2 / 1/4 / 1/8 of the experts stay active and every pair routed to a removed expert is
dropped through `keep_mask`. The "dense" backend (all experts on all tokens) is the reference row.
Routing is balanced (each expert receives N*K/E pairs), so the expected time ratio vs all-active is
the fraction of active experts. Cases alternate in rounds (each round times every case once, in a
shuffled order); medians over rounds are reported, and the ratio is the median of per-round ratios.

    .venv/bin/python benchmarks/bench_loop_backend.py            # defaults, about 20 seconds
    .venv/bin/python benchmarks/bench_loop_backend.py --json     # one JSON object instead of a table
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from caee_jax import ExpertBackend, ExpertWeights, run_experts

FRACTIONS = (1.0, 0.5, 0.25, 0.125)


def balanced_routing(rng, tokens: int, experts: int, k: int) -> np.ndarray:
    """topk_ids [N, K]: pair p = t*K + j goes to perms[p // E][p % E]; distinct per token when E % K == 0."""
    if experts % k:
        raise SystemExit(f"--experts ({experts}) must be a multiple of --top-k ({k}) for balanced routing")
    perms = np.stack([rng.permutation(experts) for _ in range(-(-tokens * k // experts))])
    flat = np.arange(tokens * k)
    return perms[flat // experts, flat % experts].reshape(tokens, k).astype(np.int32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--moe-intermediate", type=int, default=512)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--rounds", type=int, default=60, help="timed rounds (every case once per round)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object of results")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    dtype = jnp.dtype(args.dtype)
    d, f, e, k, n = args.hidden, args.moe_intermediate, args.experts, args.top_k, args.tokens
    keys = jax.random.split(jax.random.key(args.seed), 4)
    x = jax.random.normal(keys[0], (n, d), jnp.float32).astype(dtype)
    weights = ExpertWeights(
        *(
            0.02 * jax.random.normal(key, shape, jnp.float32).astype(dtype)
            for key, shape in zip(keys[1:], [(e, d, f), (e, d, f), (e, f, d)], strict=True)
        )
    )
    topk_ids = balanced_routing(rng, n, e, k)
    topk_weights = jnp.asarray(rng.uniform(0.1, 1.0, (n, k)), jnp.float32)

    # Prune whole experts: keep the first `fraction` of a random expert order.
    expert_order = rng.permutation(e)
    cases = {}  # name -> (backend, keep_mask, expected ratio)
    for fraction in FRACTIONS:
        kept = expert_order[: max(1, round(fraction * e))]
        keep = np.isin(topk_ids, kept)
        active = len(np.unique(topk_ids[keep]))
        cases[f"loop {active}/{e} experts"] = ("loop", jnp.asarray(keep), active)
    cases["dense (all experts)"] = ("dense", jnp.ones((n, k), bool), None)
    all_active = next(iter(cases.values()))[2]
    baseline = next(iter(cases))

    fn = jax.jit(run_experts, static_argnames="backend")
    ids = jnp.asarray(topk_ids)
    tolerance = 1e-4 if dtype == jnp.float32 else 3e-2
    for name, (backend, keep, _) in cases.items():
        for _ in range(args.warmup):
            out = fn(x, ids, topk_weights, keep, weights, backend=ExpertBackend(backend)).block_until_ready()
        if backend == "loop":  # sanity: the loop agrees with dense under the same keep mask
            dense = np.asarray(fn(x, ids, topk_weights, keep, weights, backend=ExpertBackend.DENSE), np.float32)
            error = np.abs(np.asarray(out, np.float32) - dense).max() / np.abs(dense).max()
            assert error < tolerance, f"{name}: loop and dense differ (relative error {error:.2e})"

    times = {name: [] for name in cases}
    names = list(cases)
    for _ in range(args.rounds):
        for name in rng.permutation(names):
            backend, keep, _ = cases[name]
            start = time.perf_counter()
            fn(x, ids, topk_weights, keep, weights, backend=ExpertBackend(backend)).block_until_ready()
            times[name].append(time.perf_counter() - start)

    base = np.asarray(times[baseline])
    rows = []
    for name, (backend, keep, active) in cases.items():
        t = np.asarray(times[name])
        rows.append(
            dict(
                case=name,
                backend=backend,
                active_experts=active if active is not None else e,
                kept_pairs=int(np.asarray(keep).sum()),
                median_ms=1e3 * float(np.median(t)),
                p10_ms=1e3 * float(np.percentile(t, 10)),
                p90_ms=1e3 * float(np.percentile(t, 90)),
                ratio_vs_all_active=float(np.median(t / base)),
                expected_ratio=None if active is None else active / all_active,
            )
        )
    weight_mb = 3 * e * d * f * dtype.itemsize / 2**20
    setup = dict(
        hidden=d,
        moe_intermediate=f,
        experts=e,
        top_k=k,
        tokens=n,
        dtype=args.dtype,
        rounds=args.rounds,
        expert_weights_mib=weight_mb,
        load_average=os.getloadavg()[0],
        jax=jax.__version__,
        device=str(jax.devices()[0]),
    )
    if args.json:
        print(json.dumps(dict(setup=setup, results=rows), indent=2))
        return
    print(
        f"run_experts: N={n} tokens, E={e}, K={k}, D={d}, F={f}, {args.dtype}, expert weights {weight_mb:.0f} MiB, "
        f"{args.rounds} rounds, jax {jax.__version__} on {setup['device']}, load average {setup['load_average']:.2f}"
    )
    print(f"{'case':<24}{'pairs':>6}{'median ms':>11}{'p10':>8}{'p90':>8}{'ratio':>8}{'expected':>10}")
    for r in rows:
        expected = "-" if r["expected_ratio"] is None else f"{r['expected_ratio']:.3f}"
        print(
            f"{r['case']:<24}{r['kept_pairs']:>6}{r['median_ms']:>11.3f}{r['p10_ms']:>8.3f}{r['p90_ms']:>8.3f}"
            f"{r['ratio_vs_all_active']:>8.3f}{expected:>10}"
        )


if __name__ == "__main__":
    main()
