"""Converter throughput and peak memory on a synthetic multi-GB FP8 checkpoint, then restoring it onto a mesh.

Writes a DeepSeek-layout FP8 checkpoint (random e4m3 bytes and block scales, bf16 embeddings and norms,
one shard per layer, `model.safetensors.index.json`), then, --repeats times: converts it with
`python -m checkpoints_tools.convert_hf` in a child process, and restores the result with `caee_jax.load`
in others: on one device, and onto mesh "expert=2" (2 simulated CPU devices in one process, so the
replicated parameters are resident twice: "on the devices" counts every device's copy). A child's peak
RSS comes from os.wait4 in a bare launcher process (ru_maxrss: resident memory including mapped
libraries, plus the launcher's ~10 MB); a child that only imports jax, orbax and caee_jax gives the
baseline. Reported next to the largest unit (one layer) and the whole checkpoint, source (FP8) and
converted (bf16) sizes. Medians over repeats. Deletes its files at the end.

    .venv/bin/python benchmarks/bench_convert.py                          # 3 GB FP8 -> 5.7 GB bf16, ~6 min
    .venv/bin/python benchmarks/bench_convert.py --layers 4 --repeats 1   # quicker
    .venv/bin/python benchmarks/bench_convert.py --keep-fp8                # routed experts kept as FP8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

from caee_jax.config import ModelConfig
from caee_jax.routing.storage import Storage
from caee_jax.weights.fp8 import FP8_DTYPE, scale_shape
from caee_jax.weights.hf_layout import hf_shape, layer_recipes, may_be_fp8, top_recipes
from caee_jax.weights.hf_source import SCALE_SUFFIX, HFSource
from caee_jax.weights.orbax_checkpoint import units
from checkpoints_tools.fp8_checkpoint import write_config, write_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}")
"""
BASELINE = "import jax, orbax.checkpoint, caee_jax.weights.orbax_checkpoint, checkpoints_tools.convert_hf"
RESTORE = """
import json, sys, time
import jax
jax.config.update("jax_num_cpu_devices", 2)
import caee_jax
start = time.perf_counter()
model = caee_jax.load(sys.argv[1], mesh=sys.argv[2] or None)
jax.block_until_ready(model.state)
seconds = time.perf_counter() - start
leaves = jax.tree.leaves(model.state)
on_devices = sum(shard.data.nbytes for x in leaves for shard in x.addressable_shards)
print(json.dumps({"seconds": seconds, "device_bytes": on_devices}))
"""
MESHES = {"one device": "", "mesh expert=2": "expert=2"}


def config_dict(args) -> dict:
    return dict(
        model_type="deepseek_v3",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        moe_intermediate_size=args.moe_intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        n_shared_experts=1,
        n_routed_experts=args.experts,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        first_k_dense_replace=1,
        kv_lora_rank=256,
        q_lora_rank=512,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        num_nextn_predict_layers=0,
    )


def random_tensor(rng, name: str, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Release-layout tensors for one HF name: FP8 bytes (no NaN) + float32 scales, or bf16 / float32."""
    if may_be_fp8(name):
        raw = rng.integers(0, 256, shape, dtype=np.uint8)
        raw[(raw & 0x7F) == 0x7F] = 0
        scales = rng.uniform(1e-4, 1e-3, scale_shape(shape)).astype(np.float32)
        return {name: raw.view(FP8_DTYPE), name + SCALE_SUFFIX: scales}
    if name.endswith("e_score_correction_bias"):
        return {name: rng.standard_normal(shape, np.float32)}
    return {name: (0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16)}


def write_checkpoint(directory: str, raw_config: dict, seed: int) -> None:
    """One shard for the top-level tensors, then one per layer (generated and written one at a time)."""
    os.makedirs(directory)
    write_config(directory, raw_config)
    config = ModelConfig.from_hf(raw_config)
    rng = np.random.default_rng(seed)
    groups = [top_recipes(config)] + [layer_recipes(config, i) for i in range(config.num_hidden_layers)]

    def shards():
        for recipes in groups:
            names = dict.fromkeys(n for recipe in recipes for n in recipe.sources)
            yield {k: v for name in names for k, v in random_tensor(rng, name, hf_shape(name, config)).items()}

    write_shards(directory, shards(), len(groups))


def run_measured(command: list[str], env: dict, workdir: str) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in bytes, stdout) of a child process, started by a bare launcher: Linux
    counts the spawning process's peak RSS in the child's ru_maxrss, so the launcher must be small."""
    report = os.path.join(workdir, "rusage.txt")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", LAUNCHER, report, *command], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    seconds = time.perf_counter() - start
    with open(report) as f:
        status, maxrss_kib = map(int, f.read().split())
    if done.returncode or status:
        raise SystemExit(f"{' '.join(command[:4])}... failed with status {status}")
    return seconds, maxrss_kib * 1024, done.stdout


def sizes(source_dir: str, keep_fp8: bool) -> dict:
    """Source and converted (bf16; routed experts FP8 with keep_fp8) bytes: whole checkpoint and largest unit."""
    config = ModelConfig.from_hf(source_dir)
    source = HFSource(source_dir, config)
    plan = units(config, ml_dtypes.bfloat16, 0, Storage.FP8 if keep_fp8 else None)
    per_unit = []
    for unit in plan:
        names = {n for recipe in unit.recipes for n in recipe.sources}
        out = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in unit.abstract.values())
        per_unit.append((sum(source.nbytes(n) for n in names), out, unit.name))
    largest = max(per_unit, key=lambda u: u[1])
    return {
        "source_bytes": sum(u[0] for u in per_unit),
        "converted_bytes": sum(u[1] for u in per_unit),
        "largest_unit": largest[2],
        "largest_unit_source_bytes": largest[0],
        "largest_unit_converted_bytes": largest[1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--moe-intermediate", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/caee-bench-convert")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic and converted checkpoints")
    parser.add_argument("--keep-fp8", action="store_true", help="convert with --keep-fp8 (routed experts stay FP8)")
    parser.add_argument("--json", action="store_true", help="print one JSON object of results")
    args = parser.parse_args()

    if os.path.exists(args.workdir):
        raise SystemExit(f"{args.workdir} exists; remove it or pass another --workdir")
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    source_dir, out = os.path.join(args.workdir, "fp8"), os.path.join(args.workdir, "converted")
    try:
        start = time.perf_counter()
        write_checkpoint(source_dir, config_dict(args), seed=0)
        print(f"wrote {source_dir} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        result = {"load_average": os.getloadavg(), "keep_fp8": args.keep_fp8, **sizes(source_dir, args.keep_fp8)}
        _, result["baseline_rss_bytes"], _ = run_measured([sys.executable, "-c", BASELINE], env, args.workdir)
        converts, restores = [], {name: [] for name in MESHES}
        for repeat in range(args.repeats):
            shutil.rmtree(out, ignore_errors=True)
            command = [sys.executable, "-m", "checkpoints_tools.convert_hf", "--hf-dir", source_dir, "--out", out]
            command += ["--keep-fp8"] if args.keep_fp8 else []
            seconds, rss, _ = run_measured([*command, "--no-progress"], env, args.workdir)
            converts.append((seconds, rss))
            for name, mesh in MESHES.items():
                _, rss, printed = run_measured([sys.executable, "-c", RESTORE, out, mesh], env, args.workdir)
                restores[name].append({**json.loads(printed), "peak_rss_bytes": rss})
            print(f"repeat {repeat}: convert {converts[-1]}, restore {restores}", file=sys.stderr)
        result["converted_on_disk_bytes"] = sum(
            os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(out) for name in names
        )
        convert_s = statistics.median(s for s, _ in converts)
        result.update(
            convert_seconds=convert_s,
            convert_mib_per_s=result["source_bytes"] / 2**20 / convert_s,
            convert_peak_rss_bytes=statistics.median(r for _, r in converts),
            restore={
                name: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
                for name, runs in restores.items()
            },
            repeats=args.repeats,
        )
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    print(f"load average at start: {result['load_average']}")
    kept = " (routed experts FP8, --keep-fp8)" if args.keep_fp8 else ""
    print(f"checkpoint: {gib(result['source_bytes'])} FP8 source -> {gib(result['converted_bytes'])} bf16{kept}")
    print(
        f"largest unit ({result['largest_unit']}): {gib(result['largest_unit_source_bytes'])} source, "
        f"{gib(result['largest_unit_converted_bytes'])} converted"
    )
    print(f"baseline child (imports only) peak RSS: {gib(result['baseline_rss_bytes'])}")
    print(
        f"convert: {result['convert_seconds']:.1f} s wall, {result['convert_mib_per_s']:.0f} MiB/s of source, "
        f"peak RSS {gib(result['convert_peak_rss_bytes'])}"
    )
    for name, restore in result["restore"].items():
        print(
            f"restore ({name}): {restore['seconds']:.1f} s, {gib(restore['device_bytes'])} on the devices, "
            f"peak RSS {gib(restore['peak_rss_bytes'])}"
        )


if __name__ == "__main__":
    main()
