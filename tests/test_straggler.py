"""A real straggler (`parallel/straggler.py`): one process made slower by a competing workload on its core,
selectable from the launchers (--slow-process), cleaned up on every exit path, recorded in cost tables."""

from __future__ import annotations

import dataclasses
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

from caee_jax.caee.cost_table import CostTableError, table_for
from caee_jax.calibration.tables import signature_of
from caee_jax.config import preset
from caee_jax.eval import results
from caee_jax.parallel import straggler
from caee_jax.parallel.distributed import spawn_local
from caee_jax.parallel.straggler import SlowProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = max(os.sched_getaffinity(0))
# A busy loop that reports, per 0.2 s window of wall time, the share of the window it ran on its core ("SHARE
# START", START the window's time.monotonic(), a clock every process shares), until killed (or 20 s, should
# the test die first). At real-time priority 1 (below the competitor's), so that other load on the core does
# not change what it measures. Its share, not its loop count: this VM's core speed drifts up to 1.6x between
# seconds (loop counts per window of an unslowed loop read 1.0M in one run and 1.6M in the next), which once
# made a 2x slowdown read 1.23x.
THROUGHPUT = """
import os, sys, time
os.sched_setaffinity(0, {%d})
os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
stop = time.monotonic() + 20
while time.monotonic() < stop:
    start, ran = time.monotonic(), time.thread_time()
    while time.monotonic() < start + 0.2:
        pass
    print((time.thread_time() - ran) / (time.monotonic() - start), start, flush=True)
"""


def shares_from(target: subprocess.Popen, since: float, count: int = 4) -> list[float]:
    """The target's share of its core in its next `count` windows that started after `since` (time.monotonic())."""
    shares = []
    while len(shares) < count:
        share, start = target.stdout.readline().split()
        if float(start) > since:
            shares.append(float(share))
    return shares


def helper_processes(pid: int) -> list[int]:
    """Live (not zombie) helpers and spinners slowing `pid`, found by their command line."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError, PermissionError):
            continue
        if b"--pid" in argv and argv[argv.index(b"--pid") + 1] == str(pid).encode() and state != "Z":
            found.append(int(entry))
    return found


def gone(pid: int, timeout_s: float = 5.0) -> bool:
    """Whether every helper and spinner slowing `pid` has ended within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while helper_processes(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not helper_processes(pid)


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.timing
def test_a_slowed_process_gets_about_one_over_factor_of_its_core():
    """A busy process's share of its core, before and while it is slowed 2x: less than 1/1.5 of it (a helper
    that does nothing fails), and the competitor takes about half of the core."""
    target = subprocess.Popen([sys.executable, "-c", THROUGHPUT % CORE], stdout=subprocess.PIPE, text=True)
    try:
        before = statistics.median(shares_from(target, since=0.0))
        helper = straggler.start(target.pid, 2.0, [CORE])
        spinners = [p for p in helper_processes(target.pid) if p != helper.pid]
        cpu_before, start = sum(_cpu_seconds(p) for p in spinners), time.monotonic()
        during = statistics.median(shares_from(target, since=start))  # windows entirely slowed
        share = (sum(_cpu_seconds(p) for p in spinners) - cpu_before) / (time.monotonic() - start)
        straggler.stop(helper)
    finally:
        target.kill()
        target.wait()
    assert len(spinners) == 1
    assert before / during > 1.5, (before, during)
    assert 0.4 < share < 0.6, share


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_a_helper_that_cannot_start_says_why():
    ended = subprocess.Popen(["true"])
    ended.wait()
    with pytest.raises(straggler.SlowdownError, match=f"no process {ended.pid}"):
        straggler.start(ended.pid, 2.0, [CORE])


def test_stop_leaves_nothing_behind(sleeper):
    helper = straggler.start(sleeper.pid, 2.0, [CORE])
    assert len(helper_processes(sleeper.pid)) == 2  # the helper and its spinner
    straggler.stop(helper)
    assert helper.returncode == 0 and gone(sleeper.pid)


def test_the_helper_ends_with_the_slowed_process(sleeper):
    helper = straggler.start(sleeper.pid, 2.0, [CORE])
    sleeper.kill()
    sleeper.wait()
    assert helper.wait(timeout=5) == 0 and gone(sleeper.pid)


def test_a_killed_helper_takes_its_spinners_along(sleeper):
    helper = straggler.start(sleeper.pid, 2.0, [CORE])
    helper.kill()
    helper.wait()
    assert gone(sleeper.pid)


def test_a_killed_launcher_leaves_nothing_behind(sleeper):
    """The launcher that started the helper (it watches it) dies of SIGKILL: helper and spinners end."""
    code = f"import sys, time; sys.path.insert(0, {ROOT!r}); from caee_jax.parallel import straggler; import os\n"
    code += f"straggler.start({sleeper.pid}, 2.0, [{CORE}], (os.getpid(),)); print('ready', flush=True); time.sleep(60)"
    launcher = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert launcher.stdout.readline().strip() == "ready"
    assert len(helper_processes(sleeper.pid)) == 2
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    assert gone(sleeper.pid)


@pytest.mark.parametrize(
    "script, code",
    [
        ("import os; print(os.environ['CAEE_SLOW_PROCESS'])", 0),  # normal exit
        ("import sys; sys.exit(3)", 3),  # a crash
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 9),  # killed
    ],
)
def test_a_slowed_local_cluster_leaves_nothing_behind(script, code):
    """`spawn_local` with a slowed process: every process sees the condition; whichever way the processes
    end, no helper or spinner is left (the helper's cmdline names the slowed process's pid)."""
    before = {p for p in os.listdir("/proc") if p.isdigit()}
    returned, stdout = spawn_local(["-c", script], 2, slow=SlowProcess(1, 2.0))
    assert returned == code
    assert stdout.strip() == ("1:2" if code == 0 else "")
    new = {p for p in os.listdir("/proc") if p.isdigit()} - before
    assert not [p for p in new if b"straggler.py" in _command_line(p)]


def _command_line(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):  # ended meanwhile
        return b""


@pytest.mark.parametrize(
    "text, message",
    [
        ("1:1", "not in (1, 10]"),
        ("1:0.5", "not in (1, 10]"),
        ("1:11", "not in (1, 10]"),
        ("1", "not ID:FACTOR"),
        ("a:2", "not ID:FACTOR"),
        ("-1:2", "process id >= 0"),
    ],
)
def test_bad_slow_process(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")):
        SlowProcess.parse(text)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--local-processes", "2", "--slow-process", "2:2"], "process 2 is not in [0, 2)"),
        (["--slow-process", "1:2"], "--slow-process needs --local-processes"),
        (["--local-processes", "2", "--slow-process", "1:1"], "not in (1, 10]"),
    ],
)
@pytest.mark.parametrize("script", ["launch/calibrate.py", "launch/eval.py", "launch/run.py"])
def test_bad_flags_at_the_launchers(script, argv, fragment, tmp_path):
    """One clear error line and status 2, before any cluster process starts."""
    argv = [script, *argv] + ([] if script == "launch/run.py" else ["--out", str(tmp_path)])
    result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2, result.stderr[-2000:]
    assert fragment in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]


def test_a_slowed_table_is_never_used_unslowed(monkeypatch, tmp_path):
    """The condition is part of the table's signature: stored apart, and a missing slowed table names the
    command that calibrates it."""
    quiet = signature_of(preset("tiny"), None, "float32", "loop")
    monkeypatch.setenv(straggler.ENV, "1:2")
    slowed = signature_of(preset("tiny"), None, "float32", "loop")
    assert quiet.slowed == "" and slowed.slowed == "1:2"
    assert slowed.slug() == quiet.slug() + "-slow1x2"
    assert quiet.differences(slowed) == ["slowed: table '', here '1:2'"]
    slowed = dataclasses.replace(slowed, num_processes=2)
    with pytest.raises(CostTableError, match="launch/calibrate.py --local-processes 2 --slow-process 1:2"):
        table_for(slowed, str(tmp_path))


def test_a_slowed_evaluation_never_resumes_an_unslowed_one():
    """The condition is in every eval record's provenance: a case measured unslowed is not this case slowed."""
    case = dict.fromkeys(results.CASE, 1)
    quiet = {**dict.fromkeys((*results.EXPERIMENT, *results.PER_CASE), "same"), "slowed": None}
    slowed = {**quiet, "slowed": "1:2"}
    assert results.key({**case, "provenance": quiet}) != results.key({**case, "provenance": slowed})
    with pytest.raises(results.ResultsError, match="measured with slowed None, this run has '1:2'"):
        results.check("results.jsonl", [{**case, "provenance": quiet}], slowed, [case])
