"""A DeepSeek-architecture model whose routed experts do not fit in RAM, decoded from a disk expert store.

DeepSeek-V2-Lite dimensions with random weights: 27 layers (the first dense, 26 MoE), 64 routed experts
top-6, 2 shared, hidden 2048, expert width 1408, 16 heads, MLA without q LoRA (kv_lora_rank 512, qk_nope
128, qk_rope 64, v_head 128), vocabulary reduced to 32k; bfloat16. Routing is DeepSeek-V3's (sigmoid,
no group limit), not V2-Lite's softmax. The routed experts, 3 x 2048 x 1408 x 2 B = 17.3 MB each,
1664 of them = 28.8 GB, are generated one layer at a time (random bf16: uniform sign and mantissa,
|w| in [2^-7, 2^-6)) and written as a disk store; the model is built without them
(`init_random(..., offload=disk)`), so no process ever holds them all.

Two decodes, each in a fresh process (so peak RSS is its own) started with the store's pages dropped
from the page cache (posix_fadvise DONTNEED), same greedy prompt, same cache budget (--cache slots per
layer as a fraction):
  direct   the disk store (O_DIRECT, CRC-32, read pool) behind the device cache, prefetch on
  mmap     the same cache filled from a numpy memmap of the same record file (the page cache decides)
Each process first measures the disk's O_DIRECT read bandwidth on random records with the store's read
pool; the roofline of a step is (bytes it missed) / bandwidth. The store is removed at the end.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_offload_big.py --dir /var/tmp/big-store
    PYTHONPATH=. .venv/bin/python benchmarks/bench_offload_big.py --dir /var/tmp/big-store --layers 3  # quick
    ... --keep, then --stores direct --no-prefetch (on-demand reads only) or --policy lfu|cost on the same store
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

import caee_jax
from caee_jax.config import ModelConfig
from caee_jax.offload.cache import Offload
from caee_jax.offload.disk_store import RECORDS, DiskStore, record_bytes, write_disk_store
from caee_jax.offload.store import ExpertStore
from caee_jax.routing.backend import ExpertWeights

MAGNITUDE_BITS = 0x3C00  # bf16 exponent field of 2^-7


def v2_lite(layers: int) -> ModelConfig:
    """DeepSeek-V2-Lite's dimensions with `layers` MoE layers after one dense layer."""
    return ModelConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=layers + 1,
        num_attention_heads=16,
        num_key_value_heads=16,
        n_shared_experts=2,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
        first_k_dense_replace=1,
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        max_position_embeddings=4096,
        rope_scaling=None,
    )


class RandomStack:
    """One random bf16 expert stack [L, E, A, B], built one layer [E, A, B] at a time (`stack[layer]`)."""

    def __init__(self, shape: tuple[int, ...], seed: int):
        self.shape, self.dtype, self.seed = shape, np.dtype(ml_dtypes.bfloat16), seed

    def __getitem__(self, layer: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, layer))
        size = int(np.prod(self.shape[1:]))
        bits = np.frombuffer(rng.bytes(2 * size), np.uint16).reshape(self.shape[1:])
        return ((bits & 0x807F) | MAGNITUDE_BITS).view(self.dtype)  # random sign and mantissa


class MemmapStore(ExpertStore):
    """The records of a disk store through a numpy memmap: the page cache does the reading and caching."""

    tier = "disk"

    def __init__(self, directory: str, config: ModelConfig, dtype):
        super().__init__(config, dtype)
        self.record = record_bytes(config, dtype)
        self.map = np.memmap(os.path.join(directory, RECORDS), np.uint8, "r")

    def read(self, layer: int, expert: int) -> ExpertWeights:
        d, f = self.config.hidden_size, self.config.moe_intermediate_size
        start = (layer * self.config.n_routed_experts + expert) * self.record
        flat = self.map[start : start + self.expert_bytes].view(self.dtype)
        return ExpertWeights(
            flat[: d * f].reshape(d, f), flat[d * f : 2 * d * f].reshape(d, f), flat[2 * d * f :].reshape(f, d)
        )


def drop_page_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def memory_kib() -> dict:
    """VmHWM (peak RSS), VmRSS, RssAnon, RssFile of this process, KiB."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}


def read_bandwidth(store: DiskStore, samples: int, seed: int) -> float:
    """Bytes/s of O_DIRECT reads of `samples` random records through the store's read pool."""
    rng = np.random.default_rng(seed)
    config = store.config
    picks = rng.choice(config.num_moe_layers * config.n_routed_experts, samples, replace=False)
    start = time.perf_counter()
    for layer in np.unique(picks // config.n_routed_experts):
        store.read_many(
            int(layer), [int(i % config.n_routed_experts) for i in picks if i // config.n_routed_experts == layer]
        )
    return samples * store.expert_bytes / (time.perf_counter() - start)


def child(args: argparse.Namespace) -> None:
    """One decode (`args.child`: direct or mmap); prints one JSON line."""
    config = v2_lite(args.layers)
    budget = dict(fraction=args.cache, policy=args.policy, prefetch=args.prefetch)
    offload = Offload(store="disk", directory=args.dir, dtype="bfloat16", **budget)
    model = caee_jax.init_random(config, dtype="float32", offload=offload)
    manager = model.execution.offload
    bandwidth = read_bandwidth(manager.store, args.bandwidth_samples, seed=1)
    if args.child == "mmap":
        manager.store.close()
        manager.store = MemmapStore(args.dir, config, manager.store.dtype)
    drop_page_cache(os.path.join(args.dir, RECORDS))
    prompt = [model.text_ids("The expert weights live on the disk.")[: args.prompt_tokens].tolist()]
    g = caee_jax.generate_with_stats(model, prompt, max_new_tokens=args.new_tokens)
    steps = g.decode_offload[1:]
    step_s = np.asarray(g.decode_step_s[1:])
    missed = np.array([s.bytes_read for s in steps], float)
    roofline = missed / bandwidth
    result = dict(
        store=args.child,
        policy=args.policy,
        prefetch=args.prefetch,
        tokens=g.tokens[0],
        prefill_s=g.prefill_s,
        step_s=step_s.tolist(),
        median_step_s=float(np.median(step_s)),
        tokens_per_s=1 / float(np.median(step_s)),
        bytes_missed_per_step=float(np.median(missed)),
        hit_rate=float(np.mean([s.hit_rate for s in steps])),
        blocking_per_step=float(np.mean([s.blocking_fetches for s in steps])),
        prediction_recall=float(np.mean([s.prediction_recall for s in steps])),
        disk_gbps=bandwidth / 1e9,
        roofline_ratio=float(np.median(roofline / step_s)),
        slots=manager.slots,
        cache_gb=manager.slots * config.num_moe_layers * manager.store.expert_bytes / 1e9,
        memory_kib=memory_kib(),
    )
    manager.store.close()
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="store directory to create (removed at the end)")
    parser.add_argument("--layers", type=int, default=26, help="MoE layers (26: V2-Lite; fewer for a quick check)")
    parser.add_argument("--cache", type=float, default=0.125, help="cache slots per layer, fraction of 64 experts")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=4)
    parser.add_argument("--bandwidth-samples", type=int, default=64)
    parser.add_argument("--policy", default="lru", help="eviction policy: lru, lfu or cost")
    parser.add_argument("--no-prefetch", dest="prefetch", action="store_false", help="on-demand reads only")
    parser.add_argument("--stores", default="direct,mmap", help="which decodes to run, comma-separated")
    parser.add_argument("--keep", action="store_true", help="keep the store (for --child runs)")
    parser.add_argument("--child", choices=["direct", "mmap"], help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args()
    if args.child:
        return child(args)

    config = v2_lite(args.layers)
    d, f, lead = config.hidden_size, config.moe_intermediate_size, (args.layers, config.n_routed_experts)
    total = args.layers * config.n_routed_experts * record_bytes(config, ml_dtypes.bfloat16)
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(args.dir))).free
    if free < total + 2**30:
        raise SystemExit(f"{args.dir}: {free / 1e9:.1f} GB free, the store needs {total / 1e9:.1f} GB (+1 GiB)")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"store {total / 1e9:.1f} GB of experts, RAM {ram / 1e9:.1f} GB", file=sys.stderr)
    results = {}
    try:
        if not os.path.exists(args.dir):
            shapes = [(*lead, d, f), (*lead, d, f), (*lead, f, d)]
            stacks = ExpertWeights(*(RandomStack(shape, seed) for seed, shape in enumerate(shapes)))
            start = time.perf_counter()
            write_disk_store(args.dir, config, stacks, source="random bf16, V2-Lite dims", progress=True)
            results["write_s"] = time.perf_counter() - start
        argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:]]
        stores = args.stores.split(",")
        for store in stores:
            out = subprocess.run([*argv, "--child", store], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{store} decode failed:\n{out.stderr[-3000:]}")
            results[store] = json.loads(out.stdout.strip().splitlines()[-1])
            r = results[store]
            kib = r["memory_kib"]
            print(
                f"{store}: {r['tokens_per_s']:.3f} tokens/s (median step {r['median_step_s']:.2f} s), "
                f"missed {r['bytes_missed_per_step'] / 1e9:.2f} GB/step, disk {r['disk_gbps']:.2f} GB/s, "
                f"roofline {r['roofline_ratio']:.0%}, hit rate {r['hit_rate']:.3f}, blocking/step "
                f"{r['blocking_per_step']:.1f}, recall {r['prediction_recall']:.2f}, cache {r['cache_gb']:.2f} GB, "
                f"peak RSS {kib['VmHWM'] / 2**20:.2f} GiB (end: anon {kib['RssAnon'] / 2**20:.2f}, "
                f"file {kib['RssFile'] / 2**20:.2f} GiB)"
            )
        same = len({str(results[store]["tokens"]) for store in stores}) == 1
        print(f"greedy ids identical between the stores: {same}")
        results |= dict(setup=vars(args), store_gb=total / 1e9, ram_gb=ram / 1e9, same_ids=same)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(results, fh, indent=1)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
            if os.path.exists(args.dir + ".lock"):  # the writer's lock file
                os.remove(args.dir + ".lock")


if __name__ == "__main__":
    main()
