"""Atomic writes (readers see the old file or the new one, never a part; no temporary is left) and
exclusive output locks."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from caee_jax.files import atomic_write, exclusive_lock


def test_replaces_the_file_with_the_usual_permissions(tmp_path):
    path = tmp_path / "table.json"
    path.write_text("old")
    old_umask = os.umask(0o022)
    try:
        with atomic_write(str(path)) as f:
            f.write("new")
    finally:
        os.umask(old_umask)
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["table.json"]


def test_an_error_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "means.npz"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(str(path), "wb") as f:
        f.write(b"half")
        raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["means.npz"]


def test_a_second_holder_of_an_output_lock_is_refused_with_the_holders_pid(tmp_path):
    out = str(tmp_path / "converted")
    with exclusive_lock(out):
        child = subprocess.run(
            [sys.executable, "-c", f"from caee_jax.files import exclusive_lock\nwith exclusive_lock({out!r}): pass"],
            capture_output=True,
            text=True,
        )
        assert child.returncode != 0
        assert f"LockedError: another run holds {out} (pid {os.getpid()})" in child.stderr
    with exclusive_lock(out):  # released on exit: taken again
        pass
