"""SAM and F-SAM on 8 CPU devices: pmap, shard_map and jit with NamedSharding, against numpy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import sam_optax

DEVICES = 8
RNG = np.random.default_rng(0)
W0 = RNG.normal(size=6) * 0.5
# Each device d has its own least-squares data (X_d, y_d): loss_d(w) = mean((X_d w - y_d)^2) / 2.
X = RNG.normal(size=(DEVICES, 5, 6))
Y = RNG.normal(size=(DEVICES, 5))


def to_params(w):
  return {"w": jnp.asarray(w[:4], jnp.float32), "b": jnp.asarray(w[4:], jnp.float32)}


def from_params(params):
  return np.concatenate([np.asarray(params["w"]), np.asarray(params["b"])])


def loss_fn(params, batch):
  w = jnp.concatenate([params["w"], params["b"]])
  return 0.5 * jnp.mean((batch["x"] @ w - batch["y"]) ** 2)


grad_fn = jax.grad(loss_fn)


def numpy_grad(w, x, y):
  return x.T @ (x @ w - y) / len(y)


def numpy_sam_step(w, rho, lr, sync=False):
  """One SGD step on the device-averaged SAM gradient, eps from each device's own gradient."""
  local = [numpy_grad(w, X[d], Y[d]) for d in range(DEVICES)]
  mean_g = np.mean(local, axis=0)
  perturbed = []
  for d in range(DEVICES):
    g = mean_g if sync else local[d]
    perturbed.append(numpy_grad(w + rho * g / np.linalg.norm(g), X[d], Y[d]))
  return w - lr * np.mean(perturbed, axis=0)


def replicate(tree):
  return jax.tree.map(lambda x: jnp.stack([x] * DEVICES), tree)


@pytest.fixture(scope="module", autouse=True)
def eight_devices():
  assert jax.local_device_count() == DEVICES, "the root conftest sets 8 CPU devices"


@pytest.mark.parametrize("sync", [False, True])
def test_pmap_sam_matches_per_device_numpy(sync):
  rho, lr, steps = 0.3, 0.1, 4
  tx = optax.chain(sam_optax.sam_perturb(grad_fn, rho=rho, axis_name="devices", sync_perturbation=sync),
                   optax.sgd(lr))

  @functools.partial(jax.pmap, axis_name="devices")
  def step(params, opt_state, batch):
    updates, opt_state = tx.update(grad_fn(params, batch), opt_state, params, batch=batch)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = replicate(to_params(W0)), replicate(tx.init(to_params(W0)))
  batch = {"x": jnp.asarray(X, jnp.float32), "y": jnp.asarray(Y, jnp.float32)}
  w = W0.copy()
  for _ in range(steps):
    params, opt_state = step(params, opt_state, batch)
    w = numpy_sam_step(w, rho, lr, sync=sync)
  for d in range(DEVICES):  # identical on every device, and equal to the hand computation
    np.testing.assert_allclose(from_params(jax.tree.map(lambda x: x[d], params)), w, rtol=1e-5, atol=1e-6)
  # m-sharpness and a global eps really differ on this data.
  assert not np.allclose(numpy_sam_step(W0, rho, lr, sync=False), numpy_sam_step(W0, rho, lr, sync=True))


def test_pmap_fsam_state_identical_and_matches_numpy():
  rho, sigma, lmbda, lr, steps = 0.2, 1.0, 0.8, 0.1, 4
  tx = optax.chain(sam_optax.fsam_perturb(grad_fn, rho=rho, sigma=sigma, lmbda=lmbda, axis_name="devices"),
                   optax.sgd(lr))

  @functools.partial(jax.pmap, axis_name="devices")
  def step(params, opt_state, batch):
    updates, opt_state = tx.update(grad_fn(params, batch), opt_state, params, batch=batch)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = replicate(to_params(W0)), replicate(tx.init(to_params(W0)))
  batch = {"x": jnp.asarray(X, jnp.float32), "y": jnp.asarray(Y, jnp.float32)}
  w, m = W0.copy(), None
  for t in range(steps):
    params, opt_state = step(params, opt_state, batch)
    local = [numpy_grad(w, X[d], Y[d]) for d in range(DEVICES)]
    mean_g = np.mean(local, axis=0)
    directions = [g if m is None else g - sigma * m for g in local]  # local g minus the shared EMA
    m = mean_g if m is None else lmbda * m + (1 - lmbda) * mean_g  # EMA of the averaged gradient
    perturbed = [numpy_grad(w + rho * d / np.linalg.norm(d), X[i], Y[i]) for i, d in enumerate(directions)]
    w = w - lr * np.mean(perturbed, axis=0)
  ema = opt_state[0].gradient_ema
  for d in range(DEVICES):
    np.testing.assert_allclose(from_params(jax.tree.map(lambda x: x[d], params)), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(from_params(jax.tree.map(lambda x: x[d], ema)), m, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("check_vma", [False, True])
def test_shard_map_agrees_with_numpy(check_vma):
  """shard_map gives pmap's semantics.

  With ``check_vma=True`` (the default), the gradient of a device-invariant
  (replicated) input is already summed over the axis by JAX, so the params
  are first marked device-varying with ``jax.lax.pcast(..., to="varying")``
  to get each device's own gradient (m-sharpness).
  """
  rho, lr = 0.3, 0.1
  mesh = jax.make_mesh((DEVICES,), ("devices",), axis_types=(jax.sharding.AxisType.Explicit,))
  tx = optax.chain(sam_optax.sam_perturb(grad_fn, rho=rho, axis_name="devices"), optax.sgd(lr))
  params, opt_state = to_params(W0), tx.init(to_params(W0))

  def step(params, opt_state, batch):
    batch = jax.tree.map(lambda x: x[0], batch)  # this device's (1, ...) block -> its batch
    local_params = jax.lax.pcast(params, "devices", to="varying") if check_vma else params
    updates, opt_state = tx.update(grad_fn(local_params, batch), opt_state, local_params, batch=batch)
    return optax.apply_updates(params, updates), opt_state

  sharded_step = jax.jit(jax.shard_map(
      step, mesh=mesh,
      in_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec("devices")),
      out_specs=(PartitionSpec(), PartitionSpec()), check_vma=check_vma))
  # Explicit mesh axes: inputs must already carry the shardings the specs name.
  batch = jax.device_put({"x": jnp.asarray(X, jnp.float32), "y": jnp.asarray(Y, jnp.float32)},
                         NamedSharding(mesh, PartitionSpec("devices")))
  params, opt_state = jax.device_put((params, opt_state), NamedSharding(mesh, PartitionSpec()))
  w = W0.copy()
  for _ in range(3):
    params, opt_state = sharded_step(params, opt_state, batch)
    w = numpy_sam_step(w, rho, lr)
  np.testing.assert_allclose(from_params(params), w, rtol=1e-5, atol=1e-6)


def test_jit_with_named_sharding_is_global():
  rho, lr = 0.3, 0.1
  mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  tx = optax.chain(sam_optax.sam_perturb(grad_fn, rho=rho), optax.sgd(lr))

  @jax.jit
  def step(params, opt_state, batch):
    updates, opt_state = tx.update(grad_fn(params, batch), opt_state, params, batch=batch)
    return optax.apply_updates(params, updates), opt_state

  replicated = NamedSharding(mesh, PartitionSpec())
  params = jax.device_put(to_params(W0), replicated)
  opt_state = jax.device_put(tx.init(to_params(W0)), replicated)
  x_all, y_all = X.reshape(-1, 6), Y.reshape(-1)
  batch = jax.device_put({"x": jnp.asarray(x_all, jnp.float32), "y": jnp.asarray(y_all, jnp.float32)},
                         NamedSharding(mesh, PartitionSpec("data")))
  assert len(batch["x"].sharding.device_set) == DEVICES
  w = W0.copy()
  for _ in range(3):
    params, opt_state = step(params, opt_state, batch)
    g = numpy_grad(w, x_all, y_all)  # one global eps from the full-batch gradient
    w = w - lr * numpy_grad(w + rho * g / np.linalg.norm(g), x_all, y_all)
  np.testing.assert_allclose(from_params(params), w, rtol=1e-5, atol=1e-6)
  assert params["w"].sharding.is_fully_replicated
