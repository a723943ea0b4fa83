"""The pinned held-out texts of other origin (`checkpoints_tools/foreign_texts.py`)."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from checkpoints_tools import foreign_texts
from checkpoints_tools.foreign_texts import ManifestError

MANIFESTS = os.path.join(os.path.dirname(__file__), "..", "configs", "heldout")


def small_manifest() -> dict:
    root = foreign_texts.package_root("numpy")
    data = open(os.path.join(root, "version.py"), "rb").read()
    return dict(
        format=foreign_texts.FORMAT, package="numpy", version=np.__version__, chars=100, file_chars=80,
        files=[dict(path="version.py", sha256=hashlib.sha256(data).hexdigest())],
    )  # fmt: skip


def test_build_takes_the_pinned_files_and_refuses_changed_ones():
    manifest = small_manifest()
    text = foreign_texts.build(manifest)
    assert text.startswith("# file: version.py\n") and len(text) == len("# file: version.py\n") + 80
    manifest["files"][0]["sha256"] = "0" * 64
    with pytest.raises(ManifestError, match=r"version.py: SHA-256 differs"):
        foreign_texts.build(manifest, "m.json")
    with pytest.raises(ManifestError, match="pins numpy 0.0"):
        foreign_texts.build(small_manifest() | dict(version="0.0"), "m.json")


def test_the_committed_manifests_build_their_text_and_share_little_with_the_stdlib():
    reference = foreign_texts.stdlib_lines()
    names = sorted(os.listdir(MANIFESTS))
    assert {"numpy.json", "flax.json", "numpy-1800k.json", "numpy-3600k.json"} <= set(names)
    for name in names:
        with open(os.path.join(MANIFESTS, name)) as f:
            manifest = json.load(f)
        text = foreign_texts.build(manifest)  # checks every file and the text's SHA-256
        assert len(text) == manifest["chars"]
        root = foreign_texts.package_root(manifest["package"])
        for entry in manifest["files"]:
            with open(os.path.join(root, entry["path"]), encoding="utf-8", errors="replace") as f:
                assert foreign_texts.overlap(f.read(), reference) <= foreign_texts.OVERLAP_LIMIT, entry["path"]
