"""The C allocator under the Hessian analysis on XLA:CPU, measured side by side.

XLA:CPU takes every buffer from the process's ``malloc``. glibc serves
blocks of 32 MB and more (an 11.6M-parameter vector is 46 MB) with a fresh
``mmap`` and gives them back with ``munmap`` when freed, so each such buffer
is page-faulted in again. In a virtual machine whose balloon reports free
pages to the hypervisor (this project's Firecracker VMs do: ``virtio_balloon``,
``kdamond``), memory given back is returned to the host within seconds, and
touching it again costs a fault in the host too: here, filling 232 MB of
fresh memory took ~30 ms right after the last free and 0.3-2.4 s after 2-5 s
idle. A Lanczos call needs ~1.2 GB that the HVP loop it is compared with does
not (the Krylov basis and the eigenvectors), so its time, and the ratio
``top_k=5 time / (HVPs x one HVP)``, depend on the allocator and on how long
the memory sat idle.

This script measures the top_k=5 case of ``hessian_benchmark.py`` section 4
(the 11.6M-parameter MLP, Fashion-MNIST, 2 batches of 128) in fresh child
processes, one per allocator and round, the allocators taking turns:

- ``glibc``: the default;
- ``glibc, no mmap``: ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...``
  (large blocks from the heap, which is never trimmed: freed memory stays in the process);
- ``jemalloc``: ``LD_PRELOAD`` of ``libjemalloc.so.2`` with ``MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1``
  (freed memory stays in the process; Debian package ``libjemalloc2``; left out when not installed).

Each child prints the refault probe (232 MB filled right after a free and
after ``--idle`` seconds idle), one multi-batch HVP (HVPs-used back to back,
median of the rounds inside the child), the top_k=5 call and their ratio. It
prints figures, asserts only that every allocator finds the same eigenvalues.

Usage::

    python benchmarks/allocators.py             # ~10 minutes on 2 CPU cores
    python benchmarks/allocators.py --quick     # smoke run (small MLP)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import positive_int  # noqa: E402

JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
GLIBC_NO_MMAP = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def jemalloc_path():
  """``libjemalloc.so.2`` where Debian (any architecture) or a plain ``/usr/lib`` install puts it, else None."""
  found = sorted(glob.glob("/usr/lib/*/libjemalloc.so.2") + glob.glob("/usr/lib/libjemalloc.so.2"))
  return found[0] if found else None


def allocators() -> dict:
  """Allocator name -> environment changes for the child; jemalloc only where installed."""
  table = {"glibc": {}, "glibc, no mmap": {"GLIBC_TUNABLES": GLIBC_NO_MMAP}}
  path = jemalloc_path()
  if path:
    table["jemalloc"] = {"LD_PRELOAD": path, "MALLOC_CONF": JEMALLOC_CONF}
  return table


def refault_ms(idle_s: float, megabytes: int = 232) -> tuple:
  """Milliseconds to fill ``megabytes`` of fresh memory right after freeing as much, and after ``idle_s`` idle."""
  count = megabytes * 1_000_000 // 4
  np.ones(count, np.float32)  # touched once, then freed
  start = time.perf_counter()
  block = np.ones(count, np.float32)
  right_after = (time.perf_counter() - start) * 1e3
  del block
  time.sleep(idle_s)
  start = time.perf_counter()
  np.ones(count, np.float32)
  return right_after, (time.perf_counter() - start) * 1e3


def child(quick: bool, rounds: int, idle_s: float) -> None:
  """One allocator's measurement, in this process; prints one JSON line."""
  sys.path.insert(0, os.path.dirname(HERE))  # this checkout's sam_optax
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from hessian_benchmark import MLP, images, make_loss, two_halves  # pylint: disable=import-outside-toplevel
  from sam_optax import analysis  # pylint: disable=import-outside-toplevel

  fresh, idle = refault_ms(idle_s)
  batch, _ = images(32 if quick else 256)
  model = MLP((256, 128) if quick else (4096, 2048))
  params = model.init(jax.random.key(2), batch["x"][:1])["params"]
  loss_fn = make_loss(model)
  batches, _ = two_halves(batch)
  operator = analysis.hessian_operator(loss_fn, params, batches)
  v = jax.tree.map(jnp.ones_like, params)
  jax.block_until_ready(operator.matvec(v))

  def top5():
    result = analysis.hessian_eigenvalues(loss_fn, params, batches, top_k=5, key=jax.random.key(0), max_iters=100)
    jax.block_until_ready(result.eigenvectors)
    return result

  first = top5()  # compiles; fixes the HVP count
  count, eigenvalues = first.num_hvps, np.asarray(first.eigenvalues).tolist()
  del first
  hvps, calls = [], []
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(count):
      jax.block_until_ready(operator.matvec(v))
    hvps.append((time.perf_counter() - start) / count)
    start = time.perf_counter()
    top5()
    calls.append(time.perf_counter() - start)
  hvps, calls = np.asarray(hvps), np.asarray(calls)
  print(json.dumps({"fresh_ms": fresh, "idle_ms": idle, "hvp_s": float(np.median(hvps)),
                    "top5_s": float(np.median(calls)), "ratio": float(np.median(calls / (count * hvps))),
                    "hvps": count, "eigenvalues": eigenvalues}))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=positive_int, default=2, help="fresh processes per allocator")
  parser.add_argument("--inner-rounds", type=positive_int, default=3, help="HVP loop + top_k=5 pairs per process")
  parser.add_argument("--idle", type=float, default=5.0, help="seconds idle before the refault probe's second fill")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.idle < 0:
    parser.error(f"--idle: seconds, at least 0, got {args.idle}")
  if args.quick:
    args.rounds, args.inner_rounds, args.idle = 1, 1, 0.0
  if args.child:
    child(args.quick, args.inner_rounds, args.idle)
    return 0

  table = allocators()
  print(f"allocators: {', '.join(table)}" + ("" if "jemalloc" in table else " (jemalloc not installed: "
                                                                          "apt-get install libjemalloc2)"))
  command = [sys.executable, os.path.abspath(__file__), "--child", "--inner-rounds", str(args.inner_rounds),
             "--idle", str(args.idle)] + (["--quick"] if args.quick else [])
  runs = {name: [] for name in table}
  for _ in range(args.rounds):
    for name, changes in table.items():
      environment = {key: value for key, value in os.environ.items() if key not in ("LD_PRELOAD", "MALLOC_CONF",
                                                                                    "GLIBC_TUNABLES")}
      environment.update(changes)
      completed = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
      if completed.returncode != 0:
        print(f"{name}: the child failed:\n{completed.stderr[-3000:]}", file=sys.stderr)
        return 1
      runs[name].append(json.loads(completed.stdout.strip().splitlines()[-1]))

  model = "MLP (256, 128), batch 32" if args.quick else "MLP (4096, 2048), 11.6M parameters, batch 256"
  print(f"\nhessian_eigenvalues(top_k=5, max_iters=100) on the {model} (2 batches), XLA:CPU; "
        f"median over {args.rounds} process(es) x {args.inner_rounds} round(s)\n")
  print(f"| allocator | 232 MB fill after a free: at once / after {args.idle:g} s idle | one HVP | "
        "top_k=5: HVPs, time | time / (HVPs x one HVP) | top_k=5 time / glibc's |")
  print("|---|---:|---:|---:|---:|---:|")
  base = np.median([run["top5_s"] for run in runs["glibc"]])
  for name, samples in runs.items():
    def median(key):
      return float(np.median([run[key] for run in samples]))  # pylint: disable=cell-var-from-loop
    print(f"| {name} | {median('fresh_ms'):.0f} / {median('idle_ms'):.0f} ms | {median('hvp_s') * 1e3:.0f} ms | "
          f"{samples[0]['hvps']}, {median('top5_s'):.2f} s | {median('ratio'):.2f}x | {median('top5_s') / base:.2f} |")
  reference = np.asarray(runs["glibc"][0]["eigenvalues"])
  worst = max(float(np.max(np.abs(np.asarray(run["eigenvalues"]) - reference) / np.abs(reference)))
              for samples in runs.values() for run in samples)
  print(f"\neigenvalues, every allocator and process vs glibc's first: max relative difference {worst:.1e}")
  assert worst < 1e-5, "the allocator changed the eigenvalues"
  return 0


if __name__ == "__main__":
  sys.exit(main())
