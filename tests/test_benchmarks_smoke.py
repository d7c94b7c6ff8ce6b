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
    ("allocators.py", ["| allocator | 232 MB fill after a free", "| glibc |", "| glibc, no mmap |",
                       "eigenvalues, every allocator and process vs glibc's first: max relative difference"]),
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


def _benchmark_main(script):
  """The script's ``main(argv)``, imported in process as the script itself would import it."""
  import importlib.util  # pylint: disable=import-outside-toplevel

  if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)
  spec = importlib.util.spec_from_file_location(f"benchmark_{script[:-3]}", os.path.join(BENCHMARKS, script))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclasses (Flax modules) look their module up there
  spec.loader.exec_module(module)
  return module.main


BAD_ARGUMENTS = [
    ("step_speed.py", ["--rounds", "0"], "argument --rounds: expected a positive integer, got 0"),
    ("step_speed.py", ["--steps", "7"], "--steps: a multiple of 5, got 7"),
    ("step_speed.py", ["--only", "sam,lion"], "--only: a comma list of variants from"),
    ("step_speed.py", ["--only", ","], "--only: a comma list of variants from"),
    ("hessian_benchmark.py", ["--sections", "5"], "--sections: digits from 1234"),
    ("hessian_benchmark.py", ["--batch-size", "1"], "--batch-size: at least 2"),
    ("hessian_benchmark.py", ["--lanczos-rounds", "-1"], "argument --lanczos-rounds: expected a positive integer"),
    ("lanczos_overheads.py", ["--rounds", "x"], "argument --rounds: expected a positive integer, got 'x'"),
    ("allocators.py", ["--idle", "-1"], "--idle: seconds, at least 0, got -1.0"),
    ("allocators.py", ["--rounds", "0"], "argument --rounds: expected a positive integer, got 0"),
    ("memory_and_groups.py", ["--rounds", "0"], "argument --rounds: expected a positive integer, got 0"),
    ("rho_sweep.py", ["--models", "wrn,resnet"], "--models: a comma list from wrn,attention,gcn"),
    ("generalization.py", ["--settings", "digits"], "argument --settings: expected DATASET:LABEL_NOISE pairs"),
    ("generalization.py", ["--settings", "digits:0.0,mnist:0.4"], "unknown dataset 'mnist'"),
    ("generalization.py", ["--optimizers", "sgd,lion"], "unknown optimizer(s) lion"),
    ("generalization.py", ["--seeds", "0,,1"], "argument --seeds: expected a comma list of integers"),
    ("m_sharpness.py", ["--group-sizes", "8,48"], "--group-size must be a positive divisor of --batch-size (128)"),
    ("m_sharpness.py", ["--settings", "digits:1.5"], "--label-noise must be a fraction in [0, 1], got 1.5"),
]


@pytest.mark.parametrize("script,arguments,message", BAD_ARGUMENTS)
def test_bad_arguments_fail_before_any_work(script, arguments, message, capsys):
  """A bad option is a usage error (exit 2) before anything is timed or trained, not a NaN median or a crash
  after the other runs (generalization.py and m_sharpness.py check every planned `sam-optax compare` first)."""
  main = _benchmark_main(script)
  with pytest.raises(SystemExit) as raised:
    main(arguments)
  assert raised.value.code == 2
  assert message in capsys.readouterr().err
