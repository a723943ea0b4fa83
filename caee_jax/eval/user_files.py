"""Files a user names on the command line: errors that say which file and what is wrong with it, raised
before any long work (a wrong text or an unwritable output found after an hour of calibration costs the hour)."""

from __future__ import annotations

import os
import tempfile


class UserFileError(ValueError):
    """A named input that cannot be read as expected, or an output location that cannot be written."""


def read_text(path: str, flag: str) -> tuple[str, bytes]:
    """The UTF-8 text of `path` and its bytes; `flag` (e.g. "--eval-file") names the option in errors."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise UserFileError(f"{flag} {path}: cannot read ({error.strerror})") from None
    try:
        return data.decode("utf-8"), data
    except UnicodeDecodeError as error:
        raise UserFileError(f"{flag} {path}: not UTF-8 text (byte {error.start}: {error.reason})") from None


def check_writable(path: str, flag: str, directory: bool = False) -> None:
    """Creates the directory `path` (or a file's parent) and writes a scratch file there, so a read-only or
    mistyped output fails now rather than when the results are ready."""
    where = path if directory else os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(where, exist_ok=True)
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as error:
        raise UserFileError(f"{flag} {path}: cannot write there ({error.strerror or error})") from None
    if not directory and os.path.isdir(path):
        raise UserFileError(f"{flag} {path}: is a directory, expected a file name")
