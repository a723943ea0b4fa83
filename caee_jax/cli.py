"""The launchers' answer to a user mistake: one `error: ...` line on stderr and exit status 2, no traceback.

A mistake is an error our code raises on purpose about its input: a `ValueError` (ConfigError,
MeshError, CostTableError, ...) whose innermost traceback frame is a `raise` statement in this
project, or a missing / unreadable file met by this project's code. The same types raised elsewhere
(inside numpy or JAX, or by a Python expression of ours that was not meant to fail) are bugs and keep
their traceback; `--debug` keeps every traceback.
"""

from __future__ import annotations

import argparse
import linecache
import os
import sys
from collections.abc import Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUR_DIRS = tuple(os.path.join(ROOT, name) + os.sep for name in ("caee_jax", "launch", "checkpoints_tools"))
FILE_MISTAKES = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)


def add_debug_flag(parser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user mistake, not one line")


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (argparse names the flag in its error)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def run_main(main: Callable[[Sequence[str]], int], argv: Sequence[str] | None = None) -> int:
    """main(argv)'s exit status; a user mistake (see the module docstring) prints `error: MESSAGE` on stderr
    and gives 2, unless argv holds --debug."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv)
    except (ValueError, *FILE_MISTAKES) as error:
        if "--debug" in argv or not is_mistake(error):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


def is_mistake(error: BaseException) -> bool:
    """True when `error` was raised by this project's code about its input (module docstring)."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = os.path.abspath(tb.tb_frame.f_code.co_filename)
    if not filename.startswith(OUR_DIRS):
        return False
    if isinstance(error, FILE_MISTAKES):
        return True
    return linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise")
