"""Each notebook's .ipynb and its jupytext .py pair hold the same cells."""

import pathlib

import jupytext
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_three_notebooks():
  assert [p.stem for p in NOTEBOOKS] == ["01_quickstart", "02_multi_device", "03_sharpness_analysis"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_ipynb_and_py_are_in_sync(path):
  ipynb = jupytext.read(path)
  script = jupytext.read(path.with_suffix(".py"))
  cells = lambda nb: [(c.cell_type, c.source.strip()) for c in nb.cells]
  assert cells(ipynb) == cells(script)
  assert all(not c.get("outputs") for c in ipynb.cells if c.cell_type == "code")  # stripped outputs
