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

--decompose adds runs without routed experts (every pair pruned: peer rule topk 0 with k_min 0; the
router, the token exchange and everything else still run) and derives, from medians, where the step's
time goes:
  one process:    routed experts = step - step without them; the rest = step without them
  data_expert=2:  attention, dense layers, shared experts and router = one process at half the batch
                  without routed experts (each device's share); token exchange and waiting = the 2-process
                  step without routed experts - that; routed experts = the 2-process step - the 2-process
                  step without them

    .venv/bin/python benchmarks/bench_data_parallel_attention.py --batches 16,64 --rounds 7
    .venv/bin/python benchmarks/bench_data_parallel_attention.py --batches 16 --decompose \
        --configs "1 process,data_expert=2/all_to_all"
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

from caee_jax.stats import paired_ratio  # noqa: E402

CONFIGS = {  # name -> (mesh spec or None for one process, dispatch, rows per batch, routed experts run)
    "1 process": (None, "auto", 1.0, True),
    "expert=2": ("expert=2", "auto", 1.0, True),
    "data_expert=2/all_to_all": ("data_expert=2", "all_to_all", 1.0, True),
    "data_expert=2/gather": ("data_expert=2", "gather", 1.0, True),
}
PARTS = {  # --decompose: the same without routed experts
    "1 process/no routed experts": (None, "auto", 1.0, False),
    "1 process/half batch, no routed experts": (None, "auto", 0.5, False),
    "data_expert=2/all_to_all/no routed experts": ("data_expert=2", "all_to_all", 1.0, False),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="model directory (default: the bundled model)")
    parser.add_argument("--batches", default="16,64", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=48, help="decode steps per run")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every configuration")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    parser.add_argument("--decompose", action="store_true", help="also runs without routed experts (see above)")
    parser.add_argument("--json", action="store_true")
    worker = parser.add_argument_group("internal: one measured process")
    worker.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    worker.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    worker.add_argument("--mesh", help=argparse.SUPPRESS)
    worker.add_argument("--dispatch", help=argparse.SUPPRESS)
    worker.add_argument("--no-routed-experts", action="store_true", help=argparse.SUPPRESS)
    worker.add_argument("--coordinator", help=argparse.SUPPRESS)
    worker.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker(args) -> None:
    """Measures decode steps in this process (and its peer) and prints one JSON line."""
    import jax

    import caee_jax
    from caee_jax.caee.peer_rules import PeerRule
    from caee_jax.model.execution import Execution
    from caee_jax.parallel import distributed
    from caee_jax.parallel.mesh import make_mesh

    jax.config.update("jax_num_cpu_devices", 1)
    if args.mesh:
        distributed.initialize(args.coordinator, 2, args.process_id)
    mesh = make_mesh(args.mesh) if args.mesh else None
    nothing = PeerRule("topk", 0, k_min=0) if args.no_routed_experts else None  # every pair pruned
    model = caee_jax.load(args.checkpoint, execution=Execution(dispatch=args.dispatch, pruning=nothing), mesh=mesh)
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
    mesh, dispatch, rows, experts = (CONFIGS | PARTS)[config]
    base = [sys.executable, os.path.abspath(__file__), "--worker", "--batch", str(round(rows * batch))]
    base += ["--steps", str(args.steps), "--dispatch", dispatch] + ([] if experts else ["--no-routed-experts"])
    base += ["--checkpoint", args.checkpoint] if args.checkpoint else []
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
    if args.decompose and "data_expert=2/all_to_all" not in configs:
        print("error: --decompose needs 'data_expert=2/all_to_all' in --configs", file=sys.stderr)
        return 2
    configs += list(PARTS) if args.decompose else []
    rows, parts, loads = [], [], [os.getloadavg()[0]]
    for batch in (int(b) for b in args.batches.split(",")):
        times, first_tokens = {c: [] for c in configs}, {}
        for r in range(args.rounds):
            for config in configs[r % len(configs) :] + configs[: r % len(configs)]:
                report = run(args, batch, config)
                times[config].append(report["step_s"])
                same = first_tokens.setdefault((CONFIGS | PARTS)[config][2:], report["tokens"])  # same model, rows
                if report["tokens"] != same:
                    raise RuntimeError(f"batch {batch}, {config}: tokens {report['tokens']} differ: {same}")
            loads.append(os.getloadavg()[0])
            done = ", ".join(f"{c} {1e3 * times[c][-1]:.1f} ms" for c in configs)
            print(f"batch {batch}, round {r + 1}: {done}; load {loads[-1]:.1f}", file=sys.stderr, flush=True)
        base = np.array(times["1 process"])
        for config in (c for c in configs if c in CONFIGS):
            speedup, low, high = paired_ratio(np.array(times[config]), base)
            rows.append(dict(batch=batch, config=config, step_s=float(np.median(times[config])), speedup=speedup,
                             speedup_ci95=[low, high], step_s_rounds=times[config]))  # fmt: skip
        if args.decompose:
            parts.append(dict(batch=batch, **decomposition({c: float(np.median(t)) for c, t in times.items()})))
    report = dict(model=args.checkpoint or "bundled caee-small", steps=args.steps, rounds=args.rounds,
                  load_average=dict(min=min(loads), max=max(loads)), rows=rows, decomposition=parts)  # fmt: skip
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
    for part in parts:
        print(f"batch {part['batch']}, where the decode step goes (ms, from medians):")
        for name, value in part.items():
            if name != "batch":
                print(f"  {name:>58} {1e3 * value:8.2f}")
    return 0


def decomposition(step: dict[str, float]) -> dict[str, float]:
    """Seconds per decode step, from median steps by configuration (see the module doc)."""
    alone, rest = step["1 process"], step["1 process/no routed experts"]
    split, exchanged = step["data_expert=2/all_to_all"], step["data_expert=2/all_to_all/no routed experts"]
    local = step["1 process/half batch, no routed experts"]
    return {
        "1 process: step": alone,
        "1 process: routed experts": alone - rest,
        "1 process: everything else": rest,
        "data_expert=2: step": split,
        "data_expert=2: attention, dense, shared experts, router (half batch)": local,
        "data_expert=2: token exchange and waiting": exchanged - local,
        "data_expert=2: routed experts": split - exchanged,
    }


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    if "--worker" not in sys.argv:
        print(f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    sys.exit(code)
