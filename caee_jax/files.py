"""Writing files so that readers see the old content or the new one, never half of it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w"):
    """Yields a file opened with `mode` ("w" or "wb") at a temporary path beside `path`; on a clean exit
    it is flushed, fsynced and renamed over `path`, on an exception removed (`path` untouched).

    The temporary name is unique (concurrent writers never share it) and the file gets the usual
    permissions (0666 minus the umask), like any file `open` creates.
    """
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class LockedError(RuntimeError):
    """Another process holds the lock of an output location."""


@contextlib.contextmanager
def exclusive_lock(target: str):
    """Holds an advisory lock on output location `target` (file or directory) for the block: a second
    holder gets LockedError naming `target` and the pid that holds it. The lock is `<target>.lock` beside
    it (flock: released by the kernel when the holder dies, so a killed run never leaves it stale)."""
    path = os.path.abspath(target).rstrip(os.sep) + ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise LockedError(
                f"another run holds {target} (pid {holder}); wait for it or choose another output"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def fsync(path: str) -> None:
    """Flushes a file or directory to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
