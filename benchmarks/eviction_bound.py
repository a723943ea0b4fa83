"""How many expert reads can an eviction policy save? LRU, LFU and cost against Belady's offline optimum.

Issue 14 asks for prefetch + an eviction policy to decode >= 1.5x faster than on-demand LRU. Prefetch moves
reads off the critical path but reads no fewer bytes; only eviction changes how many experts are read. This
benchmark bounds what any eviction policy could give on the bundled model:

1. Greedy decode of held-out prompts (as `bench_offload.py`, no stop id), all experts resident; then each sequence's
   routing, teacher-forced over prompt + generated ids. A decode step of MoE layer l needs the union of its
   rows' top-k experts.
2. The device cache's eviction replayed on that trace, per layer, with S slots: `lru`, `lfu` and `cost`
   by a `CacheManager`'s own victim choice in its loop order (checked against real
   offloaded runs of the same prompts, host store, prefetch off), and Belady's rule (after each step keep
   the S experts needed soonest: the fewest reads any policy can make, prefetch included, on this trace).
3. Measured in the same run, rounds alternated: the decode step of the resident model, of on-demand LRU from
   the disk store and of prefetch + `cost` (the measured speed-up), and the disk store's read bandwidth.
   A step whose reads are all hidden behind compute is no shorter than max(resident step, bytes read /
   bandwidth). With LRU's reads that bounds perfect prefetch; with Belady's, prefetch + any eviction
   policy: each ceiling is the on-demand step over that.

    PYTHONPATH=. .venv/bin/python benchmarks/eviction_bound.py --json runs/eviction-bound.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import caee_jax
from caee_jax.api import BUNDLED_MODEL
from caee_jax.offload.cache import DECAY, CacheManager, Offload, slots_for
from caee_jax.offload.disk_store import DiskStore, write_disk_store
from caee_jax.offload.store import ExpertStore
from caee_jax.runtime import steps
from caee_jax.runtime.generate import PROMPT_BUCKET, encode_prompts
from caee_jax.stats import paired_ratio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_offload import decode, held_out_prompts, store_bandwidth  # noqa: E402

POLICIES = ("lru", "lfu", "cost", "belady")


def routing_trace(model: caee_jax.Model, prompts: list, generated: list[list[int]]) -> list[list[np.ndarray]]:
    """Per step (the prefill, then each decode step) and MoE layer: the sorted experts the step needs [n].
    The prefill routes the prompts right-padded to `generate`'s bucket, padding included, as `generate`
    does; decode step j routes each sequence's token j - 1 of its generated ids (teacher-forced)."""
    prompt_ids = encode_prompts(model, prompts)
    bucket = -(-max(len(ids) for ids in prompt_ids) // PROMPT_BUCKET) * PROMPT_BUCKET
    padded = np.zeros((len(prompt_ids), bucket), np.int32)
    for row, ids in enumerate(prompt_ids):
        padded[row, : len(ids)] = ids
    prefill = np.asarray(_routing(model, padded))  # [L, B, T, K]
    trace = [[np.unique(layer) for layer in prefill]]
    per_row = []  # (prompt length, [L, T, K]) per sequence, over prompt + generated ids
    for ids, new in zip(prompt_ids, generated, strict=True):
        tokens = np.asarray([list(ids) + new[:-1]], np.int32)  # the last generated id is never fed back
        per_row.append((len(ids), np.asarray(_routing(model, tokens))[:, 0]))
    decode_steps = len(generated[0]) - 1  # no stop id: every sequence generates every step
    for step in range(decode_steps):
        trace.append([np.unique([r[layer, p + step] for p, r in per_row]) for layer in range(len(prefill))])
    return trace


def _routing(model: caee_jax.Model, tokens: np.ndarray) -> jnp.ndarray:
    """tokens [B, T] -> top-k expert ids [L, B, T, K] of every MoE layer."""
    return steps.routing(model.graphdef, model.state, jnp.asarray(tokens), execution=model.execution)[0]


def replay(needs: list[np.ndarray], slots: int, config, policy: str) -> tuple[np.ndarray, np.ndarray]:
    """One MoE layer's steps `needs` (sorted expert ids per step) through an S-slot cache of a model of
    `config`, starting empty. Returns per step (misses [steps], reads [steps]): misses as the cache counts
    them (needed experts not resident when the step starts, or evicted by the step's own fetches before they
    ran), reads = experts fetched. lru/lfu/cost: a `CacheManager`'s own victim choice, in its order (announce
    loads misses into slots the step does not need, in increasing id; the loop fetches the rest as it
    reaches them), over a store that is never read; the use history is kept as the device keeps it
    (`offload/execute._record`). belady: after each step the cache keeps the S experts of
    (resident | needed) whose next use is soonest."""
    if policy == "belady":
        reads = _replay_belady(needs, slots)
        return reads, reads
    cache = CacheManager(ExpertStore(config, np.float32), slots, policy)
    layer = 0  # the manager's first layer stands for the one replayed
    misses, reads = np.zeros(len(needs), int), np.zeros(len(needs), int)
    for step, need in enumerate(needs):
        cache.needed[layer] = False
        cache.needed[layer, need] = True
        cache.last_use[layer, need] = step + 1
        cache.uses[layer, need] += 1
        cache.decayed[layer] *= DECAY
        cache.decayed[layer, need] += 1
        resident = cache.slot_of[layer, need] >= 0
        hits = set(need[resident].tolist())
        misses[step] = len(need) - len(hits)
        for expert in need[~resident]:  # announce: misses into slots the step does not need
            slot = cache._victim(layer, expert, upfront=True)
            if slot is None:
                break
            cache._assign(layer, expert, slot)
            reads[step] += 1
        for expert in need:  # the loop, in increasing id
            if cache.slot_of[layer, expert] < 0:
                cache._assign(layer, expert, cache._victim(layer, expert))
                reads[step] += 1
                misses[step] += int(expert) in hits  # a hit evicted by this step's own fetches
    return misses, reads


def _replay_belady(needs: list[np.ndarray], slots: int) -> np.ndarray:
    """Experts read per step [steps] when each step reads its non-resident experts once and then keeps the
    S experts of (resident | needed) needed again soonest: a lower bound on any policy's reads (a real cache
    with fewer slots than a step's experts reads some twice; reading ahead never reads fewer)."""
    next_use = []  # per step: expert -> the next step that needs it
    upcoming: dict[int, int] = {}
    for step in range(len(needs) - 1, -1, -1):
        next_use.append(dict(upcoming))
        upcoming.update({int(e): step for e in needs[step]})
    next_use.reverse()
    resident: set[int] = set()
    reads = np.zeros(len(needs), int)
    for step, need in enumerate(needs):
        need = {int(e) for e in need}
        reads[step] = len(need - resident)
        held = resident | need
        resident = set(sorted(held, key=lambda e: next_use[step].get(e, len(needs)))[:slots])
    return reads


def simulate(trace, slots: int, config) -> dict[str, dict]:
    """Per policy, over the decode steps after the first (as `bench_offload.decode` counts them; the prefill
    and the first step warm the cache): hit rate and experts read per step."""
    layers, counted = len(trace[0]), trace[2:]
    needed = sum(len(step[layer]) for step in counted for layer in range(layers))
    out = {}
    for policy in POLICIES:
        misses = reads = 0
        for layer in range(layers):
            m, r = replay([step[layer] for step in trace], slots, config, policy)
            misses, reads = misses + m[2:].sum(), reads + r[2:].sum()
        out[policy] = dict(hit_rate=1 - misses / needed, reads_per_step=reads / len(counted))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-chars", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds, the three steps alternated")
    parser.add_argument("--json", help="write every figure to this JSON file")
    parser.add_argument("--plot", help="write the speed-ups and their ceilings as a PNG here")
    args = parser.parse_args()

    resident = caee_jax.load()
    config = resident.config
    report = dict(setup=dict(vars(args), load_average=os.getloadavg()), rows=[])
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        directory = os.path.join(tmp, "store")
        write_disk_store(directory, config, resident.state, source=BUNDLED_MODEL)
        with DiskStore(directory, config, resident.dtype) as store:
            expert_bytes = store.expert_bytes
            slots = {fraction: slots_for(store, fraction=fraction) for fraction in args.fractions}
        for batch in args.batches:
            prompts = held_out_prompts(batch, args.prompt_chars)
            base = decode(resident, prompts, args.new_tokens, stop=())
            trace = routing_trace(resident, prompts, base["ids"])
            for fraction in args.fractions:
                sim = simulate(trace, slots[fraction], config)
                checks = {}
                for policy in ("lru", "lfu", "cost"):  # the simulator against the real cache, same prompts
                    offload = Offload(store="host", fraction=fraction, policy=policy, prefetch=False)
                    model = caee_jax.load(offload=offload)
                    run = decode(model, prompts, args.new_tokens, stop=())
                    assert run["ids"] == base["ids"], f"batch {batch}, {policy}: greedy ids differ from resident"
                    checks[policy] = run["stats"]["hit_rate"]
                timing = time_decode_steps(resident, prompts, args, directory, fraction)
                row = dict(batch=batch, fraction=fraction, slots=slots[fraction], decode_steps=len(trace) - 1)
                row |= dict(simulated=sim, measured_hit_rate=checks, **timing)
                for policy in ("lru", "belady"):  # every read hidden, with LRU's reads or Belady's
                    disk_s = sim[policy]["reads_per_step"] * expert_bytes / timing["store_read_bps"]
                    row[f"{policy}_disk_s"] = disk_s
                    row[f"ceiling_{policy}_reads"] = timing["on_demand_s"] / max(timing["resident_s"], disk_s)
                report["rows"].append(row)
                print_row(row)
    if args.plot:
        plot(report["rows"], args.plot)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, args.json)


def time_decode_steps(resident, prompts, args, directory: str, fraction: float) -> dict:
    """Median decode step of the resident model, of on-demand LRU from the disk store (prefetch off) and of
    pre-gating prefetch with the `cost` policy, alternated over rounds (order reversed every other round), the
    store's read bandwidth measured each round."""
    disk = dict(store="disk", directory=directory, fraction=fraction)
    models = dict(
        resident=resident,
        on_demand=caee_jax.load(offload=Offload(**disk, prefetch=False)),
        prefetch=caee_jax.load(offload=Offload(**disk, policy="cost", prefetch=True)),
    )
    times = {name: [] for name in models}
    bandwidth = []
    for round_ in tqdm(range(args.rounds), desc=f"timing batch {len(prompts)}, cache {fraction:.0%}", leave=False):
        bandwidth.append(store_bandwidth(directory, resident.config, resident.dtype))
        for name in models if round_ % 2 == 0 else list(models)[::-1]:
            times[name].append(decode(models[name], prompts, args.new_tokens, stop=())["step_s"])
    for name in ("on_demand", "prefetch"):
        models[name].execution.offload.store.close()
    t = {name: np.array(v) for name, v in times.items()}
    out = {f"{name}_s": float(np.median(v)) for name, v in t.items()}
    out["on_demand_over_resident"] = list(paired_ratio(t["resident"], t["on_demand"]))
    out["prefetch_speedup"] = list(paired_ratio(t["prefetch"], t["on_demand"]))  # on-demand step / prefetch step
    return out | dict(store_read_bps=float(np.median(bandwidth)))


def plot(rows: list[dict], path: str) -> None:
    """Per batch and cache size: prefetch + cost measured over on-demand LRU (95% CI), and the two ceilings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = np.arange(len(rows))
    measured = np.array([r["prefetch_speedup"] for r in rows])
    bars = [
        (measured[:, 0], "measured: prefetch + cost"),
        ([r["ceiling_lru_reads"] for r in rows], "ceiling: LRU's reads"),
        ([r["ceiling_belady_reads"] for r in rows], "ceiling: Belady's reads"),
    ]
    for i, (values, label) in enumerate(bars):
        ax.bar(x + (i - 1) * 0.27, values, 0.27, label=label)
    ax.errorbar(x - 0.27, measured[:, 0], yerr=[measured[:, 0] - measured[:, 1], measured[:, 2] - measured[:, 0]],
                fmt="none", color="black", capsize=3)  # fmt: skip
    ax.axhline(1.5, color="grey", linestyle="--", label="issue 14's aim (1.5x)")
    ax.set_xticks(x, [f"batch {r['batch']}\ncache {r['fraction']:.0%}" for r in rows])
    ax.set_ylabel("decode step: on-demand LRU / candidate")
    ax.set_title("Prefetch + eviction over on-demand LRU, disk store, bundled model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def print_row(row: dict) -> None:
    sim, real = row["simulated"], row["measured_hit_rate"]
    decode_steps = row["decode_steps"]
    print(f"\nbatch {row['batch']}, cache {row['fraction']:.0%} ({row['slots']} slots), {decode_steps} decode steps")
    print("| policy | hit rate (simulated) | hit rate (real cache) | experts read / step | reads vs lru |")
    print("|---|---|---|---|---|")
    lru = sim["lru"]["reads_per_step"]
    for policy in POLICIES:
        s = sim[policy]
        measured = f"{real[policy]:.3f}" if policy in real else "-"
        reads = s["reads_per_step"]
        print(f"| {policy} | {s['hit_rate']:.3f} | {measured} | {reads:.2f} | {reads / lru:.2f} |")
    ratio, low, high = row["on_demand_over_resident"]
    print(
        f"resident step {1e3 * row['resident_s']:.2f} ms; on-demand LRU (disk) {1e3 * row['on_demand_s']:.2f} ms "
        f"({ratio:.2f}x [{low:.2f}, {high:.2f}]); store reads {row['store_read_bps'] / 1e9:.2f} GB/s; "
        f"at that rate LRU's reads take {1e3 * row['lru_disk_s']:.2f} ms, Belady's {1e3 * row['belady_disk_s']:.2f} ms"
    )
    ratio, low, high = row["prefetch_speedup"]
    print(f"measured: prefetch + cost over on-demand LRU {ratio:.2f}x [{low:.2f}, {high:.2f}]")
    print(
        "ceiling over on-demand LRU, every read hidden behind compute: "
        f"{row['ceiling_lru_reads']:.2f}x with LRU's reads (perfect prefetch), "
        f"{row['ceiling_belady_reads']:.2f}x with Belady's (perfect prefetch and eviction)"
    )


if __name__ == "__main__":
    main()
