"""User mistakes at every launcher: one `error: ...` line on stderr, exit status 2, no traceback (--debug
keeps it); errors from outside our own `raise` statements stay tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from caee_jax import cli
from caee_jax.parallel.mesh import parse_mesh_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(*argv):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, cwd=ROOT)


def one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert all(f in lines[0] for f in fragments), lines[0]


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["launch/run.py", "--checkpoint", "/nonexistent"], ["/nonexistent", "not a checkpoint directory"]),
        (["launch/run.py", "--preset", "tiny", "--mesh", "expert=3"], ["expert=3", "needs 3 devices"]),
        (["launch/run.py", "--prompt", ""], ["prompts[0]", "empty"]),
        (["launch/run.py", "--prompt", "x y " * 1500], ["exceeds the cache", "max_position_embeddings 2048"]),
        (["launch/run.py", "--chat", "hi"], ["caee-small", "no chat template"]),
        (["launch/run.py", "--weights", "fp8", "--prune", "caee=0.8"], ["weights='fp8'", "weights='f32'"]),
        (["launch/eval.py", "--preset", "tiny", "--mesh", "expert=3"], ["expert=3"]),
        (
            ["launch/eval.py", "--weights", "fp8", "--rules", "caee", "--out", "/tmp/caee-fp8-refused"],
            ["weights='fp8'"],
        ),
        (["launch/calibrate.py", "--model", "/nonexistent"], ["/nonexistent"]),
        (["launch/plan.py", "--preset", "tiny", "--mesh", "expert=3"], ["experts", "mesh axis 'expert' of size 3"]),
    ],
)
def test_a_user_mistake_is_one_line(argv, fragments):
    one_line_error(launch(*argv), *fragments)


@pytest.mark.parametrize("flag", ["--rounds", "--repeats", "--cases-per-size"])
def test_calibrate_refuses_counts_below_one(flag):
    result = launch("launch/calibrate.py", "--preset", "tiny", flag, "0")
    assert result.returncode == 2
    assert f"argument {flag}: '0' is not a whole number >= 1" in result.stderr.strip().splitlines()[-1]


def test_debug_keeps_the_traceback():
    result = launch("launch/run.py", "--checkpoint", "/nonexistent", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "FileNotFoundError: /nonexistent: not a checkpoint directory"


def test_only_our_raise_statements_are_mistakes(capsys):
    assert cli.run_main(lambda argv: parse_mesh_spec("expert=3", 1), []) == 2
    assert capsys.readouterr().err.startswith("error: mesh spec 'expert=3'")
    with pytest.raises(ValueError, match="cannot reshape"):  # numpy's ValueError is a bug here: traceback
        cli.run_main(lambda argv: np.zeros(3).reshape(2), [])
    with pytest.raises(ValueError, match="invalid literal"):  # so is a conversion of ours not meant to fail
        cli.run_main(lambda argv: int("x"), [])
