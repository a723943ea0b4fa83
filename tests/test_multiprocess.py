"""Real multi-process runs of launch/run.py: 2 processes x 4 CPU devices, one global 8-device mesh, loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = [sys.executable, os.path.join(ROOT, "launch", "run.py"), "--preset", "tiny", "--json"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(RUN + args, cwd=ROOT, env=env, text=True, **kwargs)


def pair_args(args: list[str]) -> list[list[str]]:
    """run.py arguments of processes 0 and 1 of a 2-process cluster with 4 CPU devices each."""
    cluster = ["--cpu-devices", "4", "--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2"]
    return [args + cluster + ["--process-id", str(i)] for i in range(2)]


def report(stdout: str) -> dict:
    """The JSON line of run.py's output (gloo prints its own lines too)."""
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def test_two_processes_generate_the_single_process_tokens():
    """Attention split (data_expert=8: the one prompt padded to 8 rows, one per device) over 2 processes'
    8 devices, and replicated (expert=2) over the 2-process cluster that `--local-processes 2` starts (its
    --slow-process is `relaunch_locally`'s, tested with the other launchers in test_straggler.py)."""
    args = ["--prompt-ids", "5,17,33,2,9", "--max-new-tokens", "12"]
    single = start(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pair = [
        start(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for a in pair_args(args + ["--mesh", "data_expert=8"])
    ]
    local = start(args + ["--local-processes", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    runs = [single, *pair, local]
    outputs = [p.communicate(timeout=300) for p in runs]
    for p, (_, err) in zip(runs, outputs, strict=True):
        assert p.returncode == 0, err[-2000:]
    want = report(outputs[0][0])
    assert want["processes"] == 1 and want["mesh"] is None
    for i, (out, _) in enumerate(outputs[1:3]):
        got = report(out)
        assert (got["process"], got["processes"], got["mesh"]) == (i, 2, "data=1,data_expert=8,tensor=1")
        assert got["generated_ids"] == want["generated_ids"] and len(got["generated_ids"]) == 12
    got = report(outputs[3][0])
    assert (got["process"], got["processes"], got["mesh"]) == (0, 2, "data=1,expert=2,tensor=1")
    assert got["generated_ids"] == want["generated_ids"]


@pytest.mark.parametrize("victim", [1, 0], ids=["worker-dies", "coordinator-dies"])
def test_when_one_process_dies_the_other_exits_with_an_error(tmp_path, victim):
    logs = [open(tmp_path / f"process{i}.log", "w+") for i in range(2)]
    args = ["--prompt-ids", "1,2,3", "--max-new-tokens", "400", "--mesh", "expert=8"]
    pair = [start(a, stdout=log, stderr=subprocess.STDOUT) for a, log in zip(pair_args(args), logs, strict=True)]
    survivor = pair[1 - victim]
    try:
        # Kill the victim once the two processes have joined their collectives (gloo reports connections).
        deadline = time.monotonic() + 120
        while "connected to 7 peer ranks" not in (tmp_path / f"process{victim}.log").read_text():
            assert time.monotonic() < deadline, "the processes never connected"
            assert pair[victim].poll() is None, "the victim exited on its own"
            time.sleep(0.2)
        pair[victim].kill()
        killed_at = time.monotonic()
        survivor.wait(timeout=60)  # bounded: heartbeat timeout (10 s) plus margin, never a hang
        waited = time.monotonic() - killed_at
    finally:
        for p in pair:
            p.kill()
            p.wait()
    log = (tmp_path / f"process{1 - victim}.log").read_text()
    assert survivor.returncode != 0
    assert "JAX distributed service detected fatal errors" in log, log[-3000:]
    assert waited < 60
