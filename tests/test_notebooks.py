"""The notebooks run top to bottom in a kernel of the repo's venv (a failing cell fails the suite), are
stored without outputs, and have a rendered copy in docs/notebooks/."""

from __future__ import annotations

import os
import sys

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "notebooks"))
import render  # noqa: E402  (notebooks/render.py)

NOTEBOOKS = render.notebooks()


def test_there_are_notebooks_stored_without_outputs_and_rendered():
    assert len(NOTEBOOKS) >= 2
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        code = [cell for cell in book.cells if cell.cell_type == "code"]
        assert all(not cell.outputs and cell.execution_count is None for cell in code), path
        name = os.path.basename(path).removesuffix(".ipynb")
        assert os.path.exists(os.path.join(ROOT, "docs", "notebooks", f"{name}.html")), name


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path):
    book = render.execute(path)
    errors = [o for cell in book.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
