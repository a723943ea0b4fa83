"""Offloaded experts on the bundled model: tiers, cache sizes, prefetch and eviction policies, side by side.

Greedy decode (float32) of held-out text prompts (`heldout.txt` of the bundled model, one slice of
--prompt-chars characters per sequence), batch 1 and 16, for every configuration below. Each round runs
every configuration once, in an order reversed every other round; a configuration's figure for a round
is its median decode step (first step skipped). Reported: the median over rounds, the ratio to the
all-resident model with a bootstrap 95% interval over rounds (rounds resampled together), tokens/s,
and the cache statistics of the decode steps (hit rate, fetches and blocking fetches per step, bytes
read per step, prediction recall of pre-gating). Every offloaded run's greedy ids must equal the
resident run's (asserted).

    resident            every expert on the device
    host|disk N% lru    on-demand LRU (prefetch off): a layer's misses are read when the layer announces
                        them (disk: concurrently on the store's read pool) and wait in the loop
    disk 25% serial     on-demand LRU with no read-ahead at all: each miss read when the loop reaches it
    disk 25% pf+P       pre-gating prefetch of the next layer's predicted experts, eviction policy P

Each round also measures the disk store's own read bandwidth (every record of a layer through
`read_many`: O_DIRECT, CRC-32, its read pool), so the disk time a step's misses cost at that bandwidth
("disk floor") sits beside the step time.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_offload.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

import caee_jax
from caee_jax.api import BUNDLED_MODEL
from caee_jax.eval.offload_timeline import plot_timeline
from caee_jax.offload.cache import Offload, StepStats
from caee_jax.offload.disk_store import DiskStore, write_disk_store
from caee_jax.offload.store import ExpertStore
from caee_jax.stats import paired_ratio

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SerialReads(ExpertStore):
    """A disk store seen through `read` only: no read-ahead, each miss read when the loop reaches it."""

    def __init__(self, store: DiskStore):
        super().__init__(store.config, store.dtype)
        self.tier, self.inner = store.tier, store

    def read(self, layer, expert):
        return self.inner.read(layer, expert)


def configurations(directory: str) -> dict[str, Offload | None]:
    disk = dict(store="disk", directory=directory)
    configs: dict[str, Offload | None] = {"resident": None}
    for tier, where in (("host", dict(store="host")), ("disk", disk)):
        for fraction in (0.25, 0.5):
            configs[f"{tier} {fraction:.0%} lru"] = Offload(**where, fraction=fraction, prefetch=False)
    configs["disk 25% serial"] = Offload(**disk, fraction=0.25, prefetch=False)
    for policy in ("lru", "lfu", "cost"):
        configs[f"disk 25% pf+{policy}"] = Offload(**disk, fraction=0.25, policy=policy, prefetch=True)
    return configs


def load(name: str, offload: Offload | None) -> caee_jax.Model:
    model = caee_jax.load(offload=offload)
    if name.endswith("serial"):
        manager = model.execution.offload
        manager.store = SerialReads(manager.store)
    return model


def held_out_prompts(batch: int, chars: int) -> list[str]:
    """`batch` slices of `chars` characters of the bundled model's held-out text, spread over it."""
    with open(os.path.join(BUNDLED_MODEL, "heldout.txt")) as f:
        text = f.read()
    starts = np.linspace(0, len(text) - chars, batch, dtype=int)
    return [text[s : s + chars] for s in starts]


def decode(model: caee_jax.Model, prompts: list[str], new_tokens: int, stop=None) -> dict:
    """One greedy generation (stop: ids that end a sequence, default the model's eos): median step (s, first
    step skipped), ids, per-step stats (first step skipped)."""
    g = caee_jax.generate_with_stats(model, prompts, max_new_tokens=new_tokens, stop=stop)
    steps = g.decode_offload[1:]
    total = StepStats.total(steps)
    n = max(len(steps), 1)
    per_step = {k: getattr(total, k) / n for k in ("fetches", "blocking_fetches", "prefetched_fetches", "bytes_read")}
    stats = dict(hit_rate=total.hit_rate, prediction_recall=total.prediction_recall, **per_step) if steps else {}
    return dict(step_s=g.decode_s_per_token, ids=g.tokens, stats=stats, steps=steps, step_times=g.decode_step_s[1:])


def store_bandwidth(directory: str, config, dtype) -> float:
    """Bytes/s of the disk store's own reads: every record of every layer through `read_many`."""
    with DiskStore(directory, config, dtype) as store:
        start = time.perf_counter()
        for layer in range(config.num_moe_layers):
            store.read_many(layer, range(config.n_routed_experts))
        seconds = time.perf_counter() - start
        return config.num_moe_layers * config.n_routed_experts * store.expert_bytes / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-chars", type=int, default=400)
    parser.add_argument("--json", help="write every figure to this JSON file")
    parser.add_argument("--plot-dir", default=os.path.join(HERE, "docs", "figures"), help="timeline plots (batch 16)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        directory = os.path.join(tmp, "store")
        resident = caee_jax.load()
        write_disk_store(directory, resident.config, resident.state, source=BUNDLED_MODEL)
        config, dtype = resident.config, resident.dtype
        del resident
        models = {name: load(name, offload) for name, offload in configurations(directory).items()}
        names = list(models)
        runs = {(b, name): [] for b in args.batches for name in names}
        bandwidth = []
        for round_ in range(args.rounds):
            bandwidth.append(store_bandwidth(directory, config, dtype))
            for batch in args.batches:
                prompts = held_out_prompts(batch, args.prompt_chars)
                for name in names if round_ % 2 == 0 else names[::-1]:
                    runs[(batch, name)].append(decode(models[name], prompts, args.new_tokens))
            print(f"round {round_ + 1}/{args.rounds}, store reads {bandwidth[-1] / 1e9:.2f} GB/s", file=sys.stderr)
        for model in models.values():
            if model.execution.offload is not None:
                model.execution.offload.store.close()

    bw = float(np.median(bandwidth))
    report = dict(
        setup=dict(vars(args), load_average=os.getloadavg(), store_read_gbps=[b / 1e9 for b in bandwidth]), rows=[]
    )
    print(f"\nstore read bandwidth (O_DIRECT, CRC, 2-thread pool): median {bw / 1e9:.2f} GB/s over rounds")
    for batch in args.batches:
        base_runs = runs[(batch, "resident")]
        base = np.array([r["step_s"] for r in base_runs])
        print(f"\nbatch {batch}, {args.new_tokens} new tokens, {args.rounds} rounds")
        print(
            "| config | step ms | / resident (95% CI) | tokens/s | hit rate | fetches/step | blocking/step "
            "| MB read/step | disk floor ms | recall |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name in names:
            rs = runs[(batch, name)]
            assert all(r["ids"] == base_runs[0]["ids"] for r in rs), f"batch {batch} {name}: greedy ids differ"
            t = np.array([r["step_s"] for r in rs])
            ratio, low, high = paired_ratio(base, t)
            s = rs[-1]["stats"]
            row = dict(batch=batch, config=name, step_ms=1e3 * float(np.median(t)), ratio=ratio, ci=[low, high])
            row |= dict(tokens_per_s=batch / float(np.median(t)), stats=s, step_ms_rounds=(1e3 * t).tolist())
            report["rows"].append(row)
            cells = ["-"] * 6
            if s:
                floor = 1e3 * s["bytes_read"] / bw
                cells = [f"{s['hit_rate']:.3f}", f"{s['fetches']:.1f}", f"{s['blocking_fetches']:.1f}",
                         f"{s['bytes_read'] / 1e6:.1f}", f"{floor:.1f}", f"{s['prediction_recall']:.2f}"]  # fmt: skip
            print(f"| {name} | {row['step_ms']:.2f} | {ratio:.2f} [{low:.2f}, {high:.2f}] | "
                  f"{row['tokens_per_s']:.0f} | " + " | ".join(cells) + " |")  # fmt: skip
        lru = np.array([r["step_s"] for r in runs[(batch, "disk 25% lru")]])
        serial = np.array([r["step_s"] for r in runs[(batch, "disk 25% serial")]])
        for policy in ("lru", "lfu", "cost"):
            pf = np.array([r["step_s"] for r in runs[(batch, f"disk 25% pf+{policy}")]])
            for base_name, b in (("on-demand lru", lru), ("serial on-demand", serial)):
                ratio, low, high = paired_ratio(pf, b)
                print(f"speed-up of pf+{policy} over {base_name}: {ratio:.2f}x [{low:.2f}, {high:.2f}]")
        if batch == max(args.batches):
            for name in ("disk 25% lru", "disk 25% pf+cost"):
                last = runs[(batch, name)][-1]
                tag = name.split()[-1].replace("+", "_")
                path = os.path.join(args.plot_dir, f"offload_timeline_b{batch}_{tag}.png")
                plot_timeline(last["steps"], last["step_times"], path, f"bundled model, {name}, batch {batch}")
                print(f"timeline: {path}")
    print("\ngreedy ids identical to the resident model's in every run: True")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
