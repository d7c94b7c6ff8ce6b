"""Shared helpers of the benchmark scripts: interleaved timing and XLA's own figures."""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import jax
import numpy as np


def xla_figures(jitted: Callable[..., Any], *args, **kwargs) -> dict:
  """XLA's ``cost_analysis()`` flops and ``memory_analysis()`` temp bytes of a compiled call."""
  compiled = jitted.lower(*args, **kwargs).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  memory = compiled.memory_analysis()
  return {
      "compiled": compiled,
      "flops": float(cost.get("flops", float("nan"))) if cost else float("nan"),
      "temp_bytes": int(getattr(memory, "temp_size_in_bytes", -1)) if memory is not None else -1,
  }


def interleaved_medians(runners: Mapping[str, Callable[[], Any]], *, rounds: int, steps: int) -> dict:
  """Median seconds per call of each runner, timed round-robin to share the machine's noise.

  Each round runs every runner ``steps`` times (blocking on the result once at
  the end), in a rotating order; the median over rounds is returned.
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
      jax.block_until_ready(out)
      samples[name].append((time.perf_counter() - start) / steps)
  return {name: float(np.median(values)) for name, values in samples.items()}


def verdict(ok: bool) -> str:
  return "PASS" if ok else "MISS"
