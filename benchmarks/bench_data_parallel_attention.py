"""Decode step time of data-parallel attention with expert parallelism: 2 processes against 1.

Same model, same prompts, greedy decoding. Configurations, each run as fresh processes:
  1 process           one CPU device pinned to core 0, no mesh
  expert=2            2 processes (cores 0 and 1, one CPU device each, `jax.distributed` over loopback):
                      experts split, attention and the latent cache replicated (gather dispatch)
  data_expert=2/...   the same 2 processes with the batch and its cache split too, tokens exchanged
                      with the experts by all_to_all or by all-gather + reduce-scatter ("gather")
Every round runs every configuration once, in an order rotated from round to round; each run reports
its median decode step (first step excluded). The table gives medians over rounds and each 2-process
configuration's speedup over 1 process with a bootstrap 95% interval (rounds resampled together).

    .venv/bin/python benchmarks/bench_data_parallel_attention.py --batches 16,64 --rounds 7
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = {  # name -> (mesh spec or None for one process, dispatch)
    "1 process": (None, "auto"),
    "expert=2": ("expert=2", "auto"),
    "data_expert=2/all_to_all": ("data_expert=2", "all_to_all"),
    "data_expert=2/gather": ("data_expert=2", "gather"),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="model directory (default: the bundled model)")
    parser.add_argument("--batches", default="16,64", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=48, help="decode steps per run")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every configuration")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    parser.add_argument("--json", action="store_true")
    worker = parser.add_argument_group("internal: one measured process")
    worker.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    worker.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    worker.add_argument("--mesh", help=argparse.SUPPRESS)
    worker.add_argument("--dispatch", help=argparse.SUPPRESS)
    worker.add_argument("--coordinator", help=argparse.SUPPRESS)
    worker.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker(args) -> None:
    """Measures decode steps in this process (and its peer) and prints one JSON line."""
    import jax

    import caee_jax
    from caee_jax.model.execution import Execution
    from caee_jax.parallel import distributed
    from caee_jax.parallel.mesh import make_mesh

    jax.config.update("jax_num_cpu_devices", 1)
    if args.mesh:
        distributed.initialize(args.coordinator, 2, args.process_id)
    mesh = make_mesh(args.mesh) if args.mesh else None
    model = caee_jax.load(args.checkpoint, execution=Execution(dispatch=args.dispatch), mesh=mesh)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.config.vocab_size, 24).tolist() for _ in range(args.batch)]
    caee_jax.generate(model, prompts, max_new_tokens=4, stop=[])  # compile
    result = caee_jax.generate_with_stats(model, prompts, max_new_tokens=args.steps, stop=[])
    print(json.dumps({"step_s": result.decode_s_per_token, "tokens": result.tokens[-1][:8]}), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, batch: int, config: str) -> dict:
    """Runs one configuration (pinned processes); returns process 0's report."""
    mesh, dispatch = CONFIGS[config]
    base = [sys.executable, os.path.abspath(__file__), "--worker", "--batch", str(batch), "--steps", str(args.steps)]
    base += ["--dispatch", dispatch] + (["--checkpoint", args.checkpoint] if args.checkpoint else [])
    commands = [base]
    if mesh:
        cluster = base + ["--mesh", mesh, "--coordinator", f"127.0.0.1:{free_port()}"]
        commands = [cluster + ["--process-id", str(i)] for i in range(2)]
    procs = [
        subprocess.Popen(["taskset", "-c", str(i)] + c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i, c in enumerate(commands)
    ]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        if p.returncode:
            raise RuntimeError(f"{config}: worker failed:\n{err[-3000:]}")
    return json.loads([line for line in outputs[0][0].splitlines() if line.startswith("{")][-1])


def ratio_interval(base: np.ndarray, cand: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """median(base) / median(cand) (a speedup) and a bootstrap 95% interval, rounds resampled together."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(base), (2000, len(base)))
    ratios = np.median(base[picks], axis=1) / np.median(cand[picks], axis=1)
    low, high = np.quantile(ratios, [0.025, 0.975])
    return float(np.median(base) / np.median(cand)), float(low), float(high)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2:
        print("error: needs taskset and 2 cores", file=sys.stderr)
        return 2
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or "1 process" not in configs:
        print(f"error: --configs {args.configs!r}: needs '1 process' and names from {list(CONFIGS)}", file=sys.stderr)
        return 2
    rows, loads = [], [os.getloadavg()[0]]
    for batch in (int(b) for b in args.batches.split(",")):
        times, first_tokens = {c: [] for c in configs}, None
        for r in range(args.rounds):
            for config in configs[r % len(configs) :] + configs[: r % len(configs)]:
                report = run(args, batch, config)
                times[config].append(report["step_s"])
                first_tokens = first_tokens or report["tokens"]
                if report["tokens"] != first_tokens:
                    raise RuntimeError(f"batch {batch}, {config}: tokens {report['tokens']} differ: {first_tokens}")
            loads.append(os.getloadavg()[0])
            done = ", ".join(f"{c} {1e3 * times[c][-1]:.1f} ms" for c in configs)
            print(f"batch {batch}, round {r + 1}: {done}; load {loads[-1]:.1f}", file=sys.stderr, flush=True)
        base = np.array(times["1 process"])
        for config in configs:
            speedup, low, high = ratio_interval(base, np.array(times[config]))
            rows.append(dict(batch=batch, config=config, step_s=float(np.median(times[config])), speedup=speedup,
                             speedup_ci95=[low, high], step_s_rounds=times[config]))  # fmt: skip
    report = dict(model=args.checkpoint or "bundled caee-small", steps=args.steps, rounds=args.rounds,
                  load_average=dict(min=min(loads), max=max(loads)), rows=rows)  # fmt: skip
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"{report['model']} (float32), {args.steps} decode steps, median of {args.rounds} rotated rounds; "
        f"load average {min(loads):.1f}-{max(loads):.1f}"
    )
    print(f"{'batch':>6} {'configuration':>26} {'step ms':>8} {'speedup':>8}  95% CI")
    for r in rows:
        low, high = r["speedup_ci95"]
        print(
            f"{r['batch']:>6} {r['config']:>26} {1e3 * r['step_s']:8.2f} {r['speedup']:7.2f}x  [{low:.2f}, {high:.2f}]"
        )
    return 0


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    if "--worker" not in sys.argv:
        print(f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    sys.exit(code)
