"""Executes the notebooks and writes their rendered copies with outputs to docs/notebooks/NAME.html.

    .venv/bin/python notebooks/render.py                 # every notebook
    .venv/bin/python notebooks/render.py 01_quickstart   # one

The notebooks themselves are stored without outputs; tests/test_notebooks.py executes them in the suite.
Each runs in a kernel of this Python (the repo's venv), from the notebooks/ directory.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import nbclient
import nbconvert
import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(os.path.dirname(HERE), "docs", "notebooks")
TIMEOUT_S = 300  # per cell


def notebooks() -> list[str]:
    return sorted(os.path.join(HERE, n) for n in os.listdir(HERE) if n.endswith(".ipynb"))


def execute(path: str) -> nbformat.NotebookNode:
    """The notebook at `path`, executed top to bottom in a python3 kernel of this interpreter; a failing
    cell raises nbclient's CellExecutionError (with the cell and its traceback)."""
    book = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        book, timeout=TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": HERE}}
    )
    client.execute()
    return book


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebook names without .ipynb (default: all)")
    args = parser.parse_args()
    paths = [os.path.join(HERE, f"{n}.ipynb") for n in args.names] or notebooks()
    os.makedirs(OUT, exist_ok=True)
    exporter = nbconvert.HTMLExporter(embed_images=True)
    for path in paths:
        start = time.perf_counter()
        book = execute(path)
        page, _ = exporter.from_notebook_node(book)
        out = os.path.join(OUT, os.path.basename(path).removesuffix(".ipynb") + ".html")
        with open(out, "w") as f:
            f.write(page)
        print(f"{os.path.basename(path)}: executed in {time.perf_counter() - start:.1f} s -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
