"""Shared helpers of the benchmark scripts: interleaved timing and XLA's own figures."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np


def positive_int(text: str) -> int:
  """``argparse`` type: an integer >= 1 (``--rounds 0`` would time nothing and print NaN medians)."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
  return value


def int_list(text: str) -> str:
  """``argparse`` type: a non-empty comma list of integers (``"0,1,2"``), kept as text for the command line."""
  items = [item.strip() for item in text.split(",")]
  try:
    [int(item) for item in items]  # pylint: disable=expression-not-assigned
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a comma list of integers such as 0,1,2, got {text!r}") from None
  return ",".join(items)


def dataset_settings(text: str) -> list:
  """``argparse`` type: a non-empty comma list of ``DATASET:LABEL_NOISE`` pairs, as ``[(dataset, noise), ...]``.

  The noise stays text (it names output folders); ``sam-optax compare`` checks both values.
  """
  pairs = [item.strip().split(":") for item in text.split(",")]
  if not all(len(pair) == 2 and all(pair) for pair in pairs):
    raise argparse.ArgumentTypeError(f"expected DATASET:LABEL_NOISE pairs such as digits:0.0,digits:0.4, got {text!r}")
  return [tuple(pair) for pair in pairs]


def check_runs(parser: argparse.ArgumentParser, commands: list) -> None:
  """Checks every planned ``python -m sam_optax compare ...`` command before the first one runs."""
  from sam_optax.experiments.cli import UsageError, check_compare  # pylint: disable=import-outside-toplevel

  for command in commands:
    try:
      check_compare(command[command.index("compare") + 1:])
    except UsageError as error:
      parser.error(f"{error} (in: sam-optax {' '.join(command[command.index('compare'):])})")


def xla_figures(jitted: Callable[..., Any], *args, **kwargs) -> dict:
  """XLA's ``cost_analysis()`` flops and bytes accessed, and ``memory_analysis()`` temp bytes, of a compiled call."""
  compiled = jitted.lower(*args, **kwargs).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  memory = compiled.memory_analysis()
  return {
      "compiled": compiled,
      "flops": float(cost.get("flops", float("nan"))) if cost else float("nan"),
      "bytes_accessed": float(cost.get("bytes accessed", float("nan"))) if cost else float("nan"),
      "temp_bytes": int(getattr(memory, "temp_size_in_bytes", -1)) if memory is not None else -1,
  }


def interleaved_samples(runners: Mapping[str, Callable[[], Any]], *, rounds: int, steps: int,
                        block_each_call: bool = False) -> dict:
  """Seconds per call of each runner in each round, timed round-robin to share the machine's noise.

  Each round runs every runner ``steps`` times, in a rotating order, blocking
  on the result once at the end (or after every call with
  ``block_each_call``: independent calls on the same inputs could otherwise
  overlap on XLA:CPU). Returns ``{name: array of rounds}``; sample ``i`` of
  two runners were measured back to back, so their ratio is paired.
  """
  names = list(runners)
  samples = {name: [] for name in names}
  for round_index in range(rounds):
    order = names[round_index % len(names):] + names[: round_index % len(names)]
    for name in order:
      start = time.perf_counter()
      out = None
      for _ in range(steps):
        out = runners[name]()
        if block_each_call:
          jax.block_until_ready(out)
      jax.block_until_ready(out)
      samples[name].append((time.perf_counter() - start) / steps)
  return {name: np.asarray(values) for name, values in samples.items()}


def interleaved_medians(runners: Mapping[str, Callable[[], Any]], *, rounds: int, steps: int,
                        block_each_call: bool = False) -> dict:
  """Median seconds per call of each runner over :func:`interleaved_samples` rounds."""
  samples = interleaved_samples(runners, rounds=rounds, steps=steps, block_each_call=block_each_call)
  return {name: float(np.median(values)) for name, values in samples.items()}


def paired_ratio(numerator: np.ndarray, denominator: np.ndarray, *, resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float, float]:
  """Median of the per-round ratios and its 95 % bootstrap confidence interval.

  Round ``i`` of both series ran back to back, so the per-round ratio cancels
  most of a shared machine's slow drifts; the bootstrap over rounds says how
  far the median ratio itself can move with this many rounds.
  """
  ratios = np.asarray(numerator) / np.asarray(denominator)
  rng = np.random.default_rng(seed)
  medians = np.median(rng.choice(ratios, size=(resamples, ratios.size), replace=True), axis=1)
  low, high = np.percentile(medians, [2.5, 97.5])
  return float(np.median(ratios)), float(low), float(high)


def verdict(ok: bool) -> str:
  return "PASS" if ok else "MISS"


def allocator() -> str:
  """Which C allocator this process's buffers come from, for a benchmark's header.

  On XLA:CPU every buffer is ``malloc``'d; on this project's VMs the choice
  moves CPU timings by up to 1.5x (``benchmarks/allocators.py``).
  """
  preload = os.environ.get("LD_PRELOAD", "")
  if "jemalloc" in preload:
    return f"jemalloc (LD_PRELOAD, MALLOC_CONF={os.environ.get('MALLOC_CONF', '')!r})"
  if preload:
    return f"LD_PRELOAD={preload}"
  tunables = os.environ.get("GLIBC_TUNABLES")
  return f"the C library's (GLIBC_TUNABLES={tunables})" if tunables else "the C library's"
