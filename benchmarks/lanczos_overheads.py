"""Where a Lanczos iteration's time goes beyond its Hessian-vector product, measured side by side.

On the 11.6M-parameter MLP of ``hessian_benchmark.py`` section 4 (2 batches),
in one run, round-robin with paired per-round ratios:

1. One iteration four ways: the product alone (``operator.matvec``, what
   "HVPs x one HVP" divides by); the fused iteration
   (``HessianOperator.lanczos_step``: scaling and three-term step inside the
   product's programs); the unfused one (scaling, product, three-term step
   as separate calls); and the unnormalised one (XLA:CPU's host loop: the
   product of ``w`` itself, its scale ``1 / beta`` applied inside the
   three-term step, no scaling pass), each ending with the host read of
   ``[alpha, beta]`` that Lanczos needs.
2. The pieces that are not arithmetic: one batch's product dispatched with a
   Python-float weight vs a device-resident one (time until the call returns,
   and until the result is ready); reading two fresh device scalars to the
   host vs one stacked pair vs only waiting for them.
3. XLA's ``cost_analysis()`` bytes accessed of the fused, unfused and unnormalised programs.

It prints figures, asserts none. On a GPU the first two sections show the
host round trips that dominate small products; on XLA:CPU the third shows
why the fused programs are not used there.

Usage::

    python benchmarks/lanczos_overheads.py           # ~2 minutes on 2 CPU cores
    python benchmarks/lanczos_overheads.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's sam_optax
from common import allocator, interleaved_samples, paired_ratio, positive_int, xla_figures  # noqa: E402
from hessian_benchmark import MLP, images, make_loss, two_halves  # noqa: E402
from sam_optax.analysis import hessian  # noqa: E402  (internals: this script times their pieces)


def bytes_accessed(jitted, *args) -> float:
  """XLA's count of bytes accessed by the compiled call, in GB."""
  return xla_figures(jitted, *args)["bytes_accessed"] / 1e9


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch-size", type=positive_int, default=256, help="at least 2 (split into two batches)")
  parser.add_argument("--rounds", type=positive_int, default=10)
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args(argv)
  if args.batch_size < 2:
    parser.error(f"--batch-size: at least 2 (split into two batches), got {args.batch_size}")
  hidden = (4096, 2048)
  if args.quick:
    args.batch_size, args.rounds, hidden = 32, 2, (64, 32)
  batch, source = images(args.batch_size)
  model = MLP(hidden)
  params = model.init(jax.random.key(2), batch["x"][:1])["params"]
  loss_fn = make_loss(model)
  batches, half = two_halves(batch)
  operator = hessian.hessian_operator(loss_fn, params, batches)
  count = sum(p.size for p in jax.tree.leaves(params))
  print(f"data: {source}; MLP {hidden}, {count:,} parameters, 2 batches of {half}; backend "
        f"{jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}, malloc: {allocator()}\n")

  q_prev, _ = hessian._normalize(hessian._random_like(params, jax.random.key(0), "normal"), False)
  w0 = hessian._random_like(params, jax.random.key(1), "normal")
  beta, beta_prev = jnp.float32(3.0) + 0, jnp.float32(0.5) + 0
  fresh = jax.jit(lambda tree: jax.tree.map(lambda x: x + 0, tree))  # a w to give up (donated) each call
  inputs = {}

  def prepare():
    inputs["w"] = jax.block_until_ready(fresh(w0))

  def product():
    return np.asarray(jax.block_until_ready(operator.matvec(q_prev))["Dense_0"]["bias"][:2])

  def fused():
    _, _, coefficients, _ = operator.lanczos_step(inputs["w"], beta, q_prev, beta_prev)
    return np.asarray(coefficients)

  def unfused():
    q = hessian._scale(inputs["w"], np.float32(1 / 3.0), False)
    w, alpha, norm, _ = hessian._local_step(operator.matvec(q), q, q_prev, np.float32(0.5), False)
    return jax.device_get((alpha, norm))

  def unnormalised():  # the product of w itself; the scale 1 / beta enters the three-term step
    w = inputs["w"]
    w, alpha, norm, _ = hessian._local_step(operator.matvec(w), w, q_prev, np.float32(0.5), False, np.float32(1 / 3.0))
    return jax.device_get((alpha, norm))

  def timed(fn):
    def run():
      prepare()
      start = time.perf_counter()
      fn()
      return time.perf_counter() - start
    return run

  runners = {"product": timed(product), "fused": timed(fused), "unfused": timed(unfused),
             "unnormalised": timed(unnormalised)}
  for run in runners.values():  # compile
    run()
  samples = {name: [] for name in runners}
  for round_index in range(args.rounds):  # round-robin, rotating the order
    names = list(runners)[round_index % len(runners):] + list(runners)[:round_index % len(runners)]
    for name in names:
      samples[name].append(runners[name]())
  samples = {name: np.asarray(values) for name, values in samples.items()}
  print("| one iteration (ends with [alpha, beta] on the host) | ms, median | × product (95 % CI) |")
  print("|---|---:|---:|")
  for name in runners:
    ratio = paired_ratio(samples[name], samples["product"])
    print(f"| {name} | {1e3 * np.median(samples[name]):.2f} | {ratio[0]:.3f} ({ratio[1]:.3f}–{ratio[2]:.3f}) |")

  # 2. Dispatch and transfer latencies.
  linear = hessian._linearize(loss_fn, params, batches[0])
  weight_on_device = hessian._scalars_beside(params, np.array([0.5]))[0]
  one = {"Python-float weight": lambda: hessian._linear_hvp_into(False, None, 0.5, linear, params, q_prev),
         "device weight": lambda: hessian._linear_hvp_into(False, None, weight_on_device, linear, params, q_prev)}
  print("\n| one batch's product | call returns, ms | result ready, ms |\n|---|---:|---:|")
  for name, call in one.items():
    jax.block_until_ready(call())
    returns, ready = [], []
    for _ in range(max(5, 2 * args.rounds)):
      start = time.perf_counter()
      out = call()
      returns.append(time.perf_counter() - start)
      jax.block_until_ready(out)
      ready.append(time.perf_counter() - start)
    print(f"| {name} | {1e3 * np.median(returns):.3f} | {1e3 * np.median(ready):.3f} |")
  a, b = jnp.float32(1) + 0, jnp.float32(2) + 0
  pair = jax.jit(lambda x, y: (x * 1, y * 1))
  stacked = jax.jit(lambda x, y: jnp.stack([x * 1, y * 1]))
  reads = {"two scalars to the host": lambda: jax.device_get(pair(a, b)),
           "one stacked pair to the host": lambda: np.asarray(stacked(a, b)),
           "only wait for the pair": lambda: jax.block_until_ready(stacked(a, b))}
  for read in reads.values():
    read()
  times = interleaved_samples(reads, rounds=max(5, 2 * args.rounds), steps=20)
  print("\n| a fresh [alpha, beta] (tiny program + read) | ms |\n|---|---:|")
  for name in reads:
    print(f"| {name} | {1e3 * np.median(times[name]):.3f} |")

  # 3. What XLA counts.
  acc = jax.tree.map(jnp.zeros_like, q_prev)
  weight = weight_on_device
  fused_last = bytes_accessed(hessian._lanczos_product, None, False, True, acc, weight, params, linear, q_prev, None,
                              q_prev, beta_prev)
  fused_first = bytes_accessed(hessian._lanczos_product_scaling, None, True, False, acc, weight, params, linear,
                               q_prev, beta, None, None)
  product_only = bytes_accessed(hessian._linear_hvp_into, False, acc, weight, linear, params, q_prev)
  first_only = bytes_accessed(hessian._linear_hvp_into, False, None, weight, linear, params, q_prev)
  local_step = bytes_accessed(hessian._local_step, acc, q_prev, q_prev, np.float32(0.5), False)
  scale = bytes_accessed(hessian._scale, acc, np.float32(0.5), False)
  scaled_step = bytes_accessed(hessian._local_step, acc, q_prev, q_prev, np.float32(0.5), False, np.float32(0.5))
  print("\n| XLA cost_analysis bytes accessed (GB) | fused | unfused (separate programs) | unnormalised |")
  print("|---|---:|---:|---:|")
  print(f"| first batch + scaling | {fused_first:.3f} | {first_only + scale:.3f} | {first_only:.3f} |")
  print(f"| last batch + three-term step | {fused_last:.3f} | {product_only + local_step:.3f} | "
        f"{product_only + scaled_step:.3f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
