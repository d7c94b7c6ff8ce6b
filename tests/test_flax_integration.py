"""Flax linen (BatchNorm + dropout) and NNX integrations on the real digits data."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from sklearn.datasets import load_digits

import sam_optax
from sam_optax.flax_utils import SAMTrainState, make_linen_grad_fn, make_linen_train_step, make_nnx_grad_fn

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


@pytest.mark.parametrize("transform", [sam_optax.sam_perturb, sam_optax.fsam_perturb])
def test_nnx_optimizer_trains_on_digits(digits, transform):
  model = NNXNet(nnx.Rngs(0))
  grad_fn = make_nnx_grad_fn(nnx_loss, nnx.graphdef(model))
  optimizer = nnx.Optimizer(model, optax.chain(transform(grad_fn, rho=RHO), optax.adam(3e-3)), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, batch):
    model_state = nnx.state(model, nnx.Not(nnx.Param))  # before pass 1
    loss, grads = nnx.value_and_grad(nnx_loss)(model, batch)
    optimizer.update(model, grads, batch=batch, model_state=model_state)
    return loss

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
