"""sam_optax.analysis vs PyHessian on the same float32 weights, side by side in one run.

Needs the optional extra: ``pip install torch pyhessian``
(``pip install -e '.[pyhessian]'``; CI does not install it, and no test imports torch).

Models (digits 8x8, 4 batches of 128 examples, the data the issue's table used):
an MLP 64-512-512-10 (301,066 params) and a CNN Conv(64)-pool-Conv(128)-pool-
Dense(1792)-Dense(10) (1,011,722 params), trained 30 Adam steps in JAX, then the
same float32 weights copied into torch (the two losses are checked equal).
PyHessian runs in its ``dataloader`` mode (the 4 batches; each HVP recomputes
every batch's forward and backward, as the analysis of a data set does).

Printed, each pair timed in the same run (round-robin for the per-HVP time):

1. Per HVP (all 4 batches): ``hessian_operator(...).matvec`` vs PyHessian's
   ``dataloader_hv_product``. Target <= 1.0x.
2. Top-1 and top-5 eigenvalues: seconds, HVPs, max relative error against a
   tol=1e-9 Lanczos reference.
3. Hutchinson trace, 100 Rademacher probes: seconds. Target <= 0.7x on the CNN.

Usage::

    python benchmarks/pyhessian_side_by_side.py            # ~5 minutes on 2 cores
    python benchmarks/pyhessian_side_by_side.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's sam_optax
from common import interleaved_samples, paired_ratio, positive_int, verdict  # noqa: E402
from sam_optax import analysis  # noqa: E402
from sam_optax.experiments.models import CNN, MLP  # noqa: E402

try:
  import torch
  from pyhessian import hessian as PyHessian
except ImportError as error:  # pragma: no cover - optional extra
  raise SystemExit(f"needs torch and pyhessian (pip install -e '.[pyhessian]'): {error}")

warnings.filterwarnings("ignore", message="Using backward")


def digits(examples: int):
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  data = load_digits()
  x = (data.images[:examples, :, :, None] / 16.0).astype(np.float32)
  return x, data.target[:examples].astype(np.int32)


class NHWCFlatten(torch.nn.Module):
  def forward(self, x):  # flax flattens NHWC
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)


def torch_mlp(params):
  layers = [torch.nn.Flatten()]
  names = sorted(params)  # Dense_0, Dense_1, Dense_2
  for i, name in enumerate(names):
    kernel = np.asarray(params[name]["kernel"])
    linear = torch.nn.Linear(*kernel.shape)
    linear.weight.data = torch.tensor(kernel.T.copy())
    linear.bias.data = torch.tensor(np.asarray(params[name]["bias"]))
    layers += [linear] + ([torch.nn.ReLU()] if i < len(names) - 1 else [])
  return torch.nn.Sequential(*layers)


def torch_cnn(params):
  def conv(name):
    kernel = np.asarray(params[name]["kernel"])  # HWIO
    layer = torch.nn.Conv2d(kernel.shape[2], kernel.shape[3], kernel.shape[:2], padding=1)
    layer.weight.data = torch.tensor(kernel.transpose(3, 2, 0, 1).copy())
    layer.bias.data = torch.tensor(np.asarray(params[name]["bias"]))
    return layer

  def dense(name):
    kernel = np.asarray(params[name]["kernel"])
    layer = torch.nn.Linear(*kernel.shape)
    layer.weight.data = torch.tensor(kernel.T.copy())
    layer.bias.data = torch.tensor(np.asarray(params[name]["bias"]))
    return layer

  return torch.nn.Sequential(conv("Conv_0"), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                             conv("Conv_1"), torch.nn.ReLU(), torch.nn.MaxPool2d(2), NHWCFlatten(),
                             dense("Dense_0"), torch.nn.ReLU(), dense("Dense_1"))


class CountingPyHessian(PyHessian):
  """PyHessian, counting its (all-batch) HVPs."""

  num_hvps = 0

  def dataloader_hv_product(self, v):
    self.num_hvps += 1
    return super().dataloader_hv_product(v)


def print_table(rows):
  print("\n| model | params | quantity | sam_optax | PyHessian | ratio (95 % CI) | notes | verdict |")
  print("|---|---:|---|---:|---:|---:|---|---|")
  for name, count, what, ours, theirs, ratio, notes, ok in rows:
    scale = "ms" in what
    ci = f" ({ratio[1]:.2f}–{ratio[2]:.2f})" if ratio[1] != ratio[0] else ""
    print(f"| {name} | {count:,} | {what} | {ours:.{1 if scale else 2}f} | {theirs:.{1 if scale else 2}f} | "
          f"{ratio[0]:.2f}x{ci} | {notes} | {'' if ok is None else verdict(ok)} |")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=positive_int, default=8)
  parser.add_argument("--probes", type=positive_int, default=100)
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args(argv)
  batches_n, batch_size, cnn_hidden, widths = 4, 128, 1792, (512, 512)
  if args.quick:
    args.rounds, args.probes, batches_n, batch_size, cnn_hidden, widths = 2, 10, 2, 32, 64, (64, 64)
  torch.manual_seed(0)
  x, y = digits(batches_n * batch_size)
  batches = [{"x": jnp.asarray(x[i * batch_size:(i + 1) * batch_size]),
              "y": jnp.asarray(y[i * batch_size:(i + 1) * batch_size])} for i in range(batches_n)]
  loader = [(torch.tensor(np.asarray(b["x"]).transpose(0, 3, 1, 2).copy()), torch.tensor(np.asarray(b["y"])).long())
            for b in batches]
  print(f"digits 8x8, {batches_n} batches x {batch_size}; jax {jax.__version__} ({jax.default_backend()}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); PyHessian dataloader mode\n")
  rows = []
  for name, model, to_torch in (("MLP", MLP(10, widths), torch_mlp), ("CNN", CNN(10, (64, 128), cnn_hidden), torch_cnn)):
    def loss_fn(params, batch, model=model):
      logits = model.apply({"params": params}, batch["x"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    params = model.init(jax.random.key(0), batches[0]["x"][:1])["params"]
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch, loss_fn=loss_fn, tx=tx):
      grads = jax.grad(loss_fn)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    for i in range(30 if not args.quick else 3):
      params, opt_state = step(params, opt_state, batches[i % batches_n])
    torch_model = to_torch(params)
    count = sum(int(np.size(p)) for p in jax.tree.leaves(params))
    assert count == sum(p.numel() for p in torch_model.parameters())
    with torch.no_grad():
      torch_loss = np.mean([float(torch.nn.functional.cross_entropy(torch_model(a), b)) for a, b in loader])
    jax_loss = np.mean([float(loss_fn(params, b)) for b in batches])
    np.testing.assert_allclose(torch_loss, jax_loss, rtol=1e-4)  # the same weights

    def pyhessian():
      return CountingPyHessian(torch_model, torch.nn.CrossEntropyLoss(), dataloader=loader, cuda=False)

    # 1. One HVP over all batches.
    operator = analysis.hessian_operator(loss_fn, params, batches)
    v = jax.tree.map(jnp.ones_like, params)
    theirs = pyhessian()
    tv = [torch.ones_like(p) for p in theirs.params]
    jax.block_until_ready(operator.matvec(v))  # compile
    theirs.dataloader_hv_product(tv)
    samples = interleaved_samples({"ours": lambda: operator.matvec(v), "pyhessian": lambda: theirs.dataloader_hv_product(tv)},
                                  rounds=args.rounds, steps=1, block_each_call=True)
    hvp_ratio = paired_ratio(samples["ours"], samples["pyhessian"])
    rows.append((name, count, "per HVP (ms)", 1e3 * np.median(samples["ours"]), 1e3 * np.median(samples["pyhessian"]),
                 hvp_ratio, "<= 1.0x", hvp_ratio[0] <= 1.0))

    # 2. Eigenvalues.
    reference = analysis.hessian_eigenvalues(loss_fn, params, batches, top_k=5, key=jax.random.key(99), tol=1e-9,
                                             max_iters=300).eigenvalues
    for top in (1, 5):
      ours_time, cold = [], []
      for _ in range(2):  # the first call compiles the Lanczos arithmetic; report the second, print both
        start = time.perf_counter()
        ours = analysis.hessian_eigenvalues(loss_fn, params, batches, top_k=top, key=jax.random.key(0))
        ours_time.append(time.perf_counter() - start)
      cold, ours_time = ours_time
      ours_error = np.max(np.abs(ours.eigenvalues - reference[:top]) / np.abs(reference[:top]))
      theirs = pyhessian()
      start = time.perf_counter()
      values, _ = theirs.eigenvalues(top_n=top)
      their_time = time.perf_counter() - start
      their_error = np.max(np.abs(np.asarray(values) - reference[:top]) / np.abs(reference[:top]))
      rows.append((name, count, f"top-{top} eigenvalues (s)", ours_time, their_time, (ours_time / their_time,) * 3,
                   f"HVPs {ours.num_hvps} / {theirs.num_hvps}; rel. error {ours_error:.1e} / {their_error:.1e}; "
                   f"ours incl. compile {cold:.2f} s", None))

    # 3. Hutchinson, 100 probes.
    ours_time = []
    for _ in range(2):  # first call compiles
      start = time.perf_counter()
      trace = analysis.hessian_trace(loss_fn, params, batches, args.probes, key=jax.random.key(1))
      ours_time.append(time.perf_counter() - start)
    cold, ours_time = ours_time
    theirs = pyhessian()
    start = time.perf_counter()
    their_samples = theirs.trace(maxIter=args.probes, tol=float("-inf"))
    their_time = time.perf_counter() - start
    assert len(their_samples) == args.probes
    rows.append((name, count, f"trace, {args.probes} probes (s)", ours_time, their_time, (ours_time / their_time,) * 3,
                 f"{trace.trace:.4g} ± {trace.stderr:.2g} / {np.mean(their_samples):.4g} ± "
                 f"{np.std(their_samples, ddof=1) / np.sqrt(args.probes):.2g}; ours incl. compile {cold:.2f} s"
                 + ("; target <= 0.7x" if name == "CNN" else ""),
                 (ours_time / their_time <= 0.7) if name == "CNN" else None))
    print(f"{name}: {count:,} params, top-5 reference {np.array2string(reference, precision=5)}", flush=True)
    print_table([row for row in rows if row[0] == name])
    sys.stdout.flush()

  return 0


if __name__ == "__main__":
  sys.exit(main())
