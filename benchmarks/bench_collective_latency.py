"""Latency of one cross-process all-reduce (gloo over loopback), pinned and unpinned.

Two processes, one CPU device each, a mesh of 2; a jitted `shard_map` does N `psum`s of a [rows, 256]
float32 array per call. Printed: median milliseconds per all-reduce, with each process pinned to its own
core (`taskset`) and unpinned. This is the fixed cost the expert-parallel decode step pays per MoE layer.

    .venv/bin/python benchmarks/bench_collective_latency.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def worker(args) -> None:
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from caee_jax.parallel import distributed

    jax.config.update("jax_num_cpu_devices", 1)
    distributed.initialize(args.coordinator, args.num_processes, args.process_id, idle_poller=args.idle_poller)
    mesh = jax.make_mesh((2,), ("x",), (jax.sharding.AxisType.Auto,))

    def chain(a):
        for _ in range(args.psums):
            a = jax.lax.psum(a, "x") * 0.5
        return a

    fn = jax.jit(jax.shard_map(chain, mesh=mesh, in_specs=P("x"), out_specs=P("x"), check_vma=False))
    host = np.ones((2 * args.rows, 256), np.float32)
    a = jax.make_array_from_callback(host.shape, NamedSharding(mesh, P("x")), lambda index: host[index])
    fn(a).block_until_ready()
    times = []
    for _ in range(args.calls):
        start = time.perf_counter()
        fn(a).block_until_ready()
        times.append(time.perf_counter() - start)
    if args.process_id == 0:
        print(json.dumps({"ms_per_psum": 1e3 * float(np.median(times)) / args.psums}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16, help="rows per device of the reduced [rows, 256] array")
    parser.add_argument("--psums", type=int, default=10, help="all-reduces per call")
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--idle-poller", action=argparse.BooleanOptionalAction, help=argparse.SUPPRESS)
    parser.add_argument("--cpu-devices", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", help=argparse.SUPPRESS)
    parser.add_argument("--num-processes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    from caee_jax.parallel.distributed import spawn_local

    command = [os.path.abspath(__file__), "--worker", "--rows", str(args.rows), "--psums", str(args.psums)]
    command += ["--calls", str(args.calls)]
    print(f"all-reduce of [{args.rows}, 256] float32 between 2 processes; load average {os.getloadavg()[0]:.2f}")
    for pinned in (True, False):
        for idle in (False, True):
            code, stdout = spawn_local([*command, "--idle-poller" if idle else "--no-idle-poller"], 2, pin_cores=pinned)
            if code:
                return code
            ms = json.loads(stdout.strip().splitlines()[-1])["ms_per_psum"]
            where = "pinned, one core each" if pinned else "unpinned"
            print(f"{where:>22}, gloo poller {'idle' if idle else 'normal'} priority: {ms:.3f} ms per all-reduce")
    return 0


if __name__ == "__main__":
    sys.exit(main())
