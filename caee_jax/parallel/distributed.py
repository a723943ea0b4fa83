"""Joining a multi-process (multi-host) run on JAX's own distributed runtime.

Every process runs the same program; `jax.distributed` connects them through a coordinator, and XLA's
collectives (gloo on CPU) carry the data. After `initialize`, `jax.devices()` lists every process's
devices and one mesh spans them all.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time

import jax
from jax.sharding import Mesh

from caee_jax.parallel.mesh import make_mesh

# A process that stops answering is declared dead after this long; the others then exit with an
# error naming it instead of waiting forever in a collective.
HEARTBEAT_TIMEOUT_S = 10
INIT_TIMEOUT_S = 60


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
    init_timeout_s: int = INIT_TIMEOUT_S,
    idle_poller: bool = True,
) -> bool:
    """Connects this process to the others. Returns True when running multi-process.

    With `coordinator` ("HOST:PORT"), `num_processes` and `process_id`: that cluster. Without them: JAX's
    cluster auto-detection (SLURM, Open MPI, cloud TPU, ...), and a single process when none is found.
    idle_poller: run the collectives' socket-polling thread at idle priority (see `idle_new_pollers`).
    """
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise ValueError("--coordinator, --num-processes and --process-id go together")
    kwargs = dict(heartbeat_timeout_seconds=heartbeat_timeout_s, initialization_timeout=init_timeout_s)
    if coordinator is None:
        try:
            jax.distributed.initialize(**kwargs)
        except ValueError as error:
            if "coordinator_address" in str(error):  # no cluster detected: one process
                return False
            raise
    else:
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id {process_id} is not in [0, {num_processes})")
        jax.distributed.initialize(coordinator, num_processes, process_id, **kwargs)
    before = _thread_ids()
    multi_process = jax.process_count() > 1  # creates the backend, and with it the collectives' threads
    if multi_process and idle_poller:
        idle_new_pollers(before)
    return multi_process


# Syscall numbers of epoll_wait / epoll_pwait, as /proc/<tid>/syscall shows them, per machine.
EPOLL_SYSCALLS = {"x86_64": {"232", "281"}, "aarch64": {"22"}}.get(platform.machine(), set())


def _thread_ids() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/task")} if os.path.isdir("/proc/self/task") else set()


def idle_new_pollers(existing: set[int]) -> list[int]:
    """Puts the threads created since `existing` that wait in epoll at SCHED_IDLE; returns their ids.

    gloo's TCP transport (the CPU collectives) polls its sockets from one event-loop thread per process,
    and that thread keeps a core busy. With one core per process, the thread waiting for a collective's
    result then runs only when the poller's time slice ends: ~4 ms per all-reduce, against 0.2 ms with
    the poller idle (benchmarks/bench_collective_latency.py). At idle priority the poller yields the core to
    any other runnable thread and still runs whenever the core is free. Threads from before (the
    coordination service's gRPC pollers, which carry heartbeats) are left alone, so call this right
    before the backend starts (`initialize` does). Linux only.
    """
    if not hasattr(os, "sched_setscheduler"):
        return []
    pollers = set()
    for _ in range(20):  # a few looks: a poller may be busy at any one of them
        for tid in _thread_ids() - existing - pollers:
            try:
                with open(f"/proc/self/task/{tid}/syscall") as f:
                    if f.read().split()[0] in EPOLL_SYSCALLS:
                        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                        pollers.add(tid)
            except (OSError, IndexError):  # the thread ended, or /proc is restricted
                continue
        time.sleep(0.001)
    return sorted(pollers)


def spawn_local(argv: list[str], num_processes: int, *, pin_cores: bool = True) -> tuple[int, str]:
    """Runs `python argv...` as a `num_processes`-process cluster on this machine (loopback coordinator),
    each process with one CPU device, pinned to its own core with `taskset` when `pin_cores`.

    Process 0's progress (stderr) shows; its stdout is returned without gloo's connection lines.
    Returns (worst exit code, process 0's stdout); a failing process's stderr is printed.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cluster = ["--cpu-devices", "1", "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(num_processes)]
    procs = []
    for i in range(num_processes):
        command = [sys.executable, *argv, *cluster, "--process-id", str(i)]
        if pin_cores:
            command = ["taskset", "-c", str(i % os.cpu_count()), *command]
        procs.append(
            subprocess.Popen(
                command,
                stdout=subprocess.PIPE if i == 0 else subprocess.DEVNULL,
                stderr=None if i == 0 else subprocess.PIPE,
                text=True,
            )
        )
    stdout = procs[0].communicate()[0]
    for i, proc in enumerate(procs[1:], start=1):
        err = proc.communicate()[1]
        if proc.returncode:
            print(f"process {i} failed:\n{err[-4000:]}", file=sys.stderr)
    stdout = "\n".join(line for line in stdout.splitlines() if not line.startswith("[Gloo]"))
    return max(abs(p.returncode) for p in procs), stdout


def add_arguments(parser, local_processes: bool = True) -> None:
    """The launchers' "devices and processes" flags, which `join` (and `relaunch_locally`) consume."""
    group = parser.add_argument_group("devices and processes")
    group.add_argument(
        "--mesh", help="mesh axes, e.g. data=2,expert=4 (default: every device on the expert axis; none for 1 device)"
    )
    if local_processes:
        group.add_argument("--local-processes", type=int, help="run as this many local processes, one core each")
    group.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator (multi-process)")
    group.add_argument("--num-processes", type=int)
    group.add_argument("--process-id", type=int)
    group.add_argument("--cpu-devices", type=int, help="simulate this many CPU devices in this process")


def join(args) -> Mesh | None:
    """The launchers' common start, from their --cpu-devices, --coordinator/--num-processes/--process-id
    and --mesh flags: simulate CPU devices, join the cluster, build the mesh (None on one device)."""
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    initialize(args.coordinator, args.num_processes, args.process_id)
    return make_mesh(args.mesh) if args.mesh or jax.device_count() > 1 else None


def relaunch_locally(script: str, argv: list[str], num_processes: int) -> int:
    """Runs `script` with `argv` minus --local-processes as a local cluster; prints process 0's output."""
    rest = [a for i, a in enumerate(argv) if a != "--local-processes" and argv[i - 1 : i] != ["--local-processes"]]
    rest = [a for a in rest if not a.startswith("--local-processes=")]
    code, stdout = spawn_local([os.path.abspath(script), *rest], num_processes)
    print(stdout)
    return code
