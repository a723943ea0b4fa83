"""A cluster that cannot start says why, in one line, within --join-timeout: real launch/run.py processes on
127.0.0.1 (a missing peer, a missing coordinator, a busy coordinator port, a bad --coordinator), and the
rendezvous itself between threads (processes that disagree on the cluster)."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from caee_jax.parallel import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = [sys.executable, os.path.join(ROOT, "launch", "run.py"), "--preset", "tiny", "--json", "--cpu-devices", "1"]
JOIN_TIMEOUT_S = 5
# Starting Python and importing JAX on a busy 2-core machine, on top of the join timeout.
SLACK_S = 25


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(coordinator: str, process_id: int, num_processes: int = 2) -> subprocess.Popen:
    cluster = ["--coordinator", coordinator, "--num-processes", str(num_processes)]
    cluster += ["--process-id", str(process_id), "--join-timeout", str(JOIN_TIMEOUT_S)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(RUN + cluster, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen, started: float) -> tuple[str, float]:
    """(stderr, seconds from `started` to exit); the process must fail with the one-line error status 2."""
    try:
        _, err = proc.communicate(timeout=JOIN_TIMEOUT_S + SLACK_S + 30)
    finally:
        proc.kill()
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return err, elapsed


def test_process_0_alone_names_the_process_that_never_joined():
    port = free_port()
    started = time.monotonic()
    err, elapsed = finish(start(f"127.0.0.1:{port}", 0), started)
    assert f"waiting for 1 more process at 127.0.0.1:{port}" in err, err
    want = f"error: process 1 of 2 never joined the coordinator at 127.0.0.1:{port} within {JOIN_TIMEOUT_S} s"
    assert want in err, err
    assert elapsed < JOIN_TIMEOUT_S + SLACK_S


def test_process_1_alone_cannot_reach_the_coordinator():
    port = free_port()
    started = time.monotonic()
    err, elapsed = finish(start(f"127.0.0.1:{port}", 1), started)
    assert f"process 1 of 2: waiting for the coordinator at 127.0.0.1:{port}" in err, err
    assert f"error: process 1 of 2 could not reach coordinator at 127.0.0.1:{port} within" in err, err
    assert elapsed < JOIN_TIMEOUT_S + SLACK_S


def busy_listener() -> socket.socket:
    """Another program's socket on a port: on every address, as JAX binds (JAX 0.10.2 then segfaults)."""
    if socket.has_dualstack_ipv6():
        return socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    return socket.create_server(("127.0.0.1", 0))


def test_busy_coordinator_port_is_an_error_on_every_process():
    with busy_listener() as other_program:
        port = other_program.getsockname()[1]
        started = time.monotonic()
        pair = [start(f"127.0.0.1:{port}", i) for i in range(2)]
        (err0, elapsed0), (err1, elapsed1) = [finish(p, started) for p in pair]
    assert f"error: coordinator port {port} is already in use" in err0, err0
    assert elapsed0 < SLACK_S  # no waiting: the port is checked first
    assert f"error: process 1 of 2 could not reach coordinator at 127.0.0.1:{port}" in err1, err1
    assert elapsed1 < 2 * JOIN_TIMEOUT_S + SLACK_S


def test_coordinator_without_a_port_is_a_one_line_error():
    err, elapsed = finish(start("127.0.0.1", 0), time.monotonic())
    assert "error: --coordinator '127.0.0.1' is not HOST:PORT with a port in 1..65535" in err, err
    assert elapsed < SLACK_S


def cluster_args(coordinator="127.0.0.1:9000", num_processes=2, process_id=0, join_timeout=JOIN_TIMEOUT_S):
    return argparse.Namespace(
        cpu_devices=None,
        mesh=None,
        coordinator=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        join_timeout=join_timeout,
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(coordinator="127.0.0.1:"), "is not HOST:PORT"),
        (dict(coordinator=":9000"), "is not HOST:PORT"),
        (dict(coordinator="host:http"), "is not HOST:PORT"),
        (dict(coordinator="host:65536"), "is not HOST:PORT"),
        (dict(coordinator="host:0"), "is not HOST:PORT"),
        (dict(num_processes=0), "--num-processes 0 is not at least 1"),
        (dict(process_id=2), "--process-id 2 is not in [0, 2)"),
        (dict(process_id=-1), "--process-id -1 is not in [0, 2)"),
        (dict(process_id=None), "go together"),
        (dict(join_timeout=0), "--join-timeout 0 is not a positive number"),
    ],
)
def test_bad_cluster_flags_stop_before_jax(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        distributed.join(cluster_args(**flags))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_bracketed_ipv6_coordinator_is_host_and_port():
    assert distributed.check_cluster("[::1]:9000", 2, 1, 5) == ("::1", 9000)


def rendezvous_all(num_processes_of: list[int], timeout_s: float = 3) -> list[str | None]:
    """Runs the rendezvous of process ids 0.. (process i believing in num_processes_of[i] processes) in threads;
    returns each one's JoinError message, None where it succeeded."""
    port = free_port()
    outcomes: list[str | None] = [None] * len(num_processes_of)

    def one(process_id: int) -> None:
        try:
            distributed.rendezvous("127.0.0.1", port, num_processes_of[process_id], process_id, timeout_s)
        except distributed.JoinError as error:
            outcomes[process_id] = str(error)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(num_processes_of))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=3 * timeout_s)
    return outcomes


def test_rendezvous_of_a_complete_cluster_succeeds():
    assert rendezvous_all([3, 3, 3]) == [None, None, None]


def test_processes_that_disagree_on_the_count_all_fail():
    want = "process 1 has --num-processes 3, process 0 has 2"
    assert rendezvous_all([2, 3]) == [want, want]


def test_a_missing_middle_process_is_named_to_everyone():
    outcomes = rendezvous_all([3, 3], timeout_s=2)
    assert outcomes[0].startswith("process 2 of 3 never joined the coordinator at 127.0.0.1:")
    assert outcomes[1] == outcomes[0]


def test_a_terminated_launcher_ends_its_local_cluster(tmp_path):
    """SIGTERM to a launcher running `--local-processes` (a job scheduler stopping it) ends every process of
    its cluster, even processes that ignore SIGTERM, as JAX's distributed runtime makes them."""
    worker = "import os, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    worker += f"open(os.path.join({str(tmp_path)!r}, str(os.getpid())), 'w').close(); time.sleep(60)"
    launcher = f"import sys; sys.path.insert(0, {ROOT!r}); from caee_jax.parallel.distributed import spawn_local\n"
    launcher += f"spawn_local(['-c', {worker!r}], 2)"
    proc = subprocess.Popen([sys.executable, "-c", launcher])
    deadline = time.monotonic() + SLACK_S
    while len(os.listdir(tmp_path)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = [int(name) for name in os.listdir(tmp_path)]
    assert len(workers) == 2
    proc.terminate()
    assert proc.wait(timeout=10) == 128 + 15
    deadline = time.monotonic() + 5
    while [pid for pid in workers if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in workers if alive(pid)]


def alive(pid: int) -> bool:
    """Whether `pid` runs (exists and is not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
