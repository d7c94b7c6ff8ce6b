"""The benchmark scripts run (smoke mode); they assert correctness, never timings."""

import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.mark.parametrize("script,expected", [
    ("step_speed.py", ["correctness: sam_perturb step == hand-written SAM step == optax.contrib.sam step: OK",
                       "| step | ms/step | × base |", "| target | measured | verdict |"]),
    ("memory_and_groups.py", ["target: n=4 temp bytes <= 0.4x n=1",
                              "target: every n equals the big-batch SAM step (<= 1e-5): ",
                              "| m=8 |"]),
    ("hessian_benchmark.py", ["| HVP / gradient time |", "| method | HVPs |",
                              "| iterations on this backend for this model: ",
                              "instead: HVPs, seconds, time / (HVPs x one HVP) |"]),
    ("lanczos_overheads.py", ["| one iteration (ends with [alpha, beta] on the host) |", "| device weight |",
                              "| last batch + three-term step |"]),
])
def test_benchmark_smoke(script, expected):
  completed = subprocess.run([sys.executable, os.path.join(BENCHMARKS, script), "--quick"],
                             capture_output=True, text=True, timeout=600, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  for text in expected:
    assert text in completed.stdout
