"""The benchmark scripts run (smoke mode); they assert correctness, never timings."""

import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


SMOKE_RUNS = [
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
]


@pytest.mark.parametrize("script,expected", SMOKE_RUNS)
def test_benchmark_smoke(script, expected):
  completed = subprocess.run([sys.executable, os.path.join(BENCHMARKS, script), "--quick"],
                             capture_output=True, text=True, timeout=600, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  for text in expected:
    assert text in completed.stdout


def test_device_session_script_runs_the_smoke_tested_benchmarks_within_one_device_call():
  """benchmarks/device_session.sh: valid bash; each check is a benchmark above; 8 minutes at most in all.

  (The device tool allows 10 minutes per command; the rest is start-up and the environment probe.)
  """
  path = os.path.join(BENCHMARKS, "device_session.sh")
  subprocess.run(["bash", "-n", path], check=True)
  with open(path, encoding="utf-8") as script:
    checks = [line.split() for line in script if line.startswith("check ")]
  scripts = {name for name, _ in SMOKE_RUNS}
  assert [check[3].split("/")[-1] for check in checks] == [
      "hessian_benchmark.py", "step_speed.py", "memory_and_groups.py", "lanczos_overheads.py"]
  assert all(check[3].split("/")[-1] in scripts for check in checks)
  assert sum(int(check[2]) for check in checks) <= 480
