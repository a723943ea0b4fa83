"""Joining a multi-process (multi-host) run on JAX's own distributed runtime.

Every process runs the same program; `jax.distributed` connects them through a coordinator, and XLA's
collectives (gloo on CPU) carry the data. After `initialize`, `jax.devices()` lists every process's
devices and one mesh spans them all.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
from jax.sharding import Mesh

from caee_jax.parallel import straggler
from caee_jax.parallel.mesh import make_mesh

# A process that stops answering is declared dead after this long; the others then exit with an
# error naming it instead of waiting forever in a collective.
HEARTBEAT_TIMEOUT_S = 10
# How long the processes of an explicit cluster wait for each other at start-up (--join-timeout).
JOIN_TIMEOUT_S = 60
# A start-up wait longer than this prints one line, so a missing process is not a silent pause.
PROGRESS_AFTER_S = 1.0
# The rendezvous greeting ("caee-join PROCESS_ID NUM_PROCESSES"); anything else on the port is a stranger.
HELLO = "caee-join"


class JoinError(Exception):
    """A cluster that cannot start for a reason the user can fix: bad flags, a busy port, a missing process.
    `join` prints it as one line and exits with status 2; a traceback would only hide the reason."""


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
    join_timeout_s: float = JOIN_TIMEOUT_S,
    idle_poller: bool = True,
) -> bool:
    """Connects this process to the others. Returns True when running multi-process.

    With `coordinator` ("HOST:PORT"), `num_processes` and `process_id`: that cluster, after a `rendezvous` on
    the coordinator port (raises JoinError when the flags are wrong, the port is busy or a process does not
    come within `join_timeout_s`). Without them: JAX's cluster auto-detection (SLURM, Open MPI, cloud TPU, ...),
    and a single process when none is found.
    idle_poller: run the collectives' socket-polling thread at idle priority (see `idle_new_pollers`).
    """
    kwargs = dict(heartbeat_timeout_seconds=heartbeat_timeout_s, initialization_timeout=math.ceil(join_timeout_s))
    if coordinator is None and num_processes is None and process_id is None:
        try:
            jax.distributed.initialize(**kwargs)
        except ValueError as error:
            if "coordinator_address" in str(error):  # no cluster detected: one process
                return False
            raise
        except RuntimeError as error:
            if "must be called before" in str(error):  # JAX already runs here (a notebook, a test): no cluster to join
                return jax.process_count() > 1
            raise
    else:
        host, port = check_cluster(coordinator, num_processes, process_id, join_timeout_s)
        rendezvous(host, port, num_processes, process_id, join_timeout_s)
        jax.distributed.initialize(coordinator, num_processes, process_id, **kwargs)
    before = _thread_ids()
    multi_process = jax.process_count() > 1  # creates the backend, and with it the collectives' threads
    if multi_process and idle_poller:
        idle_new_pollers(before)
    return multi_process


def check_cluster(
    coordinator: str | None, num_processes: int | None, process_id: int | None, join_timeout_s: float
) -> tuple[str, int]:
    """Checks the explicit cluster flags before JAX sees them and returns the coordinator's (host, port).

    JAX takes the port with `rsplit(":")[1]` (no port: an IndexError deep inside it) and would start a
    coordination service for any process count, so wrong flags must stop here with a readable reason.
    """
    if coordinator is None or num_processes is None or process_id is None:
        raise JoinError("--coordinator, --num-processes and --process-id go together")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise JoinError(f"--coordinator {coordinator!r} is not HOST:PORT with a port in 1..65535")
    if num_processes < 1:
        raise JoinError(f"--num-processes {num_processes} is not at least 1")
    if not 0 <= process_id < num_processes:
        raise JoinError(f"--process-id {process_id} is not in [0, {num_processes})")
    if not join_timeout_s > 0:
        raise JoinError(f"--join-timeout {join_timeout_s:g} is not a positive number of seconds")
    return host.removeprefix("[").removesuffix("]"), int(port)


def rendezvous(host: str, port: int, num_processes: int, process_id: int, timeout_s: float) -> None:
    """Meets every process on the coordinator port before JAX does; raises JoinError naming who is missing.

    JAX's start-up cannot say that: process 0 waits for everyone inside RegisterTask and at the deadline
    aborts the interpreter blaming "another task died", and a coordinator port that another program
    holds crashes it. So process 0 first listens on that port itself (a busy port is then a plain error)
    and names the processes that never came; the others learn the outcome from it. Then JAX starts, with
    everyone present, on the port process 0 has just released.
    """
    address = f"{host}:{port}"
    if process_id == 0:
        _gather(address, port, num_processes, timeout_s)
    else:
        _report(address, host, port, num_processes, process_id, timeout_s)


def _gather(address: str, port: int, num_processes: int, timeout_s: float) -> None:
    """Process 0's side: waits for processes 1..N-1 to say hello, then tells them all "go" (or "fail REASON")."""
    server = _listen(port)
    peers: dict[int, socket.socket] = {}
    try:
        _accept_peers(server, peers, address, num_processes, timeout_s)
        _tell(peers.values(), "go")
    except JoinError as error:
        _tell(peers.values(), f"fail {error}")
        raise
    finally:
        for conn in peers.values():
            conn.close()
        server.close()


def _listen(port: int) -> socket.socket:
    """Listens on every address at `port`, as JAX's service will ("[::]:PORT"), without SO_REUSEPORT so that
    another program's socket on the port is an error here instead of a crash inside JAX."""
    dualstack = socket.has_dualstack_ipv6()
    family = socket.AF_INET6 if dualstack else socket.AF_INET
    try:
        return socket.create_server(("", port), family=family, dualstack_ipv6=dualstack)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise JoinError(f"coordinator port {port} is already in use") from None
        raise JoinError(f"cannot listen on coordinator port {port}: {error.strerror}") from None


def _accept_peers(
    server: socket.socket, peers: dict[int, socket.socket], address: str, num_processes: int, timeout_s: float
) -> None:
    """Fills `peers` (process id -> connection) until every process has said hello or `timeout_s` ends."""
    deadline = time.monotonic() + timeout_s
    announced = False
    while len(peers) < num_processes - 1:
        left = deadline - time.monotonic()
        if left <= 0:
            missing = sorted(set(range(1, num_processes)) - peers.keys())
            raise JoinError(_never_joined(missing, num_processes, address, timeout_s))
        server.settimeout(min(left, PROGRESS_AFTER_S))
        try:
            conn, _ = server.accept()
        except TimeoutError:
            if not announced:
                more = num_processes - 1 - len(peers)
                print(
                    f"process 0 of {num_processes}: waiting for {more} more process{'es' if more > 1 else ''} "
                    f"at {address} (up to {timeout_s:g} s)",
                    file=sys.stderr,
                )
                announced = True
            continue
        _admit(conn, peers, num_processes)


def _admit(conn: socket.socket, peers: dict[int, socket.socket], num_processes: int) -> None:
    """Adds a peer's connection to `peers` after its hello; a stranger is dropped, a misconfigured peer fails
    the start (it is told why before the JoinError)."""
    hello = _read_line(conn, PROGRESS_AFTER_S).split()
    if len(hello) != 3 or hello[0] != HELLO or not (hello[1].isdigit() and hello[2].isdigit()):
        conn.close()
        return
    process_id, their_count = int(hello[1]), int(hello[2])
    if their_count != num_processes:
        problem = f"process {process_id} has --num-processes {their_count}, process 0 has {num_processes}"
    elif process_id in peers or not 1 <= process_id < num_processes:
        problem = f"a second process {process_id} joined (each --process-id in [0, {num_processes}) once)"
    else:
        peers[process_id] = conn
        return
    _tell([conn], f"fail {problem}")
    conn.close()
    raise JoinError(problem)


def _never_joined(missing: list[int], num_processes: int, address: str, timeout_s: float) -> str:
    who = f"process {missing[0]}" if len(missing) == 1 else "processes " + ", ".join(map(str, missing))
    return f"{who} of {num_processes} never joined the coordinator at {address} within {timeout_s:g} s"


def _report(address: str, host: str, port: int, num_processes: int, process_id: int, timeout_s: float) -> None:
    """A peer's side: says hello to process 0 and waits for its verdict."""
    me = f"process {process_id} of {num_processes}"
    with _connect(host, port, address, me, timeout_s) as conn:
        conn.sendall(f"{HELLO} {process_id} {num_processes}\n".encode())
        # Process 0 was already listening when we connected, so its own deadline ends within timeout_s.
        reply = _read_line(conn, timeout_s + PROGRESS_AFTER_S)
    if reply == "go":
        return
    if reply.startswith("fail "):
        raise JoinError(reply.removeprefix("fail "))
    raise JoinError(
        f"{me} could not reach coordinator at {address}: no answer within {timeout_s:g} s"
        " (is another program listening on that port?)"
    )


def _connect(host: str, port: int, address: str, me: str, timeout_s: float) -> socket.socket:
    """Connects to process 0's rendezvous, retrying while it is not listening yet (it may start later)."""
    start = time.monotonic()
    announced = False
    while True:
        left = start + timeout_s - time.monotonic()
        try:
            return socket.create_connection((host, port), timeout=max(left, 0.1))
        except OSError as error:
            if left <= 0:
                reason = error.strerror or str(error)
                raise JoinError(
                    f"{me} could not reach coordinator at {address} within {timeout_s:g} s ({reason})"
                ) from None
            if not announced and time.monotonic() - start >= PROGRESS_AFTER_S:
                print(f"{me}: waiting for the coordinator at {address} (up to {timeout_s:g} s)", file=sys.stderr)
                announced = True
            time.sleep(0.2)


def _read_line(conn: socket.socket, timeout_s: float) -> str:
    """One short line from `conn`, or "" when none comes within `timeout_s` or the connection closes."""
    conn.settimeout(timeout_s)
    try:
        with conn.makefile("rb") as lines:
            return lines.readline(200).decode(errors="replace").strip()
    except OSError:
        return ""


def _tell(conns, message: str) -> None:
    for conn in conns:
        try:
            conn.sendall(f"{message}\n".encode())
        except OSError:  # that process is gone; it will learn nothing more from us
            pass


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


def spawn_local(
    argv: list[str], num_processes: int, *, pin_cores: bool = True, slow: straggler.SlowProcess | None = None
) -> tuple[int, str]:
    """Runs `python argv...` as a `num_processes`-process cluster on this machine (loopback coordinator),
    each process with one CPU device, pinned to its own core with `taskset` when `pin_cores`.

    slow: that process shares its core with a competing workload for its whole life (`parallel/straggler.py`),
    and every process has the condition in its environment (`straggler.ENV`, recorded in cost tables).
    Process 0's progress (stderr) shows; its stdout is returned without gloo's connection lines.
    Returns (worst exit code, process 0's stdout); a failing process's stderr is printed.
    """
    if slow is not None:
        slow.check(num_processes)
        if not pin_cores:
            raise ValueError("--slow-process needs each process pinned to its own core")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cluster = ["--cpu-devices", "1", "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(num_processes)]
    env = {**os.environ, straggler.ENV: str(slow) if slow else ""}
    procs, helper = [], None
    # SIGTERM (a scheduler stopping the launcher) unwinds through `finally`: the processes, which ignore it
    # once JAX's distributed runtime has started (its preemption notice), would otherwise outlive it.
    terminate = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_signal) if terminate else None
    try:
        for i in range(num_processes):
            command = [sys.executable, *argv, *cluster, "--process-id", str(i)]
            if pin_cores:
                command = ["taskset", "-c", str(_core(i)), *command]
            procs.append(
                subprocess.Popen(
                    command,
                    stdout=subprocess.PIPE if i == 0 else subprocess.DEVNULL,
                    stderr=None if i == 0 else subprocess.PIPE,
                    text=True,
                    env=env,
                )
            )
        if slow is not None:
            helper = straggler.start(procs[slow.process].pid, slow.factor, [_core(slow.process)], (os.getpid(),))
            share = f"{1 - 1 / slow.factor:.0%}"
            print(
                f"process {slow.process} slowed: a competitor takes {share} of its core (pid {helper.pid})",
                file=sys.stderr,
            )
        stdout = procs[0].communicate()[0]
        for i, proc in enumerate(procs[1:], start=1):
            err = proc.communicate()[1]
            if proc.returncode:
                print(f"process {i} failed:\n{err[-4000:]}", file=sys.stderr)
    finally:
        if helper is not None:
            straggler.stop(helper)
        for proc in procs:  # only left running when this function fails
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if terminate:
            signal.signal(signal.SIGTERM, previous)
    stdout = "\n".join(line for line in stdout.splitlines() if not line.startswith("[Gloo]"))
    return max(abs(p.returncode) for p in procs), stdout


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _core(process_id: int) -> int:
    return process_id % os.cpu_count()


def add_arguments(parser, local_processes: bool = True) -> None:
    """The launchers' "devices and processes" flags, which `join` (and `relaunch_locally`) consume."""
    group = parser.add_argument_group("devices and processes")
    group.add_argument(
        "--mesh", help="mesh axes, e.g. data=2,expert=4 (default: every device on the expert axis; none for 1 device)"
    )
    if local_processes:
        group.add_argument("--local-processes", type=int, help="run as this many local processes, one core each")
        group.add_argument(
            "--slow-process",
            type=_slow_process,
            metavar="ID:FACTOR",
            help="with --local-processes: slow process ID, a competing workload taking 1 - 1/FACTOR of its core "
            "(e.g. 1:2; parallel/straggler.py)",
        )
    group.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator (multi-process)")
    group.add_argument("--num-processes", type=int)
    group.add_argument("--process-id", type=int)
    group.add_argument("--cpu-devices", type=int, help="simulate this many CPU devices in this process")
    group.add_argument(
        "--join-timeout",
        type=float,
        default=JOIN_TIMEOUT_S,
        help=f"seconds the processes wait for each other at start-up (default {JOIN_TIMEOUT_S})",
    )


def _slow_process(text: str) -> straggler.SlowProcess:
    try:
        return straggler.SlowProcess.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def join(args) -> Mesh | None:
    """The launchers' common start, from their --cpu-devices, --coordinator/--num-processes/--process-id,
    --join-timeout and --mesh flags: simulate CPU devices, join the cluster, build the mesh (None on one
    device). A cluster that cannot start (or --slow-process without --local-processes, which `relaunch_locally`
    consumes) is one "error: ..." line and exit status 2."""
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    try:
        if getattr(args, "slow_process", None):
            raise JoinError(
                "--slow-process needs --local-processes (to slow one process of another cluster: "
                "python caee_jax/parallel/straggler.py --pid PID --factor FACTOR)"
            )
        initialize(args.coordinator, args.num_processes, args.process_id, join_timeout_s=args.join_timeout)
    except JoinError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return make_mesh(args.mesh) if args.mesh or jax.device_count() > 1 else None


def relaunch_locally(
    script: str, argv: list[str], num_processes: int, slow: straggler.SlowProcess | None = None
) -> int:
    """Runs `script` with `argv` minus --local-processes and --slow-process as a local cluster, `slow` slowed
    (see `spawn_local`); prints process 0's output. A bad --slow-process is one "error: ..." line, status 2."""
    rest = _without(_without(argv, "--local-processes"), "--slow-process")
    try:
        code, stdout = spawn_local([os.path.abspath(script), *rest], num_processes, slow=slow)
    except (ValueError, straggler.SlowdownError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(stdout)
    return code


def _without(argv: list[str], flag: str) -> list[str]:
    """`argv` without `flag` and its value (as "FLAG VALUE" or "FLAG=VALUE")."""
    rest = [a for i, a in enumerate(argv) if a != flag and argv[i - 1 : i] != [flag]]
    return [a for a in rest if not a.startswith(flag + "=")]
