"""Every ```python block of README.md runs, in order, in one namespace.

(Fragments that are not meant to run on their own are fenced ```py.) The
blocks print values they claim in comments (``# [0.6 0.8]``); those claims are
checked too.
"""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_quick_start_commands():
  text = README.read_text()
  assert "## Quick start" in text
  assert 'python -m pip install -e ".[experiments]" && python -m sam_optax compare' in text
  ci = (README.parent / ".ci" / "run").read_text()
  test_command = 'python -m pip install -q -e ".[test]" && python -m pytest -q -n 2'
  assert test_command in text and test_command in ci


def test_readme_python_blocks_run(capsys):
  blocks = python_blocks()
  assert len(blocks) >= 4
  namespace = {"__name__": "readme"}
  for block in blocks:
    exec(compile(block, str(README), "exec"), namespace)  # pylint: disable=exec-used
  printed = capsys.readouterr().out
  # The helper example prints the values the README states.
  assert "[0.6 0.8]" in printed and "[0.3 0.4]" in printed
