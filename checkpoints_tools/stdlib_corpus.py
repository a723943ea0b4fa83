"""The training corpus: the Python standard library source of the running interpreter.

Available offline on every machine. Files are split deterministically by a hash of their path
relative to the stdlib root, so held-out files are never trained on, whatever the order of listing.

    python -m checkpoints_tools.stdlib_corpus --split train --chars 1500000 --out runs/stdlib-train.txt

writes a text of one split (training files in a seeded random order): e.g. calibration text for
`launch/calibrate_means.py` that shares no file with the bundled model's `heldout.txt`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sysconfig

from caee_jax.files import atomic_write

HELDOUT_PERCENT = 3


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def is_heldout(relative_path: str) -> bool:
    """True for about HELDOUT_PERCENT% of files, decided by the SHA-1 of the relative path."""
    digest = hashlib.sha1(relative_path.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT


def stdlib_files(root: str | None = None) -> list[str]:
    """Relative paths of every *.py under the stdlib root (site-packages excluded), sorted."""
    root = root or stdlib_root()
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "__pycache__"))
        found += [os.path.relpath(os.path.join(directory, f), root) for f in files if f.endswith(".py")]
    return sorted(found)


def split_files(root: str | None = None) -> tuple[list[str], list[str]]:
    """(training files, held-out files), relative to the stdlib root."""
    files = stdlib_files(root)
    return [f for f in files if not is_heldout(f)], [f for f in files if is_heldout(f)]


def read_text(relative_path: str, root: str | None = None) -> str:
    """The file's text (UTF-8; undecodable bytes replaced, a handful of stdlib test files have them)."""
    with open(os.path.join(root or stdlib_root(), relative_path), encoding="utf-8", errors="replace") as f:
        return f.read()


def concatenated(relative_paths: list[str], chars: int, root: str | None = None) -> str:
    """The first `chars` characters of the files in order, each introduced by a `# file: PATH` line."""
    parts, total = [], 0
    for f in relative_paths:
        text = f"# file: {f}\n" + read_text(f, root)
        parts.append(text)
        total += len(text)
        if total >= chars:
            break
    return "".join(parts)[:chars]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=["train", "heldout"], required=True)
    parser.add_argument("--chars", type=int, required=True, help="length of the text (characters)")
    parser.add_argument("--seed", type=int, default=0, help="order of the training files (held-out: listed order)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    train, heldout = split_files()
    files = random.Random(args.seed).sample(train, len(train)) if args.split == "train" else heldout
    with atomic_write(args.out) as f:
        f.write(concatenated(files, args.chars))
    print(f"wrote {args.chars:,} characters of the {args.split} split to {args.out}")


if __name__ == "__main__":
    main()
