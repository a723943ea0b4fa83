"""Decode step time: 2 expert-parallel processes (one core each) against 1 process on one core.

Same model, same prompts, greedy decoding. Baseline: one process pinned to core 0 (`taskset`), one CPU
device, no mesh. Candidate: two processes pinned to cores 0 and 1, one CPU device each, joined with
`jax.distributed` over loopback into a 2-device mesh `expert=2` (each process holds half the experts;
attention is replicated). Baseline and candidate alternate for --rounds rounds; each run reports the
median decode step (first step excluded); the table gives medians over rounds and their ratio.

    .venv/bin/python benchmarks/bench_expert_parallel.py                 # bundled model, batch 1 and 16
    .venv/bin/python benchmarks/bench_expert_parallel.py --json --rounds 5
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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="model directory (default: the bundled model)")
    parser.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=48, help="decode steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternated baseline/candidate rounds")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--no-pin", action="store_true", help="leave the 2 processes unpinned (the 1-process baseline stays on core 0)"
    )
    parser.add_argument("--json", action="store_true")
    worker = parser.add_argument_group("internal: one measured process")
    worker.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    worker.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    worker.add_argument("--coordinator", help=argparse.SUPPRESS)
    worker.add_argument("--num-processes", type=int, help=argparse.SUPPRESS)
    worker.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker(args) -> None:
    """Measures decode steps in this process (and its peers) and prints one JSON line."""
    import jax

    import caee_jax
    from caee_jax.parallel import distributed
    from caee_jax.parallel.mesh import make_mesh

    jax.config.update("jax_num_cpu_devices", 1)
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    mesh = make_mesh("expert=2") if jax.device_count() == 2 else None
    model = caee_jax.load(args.checkpoint, dtype=args.dtype, mesh=mesh)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.config.vocab_size, 24).tolist() for _ in range(args.batch)]
    caee_jax.generate(model, prompts, max_new_tokens=4, stop=[])  # compile
    result = caee_jax.generate_with_stats(model, prompts, max_new_tokens=args.steps, stop=[])
    print(json.dumps({"step_s": result.decode_s_per_token, "tokens": result.tokens[0][:8]}), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, batch: int, processes: int) -> dict:
    """Starts `processes` pinned workers; returns process 0's report."""
    base = [sys.executable, os.path.abspath(__file__), "--worker", "--batch", str(batch), "--steps", str(args.steps)]
    base += ["--dtype", args.dtype] + (["--checkpoint", args.checkpoint] if args.checkpoint else [])
    cluster = ["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", str(processes)]
    procs = []
    for i in range(processes):
        command = base + (cluster + ["--process-id", str(i)] if processes > 1 else [])
        if processes == 1 or not args.no_pin:
            command = ["taskset", "-c", str(i)] + command
        procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        if p.returncode:
            raise RuntimeError(f"worker failed:\n{err[-3000:]}")
    lines = [line for line in outputs[0][0].splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2:
        print("error: needs taskset and 2 cores", file=sys.stderr)
        return 2
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        single, pair = [], []
        for _ in range(args.rounds):
            one, two = run(args, batch, 1), run(args, batch, 2)
            if one["tokens"] != two["tokens"]:
                raise RuntimeError(f"batch {batch}: 2-process tokens {two['tokens']} differ from {one['tokens']}")
            single.append(one["step_s"])
            pair.append(two["step_s"])
        s, p = float(np.median(single)), float(np.median(pair))
        rows.append(dict(batch=batch, one_process_step_s=s, two_process_step_s=p, speedup=s / p))
    report = dict(
        model=args.checkpoint or "bundled caee-small",
        dtype=args.dtype,
        steps=args.steps,
        rounds=args.rounds,
        two_processes_pinned=not args.no_pin,
        load_average=os.getloadavg()[0],
        rows=rows,
    )
    if args.json:
        print(json.dumps(report))
        return 0
    pinning = "unpinned" if args.no_pin else "one core each"
    print(
        f"{report['model']} ({args.dtype}), {args.steps} decode steps, median of {args.rounds} alternated rounds; "
        f"2 processes {pinning}; load average {report['load_average']:.2f}"
    )
    print(f"{'batch':>6} {'1 process ms':>13} {'2 processes ms':>15} {'speedup':>8}")
    for r in rows:
        print(
            f"{r['batch']:>6} {1e3 * r['one_process_step_s']:13.2f} {1e3 * r['two_process_step_s']:15.2f} "
            f"{r['speedup']:8.2f}x"
        )
    return 0


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    if "--worker" not in sys.argv:
        print(f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    sys.exit(code)
