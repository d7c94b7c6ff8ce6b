"""Flax linen and NNX integrations (BatchNorm + dropout).

The documented steps are compared, over several steps, with by-hand two-pass
SAM / F-SAM written with plain ``jax.grad`` (eps = rho g / ||g|| computed here,
never by sam_optax): params, BatchNorm statistics and dropout rng counts.
"""

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from sklearn.datasets import load_digits

import sam_optax
from sam_optax.flax_utils import (SAMTrainState, make_linen_grad_fn, make_linen_train_step, make_nnx_grad_fn,
                                  make_nnx_train_step, nnx_state_snapshot)

RHO = 0.05


@pytest.fixture(scope="module")
def digits():
  data = load_digits()
  x = jnp.asarray(data.data / 16.0, jnp.float32)
  y = jnp.asarray(data.target, jnp.int32)
  return [{"x": x[i:i + 128], "y": y[i:i + 128]} for i in range(0, 1280, 128)]


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(64)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.Dropout(0.3, deterministic=not train)(nn.relu(x))
    return nn.Dense(10)(x)


MODEL = LinenNet()


def linen_loss(params, batch, batch_stats, dropout_rng):
  logits, updates = MODEL.apply({"params": params, "batch_stats": batch_stats}, batch["x"], train=True,
                                rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), updates["batch_stats"]


def make_state(tx):
  variables = MODEL.init(jax.random.key(0), jnp.ones((2, 64)), train=False)
  return SAMTrainState.create(apply_fn=MODEL.apply, params=variables["params"],
                              batch_stats=variables["batch_stats"], tx=tx)


def test_linen_batchnorm_dropout_semantics(digits):
  """One step: stats of pass 1 kept; pass 2 = grad at w + eps with the same dropout rng."""
  tx = optax.chain(sam_optax.sam_perturb(make_linen_grad_fn(linen_loss), rho=RHO), optax.sgd(0.1))
  state = make_state(tx)
  batch, rng = digits[0], jax.random.key(42)
  new_state, _ = jax.jit(make_linen_train_step(linen_loss))(state, batch, rng)
  # Independent computation of the same step.
  (_, stats_at_w), g = jax.value_and_grad(linen_loss, has_aux=True)(state.params, batch, state.batch_stats, rng)
  flat_g = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(g)])
  eps = jax.tree.map(lambda x: RHO * np.asarray(x) / np.linalg.norm(flat_g), g)
  perturbed = jax.tree.map(lambda w, e: w + e, state.params, eps)
  (_, _), g_sam = jax.value_and_grad(linen_loss, has_aux=True)(perturbed, batch, state.batch_stats, rng)
  expected_params = jax.tree.map(lambda w, gs: w - 0.1 * gs, state.params, g_sam)
  for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected_params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)
  for got, want in zip(jax.tree.leaves(new_state.batch_stats), jax.tree.leaves(stats_at_w)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
  # A different dropout rng in pass 2 would give a different update: the check above is sharp.
  (_, _), g_other = jax.value_and_grad(linen_loss, has_aux=True)(perturbed, batch, state.batch_stats,
                                                                  jax.random.key(7))
  assert not np.allclose(np.asarray(g_other["Dense_0"]["kernel"]), np.asarray(g_sam["Dense_0"]["kernel"]))


@pytest.mark.parametrize("transform", [sam_optax.sam_perturb, sam_optax.fsam_perturb])
def test_linen_trains_on_digits(digits, transform):
  tx = optax.chain(transform(make_linen_grad_fn(linen_loss), rho=RHO), optax.sgd(0.05, momentum=0.9))
  state = make_state(tx)
  step = jax.jit(make_linen_train_step(linen_loss))
  losses = []
  for epoch in range(4):
    for i, batch in enumerate(digits):
      state, loss = step(state, batch, jax.random.fold_in(jax.random.key(epoch), i))
      losses.append(float(loss))
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(64, 64, rngs=rngs)
    self.norm = nnx.BatchNorm(64, momentum=0.9, rngs=rngs)
    self.dropout = nnx.Dropout(0.3, rngs=rngs)
    self.head = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    return self.head(self.dropout(nnx.relu(self.norm(self.dense(x)))))


def nnx_loss(model, batch):
  return optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"]).mean()


def test_nnx_train_step_trains_on_digits(digits):
  model = NNXNet(nnx.Rngs(0))
  grad_fn = make_nnx_grad_fn(nnx_loss, nnx.graphdef(model))
  optimizer = nnx.Optimizer(model, optax.chain(sam_optax.sam_perturb(grad_fn, rho=RHO), optax.adam(3e-3)),
                            wrt=nnx.Param)
  train_step = nnx.jit(make_nnx_train_step(nnx_loss))
  losses = [float(train_step(model, optimizer, batch)) for _ in range(3) for batch in digits]
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_nnx_minimal_hand_written_grad_fn(digits):
  """Params arrive at the transformation as an nnx.State; a plain grad_fn works on it."""

  class Linear(nnx.Module):
    def __init__(self, rngs):
      self.layer = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
      return self.layer(x)

  model = Linear(nnx.Rngs(0))
  graphdef = nnx.graphdef(model)
  seen = {}

  def grad_fn(params, batch):
    seen["type"] = type(params).__name__
    return jax.grad(lambda p: nnx_loss(nnx.merge(graphdef, p), batch))(params)

  optimizer = nnx.Optimizer(model, optax.chain(sam_optax.sam_perturb(grad_fn, rho=RHO), optax.sgd(0.1)),
                            wrt=nnx.Param)
  batch = digits[0]
  before = np.asarray(model.layer.kernel[...])
  # The SAM update by hand: gradient at w + rho g / ||g||.
  params = nnx.state(model, nnx.Param)
  g = grad_fn(params, batch)
  norm = np.sqrt(sum(np.sum(np.asarray(x) ** 2) for x in jax.tree.leaves(g)))
  g_sam = grad_fn(jax.tree.map(lambda w, x: w + RHO * x / norm, params, g), batch)
  grads = nnx.grad(nnx_loss)(model, batch)
  optimizer.update(model, grads, batch=batch)
  assert seen["type"] == "State"
  np.testing.assert_allclose(np.asarray(model.layer.kernel[...]),
                             before - 0.1 * np.asarray(g_sam["layer"]["kernel"][...]), rtol=1e-5, atol=1e-6)


# --- Several steps against by-hand two-pass SAM / F-SAM (Dropout + BatchNorm) ---------------------

STEPS, LR, SIGMA, LMBDA = 4, 0.1, 1.0, 0.6


class TinyNNX(nnx.Module):
  """Linear -> BatchNorm -> relu -> Dropout -> Linear."""

  def __init__(self, rngs):
    self.dense = nnx.Linear(8, 16, rngs=rngs)
    self.norm = nnx.BatchNorm(16, momentum=0.8, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.dropout(nnx.relu(self.norm(self.dense(x)))))


def tiny_batches(seed=0):
  keys = jax.random.split(jax.random.key(seed), 2 * STEPS)
  return [{"x": jax.random.normal(keys[2 * i], (16, 8)), "y": jax.random.randint(keys[2 * i + 1], (16,), 0, 3)}
          for i in range(STEPS)]


def tree_norm(tree):
  return np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))


class ByHandDirection:
  """SAM: d_t = g_t. F-SAM: d_0 = g_0, m_0 = g_0; d_t = g_t - sigma m_{t-1}, m_t = lmbda m_{t-1} + (1-lmbda) g_t."""

  def __init__(self, method):
    self.method, self.ema = method, None

  def __call__(self, g):
    if self.method == "sam":
      return g
    if self.ema is None:
      self.ema = g
      return g
    d = jax.tree.map(lambda gi, m: gi - SIGMA * m, g, self.ema)
    self.ema = jax.tree.map(lambda m, gi: LMBDA * m + (1 - LMBDA) * gi, self.ema, g)
    return d


def by_hand_nnx(batches, method):
  """Two passes from the same pure snapshot of the non-Param state, written with plain jax.grad."""
  graphdef, params, rest = nnx.split(TinyNNX(nnx.Rngs(0)), nnx.Param, ...)
  params, rest = nnx.as_pure((params, rest))

  def loss_and_rest(p, s, batch):
    model = nnx.merge(graphdef, p, s)
    return nnx_loss(model, batch), nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param)))

  value_and_grad = jax.jit(jax.value_and_grad(loss_and_rest, has_aux=True))
  direction, perturbed_losses = ByHandDirection(method), []
  for batch in batches:
    (_, rest_after_pass_1), g = value_and_grad(params, rest, batch)
    d = direction(g)
    scale = RHO / tree_norm(d)
    (perturbed_loss, _), g_sam = value_and_grad(jax.tree.map(lambda w, di: w + scale * di, params, d), rest,
                                                batch)  # from the same rng count and statistics as pass 1
    params = jax.tree.map(lambda w, gs: w - LR * gs, params, g_sam)
    rest = rest_after_pass_1  # pass 1's statistics and rng count are kept
    perturbed_losses.append(float(perturbed_loss))
  return params, rest, perturbed_losses


def perturb(method, grad_fn, **kwargs):
  if method == "sam":
    return sam_optax.sam_perturb(grad_fn, rho=RHO, **kwargs)
  return sam_optax.fsam_perturb(grad_fn, rho=RHO, sigma=SIGMA, lmbda=LMBDA, **kwargs)


def assert_trees_close(got, want, atol=1e-6):
  got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(got_leaves, want_leaves):
    if jnp.issubdtype(jnp.asarray(a).dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=atol)


def nnx_library_run(batches, method, value_and_grad=False):
  """The documented NNX step; returns the model and, with value_and_grad, L(w + eps) of every step."""
  model = TinyNNX(nnx.Rngs(0))
  grad_fn = make_nnx_grad_fn(nnx_loss, nnx.graphdef(model), value_and_grad=value_and_grad)
  optimizer = nnx.Optimizer(model, optax.chain(perturb(method, grad_fn, value_and_grad=value_and_grad),
                                               optax.sgd(LR)), wrt=nnx.Param)
  train_step = nnx.jit(make_nnx_train_step(nnx_loss))
  perturbed_losses = []
  for batch in batches:
    train_step(model, optimizer, batch)
    if value_and_grad:
      perturbed_losses.append(float(optax.tree_utils.tree_get(nnx.as_pure(optimizer.opt_state), "perturbed_loss")))
  return model, perturbed_losses


@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_nnx_train_step_equals_by_hand_two_pass(method):
  batches = tiny_batches()
  want_params, want_rest, _ = by_hand_nnx(batches, method)
  model, _ = nnx_library_run(batches, method)
  assert_trees_close(nnx.as_pure(nnx.state(model, nnx.Param)), want_params)
  # BatchNorm running statistics and the dropout rng count (= STEPS: pass 2 does not advance it).
  assert_trees_close(nnx_state_snapshot(model).state, want_rest)
  assert int(model.dropout.rngs.count[...]) == STEPS
  assert not np.allclose(np.asarray(model.norm.mean[...]), 0.0)


@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_nnx_functional_split_loop_equals_by_hand_two_pass(method):
  """The pure-JAX loop: jax.jit over (params, rest, opt_state), an optax chain, nnx.merge inside."""
  batches = tiny_batches()
  want_params, want_rest, _ = by_hand_nnx(batches, method)
  graphdef, params, rest = nnx.split(TinyNNX(nnx.Rngs(0)), nnx.Param, ...)
  params, rest = nnx.as_pure((params, rest))
  tx = optax.chain(perturb(method, make_nnx_grad_fn(nnx_loss, graphdef)), optax.sgd(LR))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, rest, opt_state, batch):
    def loss_and_rest(p):
      model = nnx.merge(graphdef, p, rest)
      return nnx_loss(model, batch), nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param)))

    (loss, new_rest), grads = jax.value_and_grad(loss_and_rest, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params, batch=batch, model_state=nnx_state_snapshot(rest))
    return optax.apply_updates(params, updates), new_rest, opt_state, loss

  for batch in batches:
    params, rest, opt_state, _ = step(params, rest, opt_state, batch)
  assert_trees_close(params, want_params)
  assert_trees_close(rest, want_rest)


def test_nnx_live_state_pattern_fails_loudly_and_a_late_snapshot_differs():
  """The old documented pattern (live nnx.state as model_state) is an error, not another dropout mask.

  What it computed (the state as it is after pass 1) is 6e-2 away from the by-hand two-pass here,
  so the comparisons above are sharp.
  """
  batches = tiny_batches()
  want_params, _, _ = by_hand_nnx(batches, "sam")

  def run(step):
    model = TinyNNX(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.chain(perturb("sam", make_nnx_grad_fn(nnx_loss, nnx.graphdef(model))),
                                                 optax.sgd(LR)), wrt=nnx.Param)
    for batch in batches:
      nnx.jit(step)(model, optimizer, batch)
    return nnx.as_pure(nnx.state(model, nnx.Param))

  def old_step(model, optimizer, batch):
    model_state = nnx.state(model, nnx.Not(nnx.Param))  # live Variables: advanced by pass 1
    grads = nnx.grad(nnx_loss)(model, batch)
    optimizer.update(model, grads, batch=batch, model_state=model_state)

  with pytest.raises(TypeError, match="nnx_state_snapshot"):
    run(old_step)

  def late_snapshot_step(model, optimizer, batch):
    grads = nnx.grad(nnx_loss)(model, batch)
    optimizer.update(model, grads, batch=batch, model_state=nnx_state_snapshot(model))  # after pass 1

  got = run(late_snapshot_step)
  difference = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want_params)))
  assert difference > 1e-3


def test_builders_refuse_a_flag_that_is_not_a_bool():
  """``value_and_grad="false"`` would have made grad_fn return (loss, gradient) where a gradient is expected."""
  with pytest.raises(TypeError, match="^make_linen_grad_fn: value_and_grad must be True or False, got 'false'"):
    make_linen_grad_fn(lambda params, batch, stats, rng: (0.0, stats), value_and_grad="false")
  model = TinyNNX(nnx.Rngs(0))
  with pytest.raises(TypeError, match="^make_nnx_grad_fn: value_and_grad must be True or False, got 1"):
    make_nnx_grad_fn(nnx_loss, nnx.graphdef(model), value_and_grad=1)


def test_nnx_grad_fn_needs_model_state_and_a_snapshot():
  model = TinyNNX(nnx.Rngs(0))
  grad_fn = make_nnx_grad_fn(nnx_loss, nnx.graphdef(model))
  params, batch = nnx.as_pure(nnx.state(model, nnx.Param)), tiny_batches()[0]
  with pytest.raises(ValueError, match="model_state"):
    grad_fn(params, batch)
  for not_a_snapshot in (nnx.state(model, nnx.Not(nnx.Param)), nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param)))):
    with pytest.raises(TypeError, match="nnx_state_snapshot"):
      grad_fn(params, batch, model_state=not_a_snapshot)
  # The same error through nnx.Optimizer.update when model_state is left out.
  optimizer = nnx.Optimizer(model, optax.chain(sam_optax.sam_perturb(grad_fn), optax.sgd(LR)), wrt=nnx.Param)
  grads = nnx.grad(nnx_loss)(model, batch)
  with pytest.raises(ValueError, match="model_state"):
    optimizer.update(model, grads, batch=batch)
  with pytest.raises(TypeError, match="nnx.graphdef"):
    make_nnx_grad_fn(nnx_loss, model)
  # The snapshot is a copy: running the model afterwards leaves it as it was.
  snapshot, count = nnx_state_snapshot(model), int(model.dropout.rngs.count[...])
  model(batch["x"])
  assert int(snapshot.state["dropout"]["rngs"]["count"]) == count and int(model.dropout.rngs.count[...]) == count + 1


def test_grad_fn_builders_value_and_grad_option():
  model = TinyNNX(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = nnx.as_pure((params, rest))
  batch = tiny_batches()[0]
  want_loss, want_grad = jax.value_and_grad(lambda p: nnx_loss(nnx.merge(graphdef, p, rest), batch))(params)
  loss, grad = make_nnx_grad_fn(nnx_loss, graphdef, value_and_grad=True)(params, batch, nnx_state_snapshot(rest))
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
  assert_trees_close(grad, want_grad)
  assert_trees_close(make_nnx_grad_fn(nnx_loss, graphdef)(params, batch, nnx_state_snapshot(rest)), want_grad)

  variables = MODEL.init(jax.random.key(0), jnp.ones((2, 64)), train=False)
  linen_batch = {"x": jax.random.normal(jax.random.key(1), (16, 64)), "y": jnp.arange(16) % 10}
  args = (linen_batch, variables["batch_stats"], jax.random.key(2))
  want_loss, want_grad = jax.value_and_grad(lambda p: linen_loss(p, *args)[0])(variables["params"])
  loss, grad = make_linen_grad_fn(linen_loss, value_and_grad=True)(variables["params"], *args)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
  assert_trees_close(grad, want_grad)


def by_hand_linen(batches, rngs, method):
  variables = MODEL.init(jax.random.key(0), jnp.ones((2, 64)), train=False)
  params, stats = variables["params"], variables["batch_stats"]
  value_and_grad = jax.jit(jax.value_and_grad(linen_loss, has_aux=True))
  direction, perturbed_losses = ByHandDirection(method), []
  for batch, rng in zip(batches, rngs):
    (_, stats_after_pass_1), g = value_and_grad(params, batch, stats, rng)
    d = direction(g)
    scale = RHO / tree_norm(d)
    (perturbed_loss, _), g_sam = value_and_grad(jax.tree.map(lambda w, di: w + scale * di, params, d), batch,
                                                stats, rng)
    params = jax.tree.map(lambda w, gs: w - LR * gs, params, g_sam)
    stats = stats_after_pass_1
    perturbed_losses.append(float(perturbed_loss))
  return params, stats, perturbed_losses


@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_linen_train_step_equals_by_hand_two_pass(digits, method):
  batches = digits[:STEPS]
  rngs = [jax.random.fold_in(jax.random.key(3), i) for i in range(STEPS)]
  want_params, want_stats, _ = by_hand_linen(batches, rngs, method)
  state = make_state(optax.chain(perturb(method, make_linen_grad_fn(linen_loss)), optax.sgd(LR)))
  step = jax.jit(make_linen_train_step(linen_loss))
  for batch, rng in zip(batches, rngs):
    state, _ = step(state, batch, rng)
  assert_trees_close(state.params, want_params)
  assert_trees_close(state.batch_stats, want_stats)


@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_value_and_grad_logs_the_sam_loss_nnx_and_linen(digits, method):
  """value_and_grad=True on the builders and the transformation: perturbed_loss is L(w + eps), same step."""
  batches = tiny_batches()
  want_params, _, want_losses = by_hand_nnx(batches, method)
  model, losses = nnx_library_run(batches, method, value_and_grad=True)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
  assert_trees_close(nnx.as_pure(nnx.state(model, nnx.Param)), want_params)

  batches = digits[:STEPS]
  rngs = [jax.random.fold_in(jax.random.key(3), i) for i in range(STEPS)]
  want_params, want_stats, want_losses = by_hand_linen(batches, rngs, method)
  grad_fn = make_linen_grad_fn(linen_loss, value_and_grad=True)
  state = make_state(optax.chain(perturb(method, grad_fn, value_and_grad=True), optax.sgd(LR)))
  step = jax.jit(make_linen_train_step(linen_loss))
  losses = []
  for batch, rng in zip(batches, rngs):
    state, _ = step(state, batch, rng)
    losses.append(float(optax.tree_utils.tree_get(state.opt_state, "perturbed_loss")))
  np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
  assert_trees_close(state.params, want_params)
  assert_trees_close(state.batch_stats, want_stats)


def test_an_older_flax_is_named_at_import():
  """flax_utils needs ``nnx.as_pure`` (flax 0.12.7): without it the import says which flax to install.

  A fresh interpreter whose flax lacks ``nnx.as_pure`` (removed here, as in flax <= 0.12.6).
  """
  program = "from flax import nnx\ndel nnx.as_pure\nimport sam_optax.flax_utils\n"
  completed = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
  assert completed.returncode != 0
  assert "ImportError: sam_optax.flax_utils needs flax>=0.12.7" in completed.stderr, completed.stderr[-2000:]
