"""Hessian analysis cost and accuracy, measured side by side in one run.

1. HVP cost relative to one gradient (target <= 2.5x), wall time and XLA flops,
   on a CNN and an MLP.
2. HVPs needed for the top eigenvalue of a >= 1M-parameter MLP to 1e-3
   relative accuracy (target <= 30): ``sam_optax.analysis.hessian_eigenvalues``
   (Lanczos, partial reorthogonalisation, on the devices) vs. a power
   iteration configured like PyHessian's defaults (maxIter=100, tol=1e-3 on the
   relative change of the eigenvalue) vs. matfree's jitted Lanczos
   (``matfree.decomp.tridiag_sym``, fixed depth, full reorthogonalisation);
   the reference is a long Lanczos run (tol 1e-9).
3. The design question of jax-ml/jax#12868: time per HVP when the HVP is a
   separately jitted call driven by a host loop vs. inside ``lax.fori_loop``.
4. The analysis on the devices, on a >= 10M-parameter MLP (2 batches): one
   multi-batch HVP (``hessian_operator(...).matvec``, on device), then
   ``hessian_eigenvalues(top_k=5, max_iters=100)``: total time / (HVPs used x
   one HVP) (target <= 1.1x), the same with full reorthogonalisation, and the
   peak resident memory growth during the
   call (``/proc/self/status`` VmHWM, reset before it; target <= 0.5 GB), with
   the bytes of the Krylov basis that lives in device memory (which *is* host
   memory on XLA:CPU); and Hutchinson's trace with 100 probes on the CNN
   (forward-over-forward ``v^T H v``, blocks of 10 probes per call) against
   the time of 100 single HVPs.

PyHessian itself, on the same weights: ``benchmarks/pyhessian_side_by_side.py``
(needs the optional ``pyhessian`` extra).

Usage::

    python benchmarks/hessian_benchmark.py           # a few minutes on 2 CPU cores
    python benchmarks/hessian_benchmark.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's sam_optax
from common import allocator, interleaved_medians, paired_ratio, positive_int, verdict, xla_figures  # noqa: E402
from sam_optax import analysis  # noqa: E402


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.max_pool(nn.relu(nn.Conv(16, (3, 3))(x)), (2, 2), (2, 2))
    x = nn.max_pool(nn.relu(nn.Conv(32, (3, 3))(x)), (2, 2), (2, 2))
    return nn.Dense(10)(nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1))))


class MLP(nn.Module):
  hidden: tuple = (1024, 256)

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for size in self.hidden:
      x = nn.tanh(nn.Dense(size)(x))
    return nn.Dense(10)(x)


def images(batch: int, seed: int = 0):
  """Real Fashion-MNIST images when the Debian package is installed, else digits upsampled."""
  try:
    from sam_optax.experiments.data import load_dataset  # pylint: disable=import-outside-toplevel

    data = load_dataset("fashion_mnist", train_size=batch, test_size=1, seed=seed)
    source = "Fashion-MNIST"
  except Exception:  # pylint: disable=broad-except
    from sam_optax.experiments.data import load_dataset  # pylint: disable=import-outside-toplevel

    data = load_dataset("digits", train_size=batch, seed=seed)
    x = np.repeat(np.repeat(data.x_train, 4, axis=1), 4, axis=2)[:, 2:30, 2:30]  # 28x28
    return {"x": jnp.asarray(x), "y": jnp.asarray(data.y_train)}, "digits (upsampled)"
  return {"x": jnp.asarray(data.x_train), "y": jnp.asarray(data.y_train)}, source


def make_loss(model):
  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
  return loss_fn


def two_halves(batch):
  """The batch split into its first and second half (the benchmarks' two-batch Hessian), and the half size."""
  half = batch["x"].shape[0] // 2
  return [jax.tree.map(lambda x: x[:half], batch), jax.tree.map(lambda x: x[half:], batch)], half


def _tree_dot(a, b):
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


_normalized = jax.jit(lambda v: jax.tree.map(lambda x: x / jnp.sqrt(_tree_dot(v, v)), v))
_rayleigh = jax.jit(_tree_dot)


def pyhessian_power_iteration(matvec, params, key, max_iter=100, tol=1e-3):
  """PyHessian's ``hessian.eigenvalues`` for top_n=1: normalised power iteration (on pytrees)."""
  keys = jax.random.split(key, len(jax.tree.leaves(params)))
  v = jax.tree.unflatten(jax.tree.structure(params),
                         [jax.random.normal(k, p.shape) for k, p in zip(keys, jax.tree.leaves(params))])
  v = _normalized(v)
  eigenvalue = None
  for i in range(max_iter):
    hv = matvec(v)
    new = float(_rayleigh(hv, v))
    v = _normalized(hv)
    if eigenvalue is not None and abs(eigenvalue - new) / (abs(eigenvalue) + 1e-6) < tol:
      return new, i + 1
    eigenvalue = new
  return eigenvalue, max_iter


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch-size", type=positive_int, default=256, help="at least 2 (section 4 halves it)")
  parser.add_argument("--rounds", type=positive_int, default=10)
  parser.add_argument("--seeds", type=positive_int, default=3, help="start vectors for the eigenvalue comparison")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--sections", default="1234",
                      help="which sections to run, digits from 1234: \"4\" only the on-device section; "
                           "1, 2 or 3 run tables 1-3 (together); default: all")
  parser.add_argument("--lanczos-rounds", type=positive_int, default=4, help="paired rounds of section 4's timing")
  args = parser.parse_args(argv)
  if not args.sections or set(args.sections) - set("1234"):
    parser.error(f"--sections: digits from 1234 such as 4 or 1234, got {args.sections!r}")
  if args.batch_size < 2:
    parser.error(f"--batch-size: at least 2 (section 4 splits the batch in two), got {args.batch_size}")
  hidden = (1024, 256)
  if args.quick:
    args.batch_size, args.rounds, args.seeds, hidden = 32, 2, 1, (64, 32)
  batch, source = images(args.batch_size)
  print(f"data: {source}, batch {args.batch_size}, backend {jax.default_backend()}, malloc: {allocator()}\n")

  if "4" in args.sections:  # first: its memory figure wants a fresh process
    large_section(args, batch, hidden=(4096, 2048) if not args.quick else (256, 128))
    cnn_model = CNN()
    trace_section(args, make_loss(cnn_model), cnn_model.init(jax.random.key(0), batch["x"][:1])["params"])
  if not set(args.sections) & set("123"):
    return 0
  # 1. HVP / gradient.
  rows = []
  for name, model in (("CNN", CNN()), ("MLP", MLP(hidden))):
    params = model.init(jax.random.key(0), batch["x"][:1])["params"]
    loss_fn = make_loss(model)
    v = jax.tree.map(jnp.ones_like, params)
    grad = jax.jit(jax.grad(loss_fn))
    hvp = jax.jit(lambda p, b, t: analysis.hvp(loss_fn, p, b, t))
    g_fig, h_fig = xla_figures(grad, params, batch), xla_figures(hvp, params, batch, v)
    g_call, h_call = g_fig["compiled"], h_fig["compiled"]
    # Block on every call: Lanczos waits for each HVP, and independent calls on
    # the same inputs could otherwise overlap on XLA:CPU.
    medians = interleaved_medians({"grad": lambda: g_call(params, batch), "hvp": lambda: h_call(params, batch, v)},
                                  rounds=args.rounds, steps=5, block_each_call=True)
    rows.append((name, sum(p.size for p in jax.tree.leaves(params)), medians["hvp"] / medians["grad"],
                 h_fig["flops"] / g_fig["flops"]))
  print("| model | params | HVP / gradient time | HVP / gradient XLA flops | target <= 2.5x |")
  print("|---|---:|---:|---:|---|")
  for name, count, time_ratio, flop_ratio in rows:
    print(f"| {name} | {count:,} | {time_ratio:.2f} | {flop_ratio:.2f} | {verdict(time_ratio <= 2.5)} |")

  # 2. Top eigenvalue of a >= 1M-parameter MLP.
  model = MLP(hidden)
  params = model.init(jax.random.key(1), batch["x"][:1])["params"]
  loss_fn = make_loss(model)
  # Move away from initialisation a little so the spectrum is a trained-like one.
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)
  step = jax.jit(lambda p, s: (lambda g: (optax.apply_updates(p, tx.update(g, s, p)[0]), tx.update(g, s, p)[1]))(
      jax.grad(loss_fn)(p, batch)))
  for _ in range(20 if not args.quick else 2):
    params, opt_state = step(params, opt_state)
  count = sum(p.size for p in jax.tree.leaves(params))
  batches = [batch]
  reference = analysis.hessian_eigenvalues(loss_fn, params, batches, key=jax.random.key(99), tol=1e-9, max_iters=300)
  exact = float(reference.eigenvalues[0])
  operator = analysis.hessian_operator(loss_fn, params, batches)
  results = {"Lanczos (sam_optax, defaults)": [], "power iteration (PyHessian defaults)": []}
  try:
    import matfree.decomp  # pylint: disable=import-outside-toplevel
  except ImportError:
    matfree = None
    print("(matfree not installed: pip install -e '.[benchmarks]' adds its row)")
  else:
    results["matfree tridiag_sym, 30 matvecs"] = []
  times = {name: [] for name in results}
  flat, unravel = ravel_pytree(params)
  if matfree is not None:
    flat_hvp = lambda vec, p: ravel_pytree(analysis.hvp(loss_fn, p, batch, unravel(vec)))[0]
    decompose = jax.jit(lambda vec, p: matfree.decomp.tridiag_sym(30)(flat_hvp, vec, p))
    jax.block_until_ready(decompose(jnp.ones_like(flat), params))
  for seed in range(args.seeds):
    key = jax.random.key(seed)
    start = time.perf_counter()
    ours = analysis.hessian_eigenvalues(loss_fn, params, batches, key=key)
    times["Lanczos (sam_optax, defaults)"].append(time.perf_counter() - start)
    results["Lanczos (sam_optax, defaults)"].append((float(ours.eigenvalues[0]), ours.num_hvps))
    start = time.perf_counter()
    value, hvps = pyhessian_power_iteration(operator.matvec, params, key)
    times["power iteration (PyHessian defaults)"].append(time.perf_counter() - start)
    results["power iteration (PyHessian defaults)"].append((value, hvps))
    if matfree is None:
      continue
    start_vector = jax.random.normal(key, flat.shape)
    start = time.perf_counter()
    _, tridiagonal, *_ = decompose(start_vector / jnp.linalg.norm(start_vector), params)
    value = float(np.max(np.abs(np.linalg.eigvalsh(np.asarray(tridiagonal, np.float64)))))
    times["matfree tridiag_sym, 30 matvecs"].append(time.perf_counter() - start)
    results["matfree tridiag_sym, 30 matvecs"].append((value, 30))
  print(f"\nTop Hessian eigenvalue of an MLP with {count:,} parameters (reference {exact:.6g}, "
        f"{args.seeds} start vectors)\n")
  print("| method | HVPs | max relative error | seconds | within 1e-3 | target <= 30 HVPs |")
  print("|---|---:|---:|---:|---|---|")
  for name, values in results.items():
    errors = [abs(v - exact) / abs(exact) for v, _ in values]
    hvps = max(h for _, h in values)
    ok_hvps = verdict(hvps <= 30) if name.startswith("Lanczos") else ""
    print(f"| {name} | {hvps} | {max(errors):.1e} | {np.median(times[name]):.2f} | "
          f"{'yes' if max(errors) <= 1e-3 else 'no'} | {ok_hvps} |")

  # 3. jax-ml/jax#12868: HVP in a host loop vs inside lax.fori_loop.
  print("\n| model | per-HVP ms, host loop | per-HVP ms, inside fori_loop | fori_loop / host |")
  print("|---|---:|---:|---:|")
  for name, model in (("CNN", CNN()), ("MLP", MLP(hidden))):
    params = model.init(jax.random.key(0), batch["x"][:1])["params"]
    loss_fn = make_loss(model)
    flat, unravel = ravel_pytree(params)
    one = jax.jit(lambda p, vec: ravel_pytree(analysis.hvp(loss_fn, p, batch, unravel(vec)))[0])
    iterations = 10

    def host(params=params, one=one, flat=flat):
      vec = jnp.ones_like(flat)
      for _ in range(iterations):
        vec = one(params, vec)
        vec = vec / jnp.linalg.norm(vec)
      return vec

    looped = jax.jit(lambda p, vec, one=one, unravel=unravel: jax.lax.fori_loop(
        0, iterations, lambda _, x: (lambda y: y / jnp.linalg.norm(y))(
            ravel_pytree(analysis.hvp(loss_fn, p, batch, unravel(x)))[0]), vec))
    jax.block_until_ready(host())
    jax.block_until_ready(looped(params, jnp.ones_like(flat)))
    medians = interleaved_medians({"host": host, "loop": lambda: looped(params, jnp.ones_like(flat))},
                                  rounds=max(2, args.rounds // 2), steps=1)
    print(f"| {name} | {1e3 * medians['host'] / iterations:.2f} | {1e3 * medians['loop'] / iterations:.2f} | "
          f"{medians['loop'] / medians['host']:.2f} |")
  return 0


def peak_rss_reset() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    return True
  except OSError:
    return False


def memory_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return -1


def large_section(args, batch, hidden):
  model = MLP(hidden)
  params = model.init(jax.random.key(2), batch["x"][:1])["params"]
  loss_fn = make_loss(model)
  count = sum(p.size for p in jax.tree.leaves(params))
  batches, half = two_halves(batch)
  # Memory: the first call in this process (it includes XLA's compilation), peak RSS over RSS before it.
  gc.collect()
  reset = peak_rss_reset()
  rss_before = memory_kib("VmRSS")
  result = analysis.hessian_eigenvalues(loss_fn, params, batches, top_k=5, key=jax.random.key(0), max_iters=100)
  jax.block_until_ready(result.eigenvectors)
  growth_gb = (memory_kib("VmHWM") - rss_before) * 1024 / 1e9 if reset else float("nan")
  stats = jax.devices()[0].memory_stats() or {}  # GPU/TPU: the allocator's peak (not reset: since start-up)
  device_peak_gb = stats["peak_bytes_in_use"] / 1e9 if "peak_bytes_in_use" in stats else None
  del result
  # Time, paired by round. "HVPs used x one HVP" is measured directly: the same number of HVPs back to back
  # (outputs dropped), once before and once after the round's two Lanczos runs (partial, then full
  # reorthogonalisation; compiled calls, same key); a round's reference is the mean of its two sequences, so
  # a machine that drifts within the round does not favour either side. The median of 3 single HVPs, the
  # figure this table used to divide by, is printed too.
  operator = analysis.hessian_operator(loss_fn, params, batches)
  v = jax.tree.map(jnp.ones_like, params)
  jax.block_until_ready(operator.matvec(v))
  kwargs = dict(top_k=5, key=jax.random.key(0), max_iters=100)

  designs = ("host", "fused", "loop")
  default = analysis.hessian._iteration_design(analysis.hessian_operator(loss_fn, params, batches))
  others = tuple(d for d in designs if d != default)

  def eigen(mode):
    """``mode``: "partial" or "full" (this backend's default iteration design), or another design with partial
    reorthogonalisation: "host" (a host loop of separate product, three-term step and scaling calls; XLA:CPU's
    default for large models), "fused" (a host loop of ``HessianOperator.lanczos_step``: the vector work inside
    the product's programs) or "loop" (device loops of iterations, the host testing convergence between them;
    the accelerators' default)."""
    if mode in ("partial", "full"):
      return analysis.hessian_eigenvalues(loss_fn, params, batches, reorthogonalize=mode, **kwargs)
    choose = analysis.hessian._iteration_design
    analysis.hessian._iteration_design = lambda operator: mode
    try:
      return analysis.hessian_eigenvalues(loss_fn, params, batches, **kwargs)
    finally:
      analysis.hessian._iteration_design = choose

  modes = ("partial", "full") + others
  results = {mode: eigen(mode) for mode in modes}  # compiles every mode's programs; fixes the HVP counts
  jax.block_until_ready([r.eigenvectors for r in results.values()])
  counts = {mode: results[mode].num_hvps for mode in results}
  del results

  def hvp_sequence(count):
    start = time.perf_counter()
    for _ in range(count):
      jax.block_until_ready(operator.matvec(v))
    return time.perf_counter() - start

  singles, references, totals = [], {mode: [] for mode in modes}, {mode: [] for mode in modes}
  for _ in range(1 if args.quick else args.lanczos_rounds):
    times = []
    for _ in range(3):
      start = time.perf_counter()
      jax.block_until_ready(operator.matvec(v))
      times.append(time.perf_counter() - start)
    singles.append(float(np.median(times)))
    before = {mode: hvp_sequence(count) for mode, count in counts.items()}
    for mode in totals:
      start = time.perf_counter()
      jax.block_until_ready(eigen(mode).eigenvectors)
      totals[mode].append(time.perf_counter() - start)
    after = {mode: hvp_sequence(count) for mode, count in counts.items()}
    for mode in totals:
      references[mode].append(0.5 * (before[mode] + after[mode]))
  results = {mode: eigen(mode) for mode in modes}
  del operator, v
  result, full = results["partial"], results["full"]
  assert all(results[mode].num_hvps == counts[mode] for mode in modes)
  hvps = np.asarray(references["partial"]) / result.num_hvps  # one HVP, as measured in sequence
  ratio, ratio_low, ratio_high = paired_ratio(np.asarray(totals["partial"]), np.asarray(references["partial"]))
  full_ratio = paired_ratio(np.asarray(totals["full"]), np.asarray(references["full"]))[0]
  single_ratio = paired_ratio(np.asarray(totals["partial"]), result.num_hvps * np.asarray(singles))[0]
  hvp, total, full_total = float(np.median(hvps)), float(np.median(totals["partial"])), float(np.median(totals["full"]))
  difference = float(np.max(np.abs(result.eigenvalues - full.eigenvalues) / np.abs(full.eigenvalues)))
  rows = result.num_hvps
  if default == "loop":  # device loops preallocate the basis: 32 rows, doubled when a run needs more
    rows = min(100, analysis.hessian._LOOP_CAPACITY)
    while rows < result.num_hvps:
      rows = min(100, 2 * rows)
  basis_gb = rows * count * 4 / 1e9
  print(f"\nAnalysis on the devices: MLP {hidden}, {count:,} parameters, 2 batches of {half}\n")
  print("| quantity | value | target |")
  print("|---|---:|---|")
  print(f"| one multi-batch HVP (on device; {result.num_hvps} back to back, median of {len(hvps)} rounds) | "
        f"{1e3 * hvp:.0f} ms | |")
  print(f"| top_k=5 (max_iters=100): HVPs, seconds | {result.num_hvps}, {total:.2f} s | |")
  print(f"| top_k=5 time / (HVPs x one HVP), median of per-round ratios (95 % CI) | {ratio:.2f}x "
        f"({ratio_low:.2f}–{ratio_high:.2f}) | <= 1.1x: {verdict(ratio <= 1.1)} |")
  print(f"| same, dividing by the median of 3 single HVPs instead | {single_ratio:.2f}x | |")
  print(f"| same, full reorthogonalisation: HVPs, seconds, time / (HVPs x one HVP) | {full.num_hvps}, "
        f"{full_total:.2f} s, {full_ratio:.2f}x | |")
  print(f"| iterations on this backend for this model: {default} | | |")
  for other in others:
    other_ratio = paired_ratio(np.asarray(totals[other]), np.asarray(references[other]))[0]
    gain = paired_ratio(np.asarray(totals[other]), np.asarray(totals["partial"]))
    other_difference = float(np.max(np.abs(result.eigenvalues - results[other].eigenvalues)
                                    / np.abs(results[other].eigenvalues)))
    print(f"| {other} instead: HVPs, seconds, time / (HVPs x one HVP) | {results[other].num_hvps}, "
          f"{float(np.median(totals[other])):.2f} s, {other_ratio:.2f}x | |")
    print(f"| {other} / {default} time, median of per-round ratios (95 % CI); eigenvalues' max relative "
          f"difference | {gain[0]:.3f} ({gain[1]:.3f}–{gain[2]:.3f}); {other_difference:.1e} | |")
  print(f"| eigenvalues, partial vs full: max relative difference | {difference:.1e} | |")
  on_host = jax.default_backend() == "cpu"  # XLA:CPU's device memory is the host's RAM
  print(f"| peak RSS growth during top_k=5 (first call, incl. compilation) | {growth_gb:.3f} GB | "
        f"<= 0.5 GB: {verdict(growth_gb <= 0.5)} |")
  where = "device memory = host RAM on CPU: in the RSS above" if on_host else "device memory: not in the RSS above"
  print(f"| Krylov basis ({rows} float32 vectors, {where}) | {basis_gb:.3f} GB | |")
  vectors_gb = len(result.eigenvectors) * count * 4 / 1e9
  into = ("the eigenvectors themselves are written into the dead basis' memory" if default != "loop" else
          "then the eigenvectors")
  print(f"| the {len(result.eigenvectors)} eigenvectors' accumulator (device memory; a temporary: {into}) | "
        f"{vectors_gb:.3f} GB | |")
  if on_host:
    print(f"| peak RSS growth beyond these device arrays (compilation, linearisation residuals, "
          f"temporaries) | {growth_gb - basis_gb - vectors_gb:.3f} GB | |")
  elif device_peak_gb is not None:
    print(f"| peak device memory in use during top_k=5 (params, batches, residuals, basis, temporaries) | "
          f"{device_peak_gb:.3f} GB | |")
  print(f"| old design (host float64 basis of {result.num_hvps} x {count:,}, for comparison) | "
        f"{result.num_hvps * count * 8 / 1e9:.3f} GB + copies | |")
  print(f"| eigenvalues | {np.array2string(result.eigenvalues, precision=5)} | |")


def trace_section(args, loss_fn, params):
  batches = [jax.tree.map(jnp.asarray, b) for b in [images(args.batch_size, seed=1)[0]]]
  operator = analysis.hessian_operator(loss_fn, params, batches)
  v = jax.tree.map(jnp.ones_like, params)
  jax.block_until_ready(operator.matvec(v))
  probes = 100 if not args.quick else 10
  analysis.hessian_trace(loss_fn, params, batches, probes, key=jax.random.key(0))  # compile
  single = []
  start = time.perf_counter()
  for _ in range(probes // 10):
    jax.block_until_ready(operator.matvec(v))
  single = (time.perf_counter() - start) / (probes // 10)
  start = time.perf_counter()
  trace, stderr = analysis.hessian_trace(loss_fn, params, batches, probes, key=jax.random.key(1))
  total = time.perf_counter() - start
  print(f"\nHutchinson trace of the CNN, {probes} probes in blocks of 10 (forward-over-forward): {total:.2f} s "
        f"(tr = {trace:.4g} ± {stderr:.2g}); {probes} single HVPs would take {probes * single:.2f} s: "
        f"{total / (probes * single):.2f}x")


if __name__ == "__main__":
  sys.exit(main())
