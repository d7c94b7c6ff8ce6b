"""m-sharpness by groups (``group_size``) against by-hand per-group two-pass code.

The by-hand code splits the batch into groups of m consecutive examples and, for
each group, writes SAM's two passes out with plain ``jax.grad``.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import sam_optax

DEVICES = 8
RNG = np.random.default_rng(1)
B, M = 32, 4
X = jnp.asarray(RNG.normal(size=(B, 5)), jnp.float32)
Y = jnp.asarray(RNG.normal(size=(B,)), jnp.float32)
BATCH = {"x": X, "y": Y}
PARAMS = {"w": jnp.asarray(RNG.normal(size=(5,)) * 0.5, jnp.float32),
          "b": jnp.asarray([0.1], jnp.float32)}


def loss_fn(params, batch):
  prediction = jnp.tanh(batch["x"] @ params["w"] + params["b"])
  return 0.5 * jnp.mean((prediction - batch["y"]) ** 2)


grad_fn = jax.grad(loss_fn)


def tree_norm(tree):
  return jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree)))


def tree_mean(trees):
  return jax.tree.map(lambda *xs: sum(xs) / len(xs), *trees)


def groups_of(batch, m):
  n = batch["x"].shape[0] // m
  return [{k: v[i * m:(i + 1) * m] for k, v in batch.items()} for i in range(n)]


def by_hand_grouped(params, batch, rho, m, direction=lambda g: g):
  """Returns (mean_i g_i, mean_i grad L_i(w + eps_i), mean_i L_i(w + eps_i))."""
  gs, gps, losses = [], [], []
  for group in groups_of(batch, m):
    g = jax.grad(loss_fn)(params, group)
    d = direction(g)
    norm = tree_norm(d)
    perturbed = jax.tree.map(lambda w, di: w + rho * di / (norm + 1e-12), params, d)
    gs.append(g)
    gps.append(jax.grad(loss_fn)(perturbed, group))
    losses.append(loss_fn(perturbed, group))
  return tree_mean(gs), tree_mean(gps), sum(losses) / len(losses)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def make_step(tx, gradient_fn=grad_fn):
  def step(params, opt_state, batch):
    updates, opt_state = tx.update(gradient_fn(params, batch), opt_state, params, batch=batch)
    return optax.apply_updates(params, updates), opt_state
  return step


@pytest.mark.parametrize("jit", [False, True])
def test_grouped_sam_matches_by_hand_over_steps(jit):
  rho, lr = 0.3, 0.2
  tx = optax.chain(sam_optax.sam_perturb(grad_fn, rho=rho, group_size=M), optax.sgd(lr))
  step = jax.jit(make_step(tx)) if jit else make_step(tx)
  params, state = PARAMS, tx.init(PARAMS)
  expected = PARAMS
  for _ in range(3):
    params, state = step(params, state, BATCH)
    _, gp, _ = by_hand_grouped(expected, BATCH, rho, M)
    expected = jax.tree.map(lambda w, g: w - lr * g, expected, gp)
  assert_trees_close(params, expected)


def test_grouped_fsam_state_and_params_match_by_hand():
  rho, lr, sigma, lmbda = 0.3, 0.2, 0.5, 0.8
  tx = optax.chain(sam_optax.fsam_perturb(grad_fn, rho=rho, sigma=sigma, lmbda=lmbda,
                                          group_size=M), optax.sgd(lr))
  step = jax.jit(make_step(tx))
  params, state = PARAMS, tx.init(PARAMS)
  expected, ema = PARAMS, jax.tree.map(jnp.zeros_like, PARAMS)
  for t in range(3):
    params, state = step(params, state, BATCH)
    # d_i = g_i - sigma m_{t-1}; the EMA takes the mean of the g_i (the full-batch gradient).
    g, gp, _ = by_hand_grouped(expected, BATCH, rho, M,
                               direction=lambda gi: jax.tree.map(lambda a, b: a - sigma * b, gi, ema))
    ema = g if t == 0 else jax.tree.map(lambda mi, gi: lmbda * mi + (1 - lmbda) * gi, ema, g)
    expected = jax.tree.map(lambda w, u: w - lr * u, expected, gp)
  assert_trees_close(params, expected)
  assert_trees_close(state[0].gradient_ema, ema)


def test_grouped_gsam_and_looksam_full_step_match_by_hand():
  rho, alpha = 0.3, 0.2
  g, gp, _ = by_hand_grouped(PARAMS, BATCH, rho, M)
  dot = lambda a, b: sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  # GSAM: out = g_p - alpha (g - <g, g_p>/||g_p||^2 g_p), with g, g_p the group means.
  g_perp = jax.tree.map(lambda a, b: a - dot(g, gp) / dot(gp, gp) * b, g, gp)
  expected = jax.tree.map(lambda a, b: a - alpha * b, gp, g_perp)
  tx = sam_optax.gsam_perturb(grad_fn, rho=rho, alpha=alpha, group_size=M)
  out, _ = tx.update(grad_fn(PARAMS, BATCH), tx.init(PARAMS), PARAMS, batch=BATCH)
  assert_trees_close(out, expected)
  # LookSAM full step: out = g_s, and g_v = g_s - <g_s, g>/||g||^2 g is kept.
  tx = sam_optax.looksam_perturb(grad_fn, rho=rho, k=2, group_size=M)
  out, state = tx.update(grad_fn(PARAMS, BATCH), tx.init(PARAMS), PARAMS, batch=BATCH)
  assert_trees_close(out, gp)
  assert_trees_close(state.orthogonal_gradient,
                     jax.tree.map(lambda a, b: a - dot(gp, g) / dot(g, g) * b, gp, g))


def test_grouped_perturbed_loss_is_the_mean_of_the_groups():
  tx = sam_optax.sam_perturb(jax.value_and_grad(loss_fn), rho=0.3, group_size=M,
                             value_and_grad=True)
  _, state = tx.update(grad_fn(PARAMS, BATCH), tx.init(PARAMS), PARAMS, batch=BATCH)
  _, _, expected = by_hand_grouped(PARAMS, BATCH, 0.3, M)
  np.testing.assert_allclose(state.perturbed_loss, expected, rtol=1e-6)


def test_group_size_equal_to_the_batch_is_global_sam():
  tx_grouped = sam_optax.sam_perturb(grad_fn, rho=0.3, group_size=B)
  tx_global = sam_optax.sam_perturb(grad_fn, rho=0.3)
  g = grad_fn(PARAMS, BATCH)
  assert_trees_close(tx_grouped.update(g, tx_grouped.init(PARAMS), PARAMS, batch=BATCH)[0],
                     tx_global.update(g, tx_global.init(PARAMS), PARAMS, batch=BATCH)[0])


def test_grouped_with_microbatched_grad_fn():
  rho = 0.3
  # 2 micro-batches of 16 examples, groups of 4: the micro-batch holds 4 groups.
  accumulated = sam_optax.microbatched(grad_fn, 2)
  tx = sam_optax.sam_perturb(accumulated, rho=rho, group_size=M)
  out, _ = jax.jit(lambda: tx.update(accumulated(PARAMS, BATCH), tx.init(PARAMS), PARAMS,
                                     batch=BATCH))()
  _, expected, _ = by_hand_grouped(PARAMS, BATCH, rho, M)
  assert_trees_close(out, expected)
  # 4 micro-batches of 8 do not hold whole groups of 16.
  tx = sam_optax.sam_perturb(sam_optax.microbatched(grad_fn, 4), rho=rho, group_size=16)
  with pytest.raises(ValueError, match="group_size=16 must divide the micro-batch"):
    tx.update(grad_fn(PARAMS, BATCH), tx.init(PARAMS), PARAMS, batch=BATCH)


def test_group_size_errors_name_the_argument():
  tx = sam_optax.sam_perturb(grad_fn, group_size=5)
  with pytest.raises(ValueError, match="group_size=5 must divide the batch size"):
    tx.update(grad_fn(PARAMS, BATCH), tx.init(PARAMS), PARAMS, batch=BATCH)
  with pytest.raises(ValueError, match="group_size"):
    sam_optax.sam_perturb(grad_fn, group_size=0)
  with pytest.raises(ValueError, match="sync_perturbation"):
    sam_optax.sam_perturb(grad_fn, group_size=4, sync_perturbation=True)
  tx = sam_optax.sam_perturb(grad_fn, group_size=4, batch_argnames=("data",))
  with pytest.raises(TypeError, match="batch_argnames"):
    tx.update(grad_fn(PARAMS, BATCH), tx.init(PARAMS), PARAMS, batch=BATCH)
  injected = optax.inject_hyperparams(sam_optax.sam_perturb, static_args=("grad_fn", "p"))(
      grad_fn, group_size=4)
  state = injected.init(PARAMS)
  with pytest.raises(TypeError, match="static_args"):
    jax.jit(lambda s: injected.update(grad_fn(PARAMS, BATCH), s, PARAMS, batch=BATCH))(state)


# -- on 8 devices ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eight_devices():
  assert jax.local_device_count() == DEVICES, "the root conftest sets 8 CPU devices"


def count_all_reduces(compiled_text):
  return len(re.findall(r"all-reduce(?:-start)?\(", compiled_text))


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_grouped_under_jit_with_sharded_batch(eight_devices, axis_type):
  del eight_devices
  rho, lr = 0.3, 0.2
  mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(axis_type,))
  tx = optax.chain(sam_optax.sam_perturb(grad_fn, rho=rho, group_size=M), optax.sgd(lr))

  def grouped_step(params, opt_state, batch):
    # The grouped pass computes its own gradients at w; the caller's pass 1 is unused and
    # XLA removes it.
    updates, opt_state = tx.update(params, opt_state, params, batch=batch)
    return optax.apply_updates(params, updates), opt_state

  replicated = NamedSharding(mesh, PartitionSpec())
  params = jax.device_put(PARAMS, replicated)
  opt_state = jax.device_put(tx.init(PARAMS), replicated)
  batch = jax.device_put(BATCH, NamedSharding(mesh, PartitionSpec("data")))
  with jax.set_mesh(mesh):
    step = jax.jit(grouped_step)
    expected = PARAMS
    for _ in range(3):
      params, opt_state = step(params, opt_state, batch)
      _, gp, _ = by_hand_grouped(expected, BATCH, rho, M)
      expected = jax.tree.map(lambda w, g: w - lr * g, expected, gp)
  assert_trees_close(params, expected)
  assert params["w"].sharding.is_fully_replicated


def test_grouped_step_needs_no_more_all_reduces_than_the_base_step(eight_devices):
  del eight_devices
  mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(AxisType.Auto,))
  replicated = NamedSharding(mesh, PartitionSpec())
  params = jax.device_put(PARAMS, replicated)
  batch = jax.device_put(BATCH, NamedSharding(mesh, PartitionSpec("data")))

  def chain_step(perturbation):
    tx = optax.chain(perturbation, optax.sgd(0.1)) if perturbation else optax.sgd(0.1)
    state = jax.device_put(tx.init(PARAMS), replicated)
    return jax.jit(make_step(tx)).lower(params, state, batch).compile().as_text()

  with jax.set_mesh(mesh):
    base = count_all_reduces(chain_step(None))
    grouped = count_all_reduces(chain_step(sam_optax.sam_perturb(grad_fn, group_size=M)))
    global_sam = count_all_reduces(chain_step(sam_optax.sam_perturb(grad_fn)))
  assert base >= 1
  assert grouped <= base, (grouped, base)
  assert global_sam > base  # the global eps needs the full-batch gradient first


def test_grouped_equals_the_pmap_axis_name_path(eight_devices):
  del eight_devices
  rho = 0.3
  per_device = B // DEVICES  # m = the per-device batch
  tx_pmap = sam_optax.sam_perturb(grad_fn, rho=rho, axis_name="devices")
  sharded_batch = jax.tree.map(lambda x: x.reshape(DEVICES, per_device, *x.shape[1:]), BATCH)

  @functools.partial(jax.pmap, axis_name="devices", in_axes=(None, 0))
  def pmap_update(params, batch):
    out, _ = tx_pmap.update(grad_fn(params, batch), tx_pmap.init(params), params, batch=batch)
    return out

  tx_grouped = sam_optax.sam_perturb(grad_fn, rho=rho, group_size=per_device)
  grouped, _ = tx_grouped.update(grad_fn(PARAMS, BATCH), tx_grouped.init(PARAMS), PARAMS,
                                 batch=BATCH)
  assert_trees_close(grouped, jax.tree.map(lambda x: x[0], pmap_update(PARAMS, sharded_batch)))
