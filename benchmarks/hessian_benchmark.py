"""Hessian analysis cost and accuracy, measured side by side in one run.

1. HVP cost relative to one gradient (target <= 2.5x), wall time and XLA flops,
   on a CNN and an MLP.
2. HVPs needed for the top eigenvalue of a >= 1M-parameter MLP to 1e-3
   relative accuracy (target <= 30): ``sam_optax.analysis.hessian_eigenvalues``
   (Lanczos, full reorthogonalisation, float64 on the host) vs. a power
   iteration configured like PyHessian's defaults (maxIter=100, tol=1e-3 on the
   relative change of the eigenvalue) vs. matfree's jitted Lanczos
   (``matfree.decomp.tridiag_sym``, fixed depth, full reorthogonalisation);
   the reference is a long Lanczos run (tol 1e-9).
3. The design question of jax-ml/jax#12868: time per HVP when the HVP is a
   separately jitted call driven by a host loop vs. inside ``lax.fori_loop``.

Usage::

    python benchmarks/hessian_benchmark.py           # a few minutes on 2 CPU cores
    python benchmarks/hessian_benchmark.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
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
from common import interleaved_medians, verdict, xla_figures  # noqa: E402
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


def pyhessian_power_iteration(matvec, dim, key, max_iter=100, tol=1e-3):
  """PyHessian's ``hessian.eigenvalues`` for top_n=1: normalised power iteration."""
  v = np.asarray(jax.random.normal(key, (dim,)), np.float64)
  v /= np.linalg.norm(v)
  eigenvalue = None
  for i in range(max_iter):
    hv = matvec(v)
    new = float(hv @ v)
    v = hv / np.linalg.norm(hv)
    if eigenvalue is not None and abs(eigenvalue - new) / (abs(eigenvalue) + 1e-6) < tol:
      return new, i + 1
    eigenvalue = new
  return eigenvalue, max_iter


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--seeds", type=int, default=3, help="start vectors for the eigenvalue comparison")
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args(argv)
  hidden = (1024, 256)
  if args.quick:
    args.batch_size, args.rounds, args.seeds, hidden = 32, 2, 1, (64, 32)
  batch, source = images(args.batch_size)
  print(f"data: {source}, batch {args.batch_size}, backend {jax.default_backend()}\n")

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
    value, hvps = pyhessian_power_iteration(operator.matvec, operator.dim, key)
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


if __name__ == "__main__":
  sys.exit(main())
