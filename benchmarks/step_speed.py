"""Step speed of SAM, F-SAM, ASAM, GSAM and LookSAM vs the base optimizer, side by side.

One jitted train step each, on a Flax CNN (~106k parameters, 28x28x1 inputs,
batch 128, 10 classes), timed round-robin in one run, plus XLA's
``cost_analysis()`` flops and ``memory_analysis()`` temp bytes. Each variant
carries its own training state from step to step (as a training loop does),
and each ratio is the median of per-round *paired* ratios (the two variants
of a round ran back to back) with a 95 % bootstrap confidence interval, so a
shared machine's drifts cancel and the noise left is shown, not hidden.
Variants:

- base: SGD with momentum 0.9 (one forward/backward pass);
- sam / fsam / asam / gsam: ``optax.chain(sam_optax.<x>_perturb(grad_fn), base)``;
- looksam (k=5): the static host-side phase, one k-step cycle averaged; and the
  traced phase (one program with ``lax.cond``; XLA counts both branches' flops);
- hand-written: two-pass SAM written directly in JAX;
- optax.contrib.sam: ``sam(base, chain(normalize(), sgd(rho)), opaque_mode=True)``.

Usage::

    python benchmarks/step_speed.py            # ~5 minutes on 2 CPU cores
    # one core, one thread (XLA then cannot overlap independent ops):
    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
        taskset -c 0 python benchmarks/step_speed.py
    python benchmarks/step_speed.py --only sam,gsam --rounds 100   # a finer GSAM/SAM ratio
    python benchmarks/step_speed.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sam_optax  # noqa: E402
from common import interleaved_samples, paired_ratio, positive_int, verdict, xla_figures  # noqa: E402

RHO = 0.05
# What --only chooses from: every timed variant (base and hand-written are always timed).
VARIANTS = ("base", "sam", "fsam", "asam", "gsam", "hand-written", "optax.contrib.sam", "looksam (k=5)",
            "looksam traced (lax.cond)")


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.max_pool(nn.relu(nn.Conv(16, (3, 3))(x)), (2, 2), (2, 2))
    x = nn.max_pool(nn.relu(nn.Conv(32, (3, 3))(x)), (2, 2), (2, 2))
    x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


def chained(compiled_steps, params, opt_state, batch):
  """A runner that, per call, advances its own training state through ``compiled_steps`` in order."""
  carry = [params, opt_state]

  def run():
    out = None
    for compiled in compiled_steps:
      out = compiled(carry[0], carry[1], batch)
      carry[:] = out[:2]
    return out

  return run


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch-size", type=positive_int, default=128)
  parser.add_argument("--rounds", type=positive_int, default=40)
  parser.add_argument("--steps", type=positive_int, default=5,
                      help="chained steps per variant and round (a multiple of 5)")
  parser.add_argument("--only", default=None,
                      help="comma list of variants to time (base and hand-written are always timed), "
                           "e.g. 'sam,gsam' for a finer comparison with more rounds")
  parser.add_argument("--quick", action="store_true", help="tiny smoke run")
  args = parser.parse_args(argv)
  if args.only is not None:
    named = {name.strip() for name in args.only.split(",") if name.strip()}
    if not named or named - set(VARIANTS):
      parser.error(f"--only: a comma list of variants from {list(VARIANTS)}, got {args.only!r}")
  if args.steps % 5:
    parser.error(f"--steps: a multiple of 5, got {args.steps}")
  if args.quick:
    args.batch_size, args.rounds, args.steps = 16, 2, 5
  model = CNN()
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.normal(size=(args.batch_size, 28, 28, 1)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, 10, size=args.batch_size), jnp.int32)}
  params = model.init(jax.random.key(0), batch["x"][:1])["params"]
  num_params = sum(p.size for p in jax.tree.leaves(params))

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

  grad_fn = jax.grad(loss_fn)
  base = lambda: optax.sgd(0.05, momentum=0.9)

  def chain_step(tx):
    @jax.jit
    def step(params, opt_state, batch):
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params, batch=batch)
      return optax.apply_updates(params, updates), opt_state, loss
    return step, tx.init(params)

  steps = {}
  steps["base"] = chain_step(base())
  steps["sam"] = chain_step(optax.chain(sam_optax.sam_perturb(grad_fn, rho=RHO), base()))
  steps["fsam"] = chain_step(optax.chain(sam_optax.fsam_perturb(grad_fn, rho=RHO), base()))
  steps["asam"] = chain_step(optax.chain(sam_optax.sam_perturb(grad_fn, rho=10 * RHO, adaptive=True), base()))
  steps["gsam"] = chain_step(optax.chain(sam_optax.gsam_perturb(grad_fn, rho=RHO, alpha=0.1), base()))

  hand_tx = base()

  @jax.jit
  def hand_written(params, opt_state, batch):
    loss, g = jax.value_and_grad(loss_fn)(params, batch)
    norm = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g)))
    perturbed = jax.tree.map(lambda w, x: w + RHO * x / (norm + 1e-12), params, g)
    g_sam = grad_fn(perturbed, batch)
    updates, opt_state = hand_tx.update(g_sam, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  steps["hand-written"] = (hand_written, hand_tx.init(params))
  contrib_tx = optax.contrib.sam(base(), optax.chain(optax.contrib.normalize(), optax.sgd(RHO)),
                                 opaque_mode=True)

  @jax.jit
  def contrib_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = contrib_tx.update(grads, opt_state, params,
                                           grad_fn=lambda p, _: grad_fn(p, batch))
    return optax.apply_updates(params, updates), opt_state, loss

  steps["optax.contrib.sam"] = (contrib_step, contrib_tx.init(params))

  looksam_tx = optax.chain(sam_optax.looksam_perturb(grad_fn, rho=RHO, k=5), base())

  @functools.partial(jax.jit, static_argnames="full_step")
  def looksam_step(params, opt_state, batch, full_step):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = looksam_tx.update(grads, opt_state, params, batch=batch, full_step=full_step)
    return optax.apply_updates(params, updates), opt_state, loss

  # Correctness first: the same update from ours and the hand-written step.
  ours = steps["sam"][0](params, steps["sam"][1], batch)[0]
  reference = hand_written(params, hand_tx.init(params), batch)[0]
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  contrib = contrib_step(params, contrib_tx.init(params), batch)[0]
  for a, b in zip(jax.tree.leaves(contrib), jax.tree.leaves(reference)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  print("correctness: sam_perturb step == hand-written SAM step == optax.contrib.sam step: OK")

  figures = {name: xla_figures(step, params, state, batch) for name, (step, state) in steps.items()}
  looksam_state = looksam_tx.init(params)
  looksam_figures = {phase: xla_figures(looksam_step, params, looksam_state, batch, full_step=phase)
                     for phase in (True, False)}
  compiled = {name: figures[name]["compiled"] for name in steps}
  # Every runner carries its own (params, opt_state) from step to step, as a
  # training loop does: each step depends on the previous one, so the runtime
  # cannot overlap consecutive steps (independent calls on the same inputs
  # can run concurrently on XLA:CPU and flatter the cheaper step).
  runners = {name: chained([compiled[name]], params, state, batch) for name, (_, state) in steps.items()}
  # LookSAM, static phase: one full step and four cheap ones per call.
  looksam_full, looksam_cheap = looksam_figures[True]["compiled"], looksam_figures[False]["compiled"]
  runners["looksam (k=5)"] = chained([looksam_full] + 4 * [looksam_cheap], params, looksam_state, batch)
  # The traced phase: one program, lax.cond picks the branch from the step count.
  traced_step, traced_state = chain_step(optax.chain(sam_optax.looksam_perturb(grad_fn, rho=RHO, k=5), base()))
  traced_figures = xla_figures(traced_step, params, traced_state, batch)
  runners["looksam traced (lax.cond)"] = chained(5 * [traced_figures["compiled"]], params, traced_state, batch)
  if args.only:
    wanted = {"base", "hand-written", *(name.strip() for name in args.only.split(","))}
    assert set(runners) == set(VARIANTS), sorted(runners)
    runners = {name: runner for name, runner in runners.items() if name in wanted}
  per_call = interleaved_samples(runners, rounds=args.rounds, steps=args.steps)
  for cycle in ("looksam (k=5)", "looksam traced (lax.cond)"):
    if cycle in per_call:
      per_call[cycle] = per_call[cycle] / 5  # a call is a 5-step cycle
  figures["looksam traced (lax.cond)"] = {"flops": traced_figures["flops"], "temp_bytes": traced_figures["temp_bytes"]}
  figures["looksam (k=5)"] = {
      "flops": (looksam_figures[True]["flops"] + 4 * looksam_figures[False]["flops"]) / 5,
      "temp_bytes": max(looksam_figures[True]["temp_bytes"], looksam_figures[False]["temp_bytes"]),
  }
  base_flops, hand_temp = figures["base"]["flops"], figures["hand-written"]["temp_bytes"]

  def ratio(a, b):
    return paired_ratio(per_call[a], per_call[b])

  def shown(value):
    median, low, high = value
    return f"{median:.3f} [{low:.3f}, {high:.3f}]"

  print(f"\nFlax CNN, {num_params:,} parameters, batch {args.batch_size}, backend {jax.default_backend()}, "
        f"{jax.local_device_count()} device(s), {args.rounds} rounds x {args.steps} chained steps per variant")
  print("(ms/step: median over rounds; ratios: median of per-round paired ratios [95 % bootstrap CI])\n")
  print("| step | ms/step | × base | × hand-written | XLA flops | flops × base | temp bytes | temp × hand-written |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  order = ["base", "sam", "fsam", "asam", "gsam", "looksam (k=5)", "looksam traced (lax.cond)", "hand-written",
           "optax.contrib.sam"]
  for name in (name for name in order if name in per_call):
    f = figures[name]
    print(f"| {name} | {1e3 * np.median(per_call[name]):.2f} | {shown(ratio(name, 'base'))} | "
          f"{shown(ratio(name, 'hand-written'))} | {f['flops']:.3e} | {f['flops'] / base_flops:.3f} | "
          f"{f['temp_bytes']:,} | {f['temp_bytes'] / hand_temp if hand_temp > 0 else float('nan'):.3f} |")

  def timed_target(text, a, b, limit):
    if a not in per_call or b not in per_call:
      return text, "not timed", "–"
    value = ratio(a, b)
    if value[0] <= limit:
      word = "PASS"
    elif value[1] <= limit:
      word = "within noise"  # the median misses, but the CI reaches the limit
    else:
      word = "MISS"
    return text, word, shown(value)

  sam_flops = figures["sam"]["flops"] / base_flops
  targets = [
      timed_target("SAM <= 2.05x base step", "sam", "base", 2.05),
      timed_target("SAM <= 1.02x hand-written step", "sam", "hand-written", 1.02),
      timed_target("SAM no slower than optax.contrib.sam", "sam", "optax.contrib.sam", 1.0),
      ("SAM flops ratio 2.00", verdict(abs(sam_flops - 2.0) < 0.02), f"{sam_flops:.3f}"),
      ("SAM temp memory <= hand-written", verdict(figures["sam"]["temp_bytes"] <= hand_temp),
       f"{figures['sam']['temp_bytes']:,} vs {hand_temp:,}"),
      timed_target("LookSAM k=5 <= 1.3x base step", "looksam (k=5)", "base", 1.3),
      timed_target("GSAM <= 1.03x SAM step", "gsam", "sam", 1.03),
      ("reference: hand-written / optax.contrib.sam (identical math)", "",
       shown(ratio("hand-written", "optax.contrib.sam")) if "optax.contrib.sam" in per_call else "–"),
  ]
  print("\n| target | measured | verdict |\n|---|---:|---|")
  for text, word, value in targets:
    print(f"| {text} | {value} | {word} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
