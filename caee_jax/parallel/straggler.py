"""A real straggler: one process made slower by a competing workload on its own core.

A device that bounds every layer is what CAEE's straggler target is for, and two identical pinned cores
never have one. This module makes one: a competing busy loop on the slowed process's core(s), at
real-time priority (SCHED_FIFO 2), in a fine duty cycle: it takes 1 - 1/factor of the core in busy
phases of a fraction of a millisecond (`spin`), so the process only runs in the gaps, as on a core
shared with a higher-priority tenant. A compute loop longer than a period or two runs about `factor` times slower; a
program that blocks and wakes often, more (a wake-up in a busy phase waits for its end: XLA's MoE-layer
call measured 2.6-4x at factor 2). The slowness is met at run time by the unmodified process; nothing in
it sleeps on purpose.

Why not the alternatives (measured here, a 2-core VM, docs/ARCHITECTURE.md): a busy loop at the same
priority, or a CPU quota (cgroup `cpu.cfs_quota_us`, whose period is at least 1 ms; or SIGSTOP/SIGCONT
at a fixed period) slow the process's throughput but in slices of milliseconds, so an operation of a
few hundred microseconds (one MoE layer here) either runs at full speed or waits a whole slice: the
median of timed calls, which calibration fits and evaluation reports, does not move. SIGSTOP also leaves
a stopped process behind if the helper dies mid-cycle; a spinner that dies leaves nothing.

Cleanup on every exit path: the helper ends when the slowed process ends, when any `--watch` process
ends (the launcher), and on SIGTERM/SIGINT/SIGHUP; its spinners die with it (parent-death signal), even
when it is killed with SIGKILL. Linux only; SCHED_FIFO needs CAP_SYS_NICE (root, or `ulimit -r`).

Standalone, against any process (e.g. one rank of a real cluster):
    python caee_jax/parallel/straggler.py --pid PID --factor 2            # its cores, until it ends

This file imports only the standard library, so the helper starts in a few milliseconds.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
import select
import signal
import subprocess
import sys
import time

ENV = "CAEE_SLOW_PROCESS"  # "ID:FACTOR" in every process of a local cluster started with --slow-process
PERIOD_S = 400e-6  # duty-cycle period (about): short against a MoE layer call (~0.1-2 ms here)
MAX_FACTOR = 10.0  # spinning 90% of the time; the kernel caps real-time tasks at 95% (sched_rt_runtime_us)
PRIORITY = 2  # SCHED_FIFO: above every normal process, and above a real-time one at the lowest priority (1)
READY = "slowing"  # the helper's first stdout line once its spinners run
PR_SET_PDEATHSIG = 1


class SlowdownError(Exception):
    """The helper could not start (no such process, no permission for real-time priority, ...)."""


@dataclasses.dataclass(frozen=True)
class SlowProcess:
    """Process `process` of a local cluster shares its core with a competitor taking 1 - 1/`factor` of it."""

    process: int
    factor: float

    def __str__(self) -> str:
        return f"{self.process}:{self.factor:g}"

    @classmethod
    def parse(cls, text: str) -> SlowProcess:
        """Reads "ID:FACTOR", e.g. "1:2"; a ValueError says what is wrong."""
        process, sep, factor = text.partition(":")
        try:
            slow = cls(int(process), float(factor))
        except ValueError:
            raise ValueError(f"{text!r} is not ID:FACTOR, e.g. 1:2 (process 1 about 2x slower)") from None
        if not sep or slow.process < 0:
            raise ValueError(f"{text!r} is not ID:FACTOR with a process id >= 0, e.g. 1:2")
        check_factor(slow.factor)
        return slow

    def check(self, num_processes: int) -> None:
        if not self.process < num_processes:
            raise ValueError(f"--slow-process {self}: process {self.process} is not in [0, {num_processes})")


def check_factor(factor: float) -> None:
    if not 1 < factor <= MAX_FACTOR:
        raise ValueError(f"slow-down factor {factor:g} is not in (1, {MAX_FACTOR:g}]")


def condition() -> str:
    """The slowed process of the local cluster this process belongs to ("ID:FACTOR"), or "" when none was."""
    return os.environ.get(ENV, "")


def start(pid: int, factor: float, cores: list[int] | None = None, watch: tuple[int, ...] = ()) -> subprocess.Popen:
    """Starts the helper slowing `pid` (on `cores`, default its affinity) until it, or a `watch` process, ends;
    returns once the spinners run. SlowdownError with the helper's reason when it cannot start."""
    command = [sys.executable, "-I", os.path.abspath(__file__), "--pid", str(pid), "--factor", repr(factor)]
    command += ["--cores", ",".join(map(str, cores))] if cores else []
    command += [arg for w in watch for arg in ("--watch", str(w))]
    helper = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if helper.stdout.readline().startswith(READY):
        return helper
    stop(helper)
    raise SlowdownError(f"cannot slow process {pid}: {helper.stderr.read().strip() or 'the helper ended'}")


def stop(helper: subprocess.Popen) -> None:
    """Ends the helper and its spinners (it kills them on SIGTERM; they die with it in any case)."""
    if helper.poll() is None:
        helper.terminate()
    try:
        helper.wait(timeout=5)
    except subprocess.TimeoutExpired:
        helper.kill()
        helper.wait()


def spin(core: int, factor: float, ready: int, period_s: float = PERIOD_S) -> None:
    """The competing workload on `core`, forever: asleep about `period_s / factor`, then busy `factor - 1` times
    as long as the sleep really lasted (a sleep overshoots by tens of microseconds), so that it takes exactly
    1 - 1/factor of the core. Writes one byte to the pipe `ready`, and closes it, once it has its core and
    its priority."""
    os.sched_setaffinity(0, {core})
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(PRIORITY))
    os.write(ready, b".")
    os.close(ready)
    while True:
        asleep = time.perf_counter()
        time.sleep(period_s / factor)
        awake = time.perf_counter()
        end = awake + (awake - asleep) * (factor - 1)
        while time.perf_counter() < end:
            pass


def _die_with_parent() -> None:
    """SIGKILL this process when its parent ends, whatever ends it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def _fork_spinner(core: int, factor: float, ready: int) -> int:
    parent = os.getpid()
    child = os.fork()
    if child:
        return child
    try:
        _die_with_parent()
        if os.getppid() == parent:  # else the helper already ended
            spin(core, factor, ready)
    finally:
        os._exit(0)


def _read_to_end(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 64):
        data += chunk
    os.close(fd)
    return data


def _pidfd(pid: int) -> int:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        raise ProcessLookupError(f"no process {pid}") from None


def run(pid: int, factor: float, cores: list[int] | None, watch: list[int]) -> None:
    """The helper: spinners on `cores` until `pid` or a `watch` process ends, or a signal; then none left."""
    check_factor(factor)
    ends = [_pidfd(p) for p in (pid, *watch)]  # readable once the process has ended
    cores = sorted(cores or os.sched_getaffinity(pid))
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(0))
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(PRIORITY))  # may this process use real-time priority?
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except PermissionError:
        raise PermissionError("real-time priority (SCHED_FIFO) needs CAP_SYS_NICE: root, or `ulimit -r`") from None
    spinners = []
    try:
        ready, written = os.pipe()
        spinners = [_fork_spinner(core, factor, written) for core in cores]
        os.close(written)
        if len(_read_to_end(ready)) < len(cores):  # a spinner ended without its byte
            raise OSError(f"a spinner could not take its core at real-time priority (cores {cores})")
        print(f"{READY} process {pid}: a competitor takes {1 - 1 / factor:.0%} of each of cores {cores}", flush=True)
        poller = select.poll()
        for fd in ends:
            poller.register(fd, select.POLLIN)
        poller.poll()
    finally:
        for child in spinners:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pid", type=int, required=True, help="the process to slow down")
    parser.add_argument("--factor", type=float, required=True, help="competitor takes 1 - 1/FACTOR of a core, (1, 10]")
    parser.add_argument("--cores", help="comma-separated cores to compete on (default: the process's affinity)")
    parser.add_argument("--watch", type=int, action="append", default=[], help="also stop when this process ends")
    args = parser.parse_args(argv)
    cores = [int(c) for c in args.cores.split(",")] if args.cores else None
    try:
        run(args.pid, args.factor, cores, args.watch)
    except (ValueError, OSError) as error:  # a bad factor or core, no such process, no permission
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
