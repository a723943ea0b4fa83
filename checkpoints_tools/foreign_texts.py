"""Held-out evaluation texts of other origin than the training corpus: Python sources of installed packages.

The bundled model was trained on the Python standard library (`stdlib_corpus.py`); its `heldout.txt` is
stdlib code too. These texts come from packages installed in the venv from PyPI, which neither training
nor calibration reads:

  numpy   numpy 2.4.6's own Python sources: numerical library code, long NumPy-style docstrings
  flax    flax 0.12.8's Python sources: neural-network library code, type annotations, JAX idioms

`configs/heldout/{numpy,flax}.json` pin 120,000-character texts; `{numpy,flax}-480k.json` 4x longer ones
(the same selection continued: each starts with the shorter text), for evaluations of 32768 tokens;
`numpy-1800k.json` nearly all of numpy's files (481), for 131072 tokens; `numpy-3600k.json` up to 20,000
characters of each of 429 files (a selection of its own, not a continuation), for 262144 tokens.

A manifest pins each text (package, version, files in order with their SHA-256, the text's SHA-256):
building checks every file and the result against it, so the same manifest always gives the same bytes,
offline, or fails naming the file.

    python -m checkpoints_tools.foreign_texts select --package numpy --out configs/heldout/numpy.json
    python -m checkpoints_tools.foreign_texts build --manifest configs/heldout/numpy.json --out runs/heldout-numpy.txt

`select` takes the package's *.py files (tests included) in the order of the SHA-1 of their path, skips
any file sharing more than OVERLAP_LIMIT of its distinct long lines with the stdlib (vendored or copied
stdlib code), keeps the first --file-chars characters of each (many files, not a few long ones), and
stops at --chars characters. Each file is introduced by a `# file: PATH` line, as in
`heldout.txt`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os

from caee_jax.files import atomic_write
from checkpoints_tools import stdlib_corpus

FORMAT = "caee-foreign-text"
OVERLAP_LIMIT = 0.2  # largest share of a file's distinct long lines also found in the stdlib
LONG_LINE = 30  # characters (stripped): shorter lines ("return x", "else:") are common to any Python


class ManifestError(ValueError):
    """A manifest that cannot be read, or installed files that differ from it."""


def package_root(package: str) -> str:
    """The directory of an installed top-level package."""
    files = importlib.metadata.files(package) or []
    init = next((f for f in files if str(f) == f"{package}/__init__.py"), None)
    if init is None:
        raise ManifestError(f"package {package!r}: no {package}/__init__.py among its installed files")
    return os.path.dirname(str(init.locate()))


def long_lines(text: str) -> set[str]:
    return {line.strip() for line in text.splitlines() if len(line.strip()) >= LONG_LINE}


def stdlib_lines() -> set[str]:
    """Every distinct long line of the stdlib (both splits): what the model may have seen."""
    lines = set()
    for relative in stdlib_corpus.stdlib_files():
        lines |= long_lines(stdlib_corpus.read_text(relative))
    return lines


def overlap(text: str, reference: set[str]) -> float:
    """Share of the text's distinct long lines found in `reference` (0 for a text without long lines)."""
    own = long_lines(text)
    return len(own & reference) / len(own) if own else 0.0


def select(package: str, chars: int, file_chars: int) -> dict:
    """The manifest of a text of `chars` characters from `package`'s installed sources, at most
    `file_chars` of them from one file (fewer characters when the package has no more files to give: the
    manifest records the text's real length)."""
    root = package_root(package)
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d != "__pycache__")
        found += [os.path.relpath(os.path.join(directory, f), root) for f in files if f.endswith(".py")]
    found.sort(key=lambda path: hashlib.sha1(path.encode()).hexdigest())
    reference = stdlib_lines()
    chosen, skipped, total = [], [], 0
    for relative in found:
        with open(os.path.join(root, relative), "rb") as f:
            data = f.read()
        text = data.decode("utf-8", errors="replace")
        shared = overlap(text, reference)
        if shared > OVERLAP_LIMIT:
            skipped.append(dict(path=relative, stdlib_overlap=round(shared, 3)))
            continue
        chosen.append(dict(path=relative, sha256=hashlib.sha256(data).hexdigest(), stdlib_overlap=round(shared, 3)))
        total += len(_section(relative, text[:file_chars]))
        if total >= chars:
            break
    manifest = dict(
        format=FORMAT,
        package=package,
        version=importlib.metadata.version(package),
        chars=min(chars, total),
        file_chars=file_chars,
        overlap_limit=OVERLAP_LIMIT,
        files=chosen,
        skipped_for_stdlib_overlap=skipped,
    )
    manifest["text_sha256"] = hashlib.sha256(build(manifest).encode()).hexdigest()
    return manifest


def _section(relative: str, text: str) -> str:
    return f"# file: {relative}\n{text}"


def build(manifest: dict, where: str = "manifest") -> str:
    """The text a manifest pins, from the installed package; ManifestError names the file that differs."""
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{where}: field 'format' is {manifest.get('format')!r}, not {FORMAT!r}")
    package, version = manifest["package"], manifest["version"]
    installed = importlib.metadata.version(package)
    if installed != version:
        raise ManifestError(
            f"{where}: pins {package} {version}; {installed} is installed (pip install {package}=={version})"
        )
    root = package_root(package)
    parts = []
    for entry in manifest["files"]:
        path = os.path.join(root, entry["path"])
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as error:
            raise ManifestError(f"{where}: {path}: cannot read ({error.strerror})") from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ManifestError(f"{where}: {path}: SHA-256 differs from the manifest's {entry['sha256'][:12]}...")
        parts.append(_section(entry["path"], data.decode("utf-8", errors="replace")[: manifest["file_chars"]]))
    text = "".join(parts)[: manifest["chars"]]
    if "text_sha256" in manifest and hashlib.sha256(text.encode()).hexdigest() != manifest["text_sha256"]:
        raise ManifestError(f"{where}: the built text's SHA-256 differs from field 'text_sha256'")
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    chooser = commands.add_parser("select", help="write a manifest from an installed package")
    chooser.add_argument("--package", required=True)
    chooser.add_argument("--chars", type=int, default=120_000, help="length of the text (characters)")
    chooser.add_argument("--file-chars", type=int, default=6_000, help="characters taken from one file (at most)")
    chooser.add_argument("--out", required=True, help="the manifest (.json) to write")
    builder = commands.add_parser("build", help="write the text a manifest pins")
    builder.add_argument("--manifest", required=True)
    builder.add_argument("--out", required=True, help="the text file to write")
    args = parser.parse_args(argv)
    if args.command == "select":
        manifest = select(args.package, args.chars, args.file_chars)
        with atomic_write(args.out) as f:
            json.dump(manifest, f, indent=1)
            f.write("\n")
        print(
            f"{args.out}: {len(manifest['files'])} files of {args.package} {manifest['version']}, "
            f"{len(manifest['skipped_for_stdlib_overlap'])} skipped for stdlib overlap"
        )
        return
    with open(args.manifest) as f:
        manifest = json.load(f)
    text = build(manifest, args.manifest)
    with atomic_write(args.out) as f:
        f.write(text)
    print(f"wrote {len(text):,} characters of {manifest['package']} {manifest['version']} to {args.out}")


if __name__ == "__main__":
    main()
