"""SAM in real training loops: accumulation, injectable hyperparameters, the SAM loss,
wrappers, float64 — each against by-hand two-pass code written with plain jax.grad."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(16, 5)), jnp.float32)
Y = jnp.asarray(RNG.normal(size=(16,)), jnp.float32)
BATCH = {"x": X, "y": Y}
PARAMS = {"w1": jnp.asarray(RNG.normal(size=(5, 4)) * 0.5, jnp.float32),
          "w2": jnp.asarray(RNG.normal(size=(4,)) * 0.5, jnp.float32)}


def loss_fn(params, batch):
  hidden = jnp.tanh(batch["x"] @ params["w1"])
  return jnp.mean((hidden @ params["w2"] - batch["y"]) ** 2)


grad_fn = jax.grad(loss_fn)
value_and_grad_fn = jax.value_and_grad(loss_fn)


def tree_norm(tree):
  return jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree)))


def by_hand_sam_gradient(params, batch, rho):
  """SAM's two passes written out: eps = rho g / ||g||, then grad at w + eps."""
  g = jax.grad(loss_fn)(params, batch)
  norm = tree_norm(g)
  perturbed = jax.tree.map(lambda w, gi: w + rho * gi / (norm + 1e-12), params, g)
  return jax.grad(loss_fn)(perturbed, batch), loss_fn(perturbed, batch)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def sgd_step_fn(tx, gradient_fn=grad_fn):
  def step(params, opt_state, batch):
    updates, opt_state = tx.update(gradient_fn(params, batch), opt_state, params, batch=batch)
    return optax.apply_updates(params, updates), opt_state
  return step


# -- 2. gradient accumulation -------------------------------------------------------------


@pytest.mark.parametrize("num_microbatches", [1, 2, 4])
@pytest.mark.parametrize("jit", [False, True])
def test_microbatched_equals_whole_batch_gradient(num_microbatches, jit):
  accumulated = sam_optax.microbatched(grad_fn, num_microbatches)
  fn = jax.jit(accumulated) if jit else accumulated
  assert_trees_close(fn(PARAMS, BATCH), grad_fn(PARAMS, BATCH))
  # Positional and keyword batch, and value-and-grad functions (the loss is averaged too).
  assert_trees_close(accumulated(PARAMS, batch=BATCH), grad_fn(PARAMS, BATCH))
  value, gradient = sam_optax.microbatched(value_and_grad_fn, num_microbatches)(PARAMS, BATCH)
  np.testing.assert_allclose(value, loss_fn(PARAMS, BATCH), rtol=1e-6)
  assert_trees_close(gradient, grad_fn(PARAMS, BATCH))


def test_microbatched_sam_equals_big_batch_sam_by_hand():
  rho, lr = 0.2, 0.1
  accumulated = sam_optax.microbatched(grad_fn, 4)
  tx = optax.chain(sam_optax.sam_perturb(accumulated, rho=rho), optax.sgd(lr))
  step = jax.jit(sgd_step_fn(tx, accumulated))
  params, opt_state = PARAMS, tx.init(PARAMS)
  expected = PARAMS
  for _ in range(3):
    params, opt_state = step(params, opt_state, BATCH)
    sam_gradient, _ = by_hand_sam_gradient(expected, BATCH, rho)
    expected = jax.tree.map(lambda w, g: w - lr * g, expected, sam_gradient)
  assert_trees_close(params, expected, rtol=1e-5)


def test_microbatched_passes_other_arguments_whole():
  def noisy_grad(params, batch, scale):
    return jax.grad(lambda p: scale * loss_fn(p, batch))(params)

  accumulated = sam_optax.microbatched(noisy_grad, 2)
  assert_trees_close(accumulated(PARAMS, BATCH, 3.0),
                     jax.tree.map(lambda g: 3.0 * g, grad_fn(PARAMS, BATCH)))


def test_microbatched_errors_name_the_argument():
  with pytest.raises(ValueError, match="num_microbatches=3 must divide the batch size"):
    sam_optax.microbatched(grad_fn, 3)(PARAMS, BATCH)
  with pytest.raises(ValueError, match="num_microbatches"):
    sam_optax.microbatched(grad_fn, 0)
  with pytest.raises(TypeError, match="batch_argnames"):
    sam_optax.microbatched(grad_fn, 2, batch_argnames=("data",))(PARAMS, BATCH)


def test_multisteps_is_not_sam_on_the_accumulated_batch():
  """What the README says of optax.MultiSteps around a SAM chain, measured."""
  rho = 0.2
  tx = optax.MultiSteps(optax.chain(sam_optax.sam_perturb(grad_fn, rho=rho), optax.sgd(1.0)),
                        every_k_schedule=2)
  state = tx.init(PARAMS)
  halves = [{"x": X[:8], "y": Y[:8]}, {"x": X[8:], "y": Y[8:]}]
  params = PARAMS
  for half in halves:
    updates, state = tx.update(grad_fn(params, half), state, params, batch=half)
    params = optax.apply_updates(params, updates)
  big_batch_sam, _ = by_hand_sam_gradient(PARAMS, BATCH, rho)
  applied = jax.tree.map(lambda a, b: a - b, PARAMS, params)
  assert not np.allclose(np.asarray(applied["w2"]), np.asarray(big_batch_sam["w2"]), rtol=1e-3)
  # What it applies instead: the *last* micro-batch's gradient at w + eps, with eps
  # from the mean of the micro-batches' gradients (the inner chain runs once, with the
  # accumulated gradient and the last micro-step's extra arguments).
  mean_g = jax.tree.map(lambda a, b: (a + b) / 2, *[grad_fn(PARAMS, h) for h in halves])
  eps = jax.tree.map(lambda g: rho * g / (tree_norm(mean_g) + 1e-12), mean_g)
  last_at_perturbed = grad_fn(jax.tree.map(jnp.add, PARAMS, eps), halves[-1])
  assert_trees_close(applied, last_at_perturbed, rtol=1e-5)
  # ... whereas microbatched SAM is exactly SAM on the accumulated batch (test above).


def test_microbatched_grad_fn_taking_var_keyword_arguments():
  """A batch passed through ``**kwargs`` is found by name and split."""
  def kwargs_grad(params, **kwargs):
    return jax.grad(loss_fn)(params, kwargs["batch"])

  accumulated = sam_optax.microbatched(kwargs_grad, 4)
  assert_trees_close(accumulated(PARAMS, batch=BATCH), grad_fn(PARAMS, BATCH))
  assert_trees_close(jax.jit(accumulated)(PARAMS, batch=BATCH), grad_fn(PARAMS, BATCH))

  def scaled_grad(params, scale, **kwargs):
    return jax.grad(lambda p: scale * loss_fn(p, kwargs["batch"]))(params)

  accumulated = sam_optax.microbatched(scaled_grad, 2)
  assert_trees_close(accumulated(PARAMS, 2.0, batch=BATCH),
                     jax.tree.map(lambda g: 2.0 * g, grad_fn(PARAMS, BATCH)))
  # ... and the SAM chain forwards ``batch`` to it for the second pass.
  rho, lr = 0.2, 0.1
  accumulated = sam_optax.microbatched(kwargs_grad, 4)
  tx = optax.chain(sam_optax.sam_perturb(accumulated, rho=rho), optax.sgd(lr))
  updates, _ = tx.update(accumulated(PARAMS, batch=BATCH), tx.init(PARAMS), PARAMS, batch=BATCH)
  sam_gradient, _ = by_hand_sam_gradient(PARAMS, BATCH, rho)
  assert_trees_close(updates, jax.tree.map(lambda g: -lr * g, sam_gradient))


# -- 3. injectable, traceable hyperparameters ----------------------------------------------


PERTURBATIONS = ["sam_perturb", "fsam_perturb", "gsam_perturb", "looksam_perturb"]


@pytest.mark.parametrize("name", PERTURBATIONS)
def test_inject_hyperparams_under_jit_and_rho_set_between_steps(name):
  factory = optax.inject_hyperparams(getattr(sam_optax, name), static_args=("grad_fn", "p"))
  tx = factory(grad_fn, rho=0.05)
  state = tx.init(PARAMS)
  assert "rho" in state.hyperparams and "eps" in state.hyperparams

  @jax.jit
  def update(state):
    return tx.update(grad_fn(PARAMS, BATCH), state, PARAMS, batch=BATCH)

  updates, _ = update(state)
  # Setting rho between steps changes eps: the first step of every variant is plain SAM.
  state.hyperparams["rho"] = jnp.asarray(0.3)
  updates_03, _ = update(state)
  expected_005, _ = by_hand_sam_gradient(PARAMS, BATCH, 0.05)
  expected_03, _ = by_hand_sam_gradient(PARAMS, BATCH, 0.3)
  if name == "gsam_perturb":  # GSAM adds -alpha * g_perp; compare with alpha = 0.
    state.hyperparams["alpha"] = jnp.asarray(0.0)
    updates_03, _ = update(state)
    state.hyperparams["rho"] = jnp.asarray(0.05)
    updates, _ = update(state)
  assert_trees_close(updates, expected_005)
  assert_trees_close(updates_03, expected_03)


def test_traced_p_gets_an_error_naming_static_args():
  tx = optax.inject_hyperparams(sam_optax.sam_perturb, static_args=("grad_fn",))(grad_fn)
  state = tx.init(PARAMS)
  with pytest.raises(TypeError, match="static_args"):
    jax.jit(lambda s: tx.update(grad_fn(PARAMS, BATCH), s, PARAMS, batch=BATCH))(state)


def test_vmap_over_rho_equals_separate_by_hand_runs():
  rhos = jnp.asarray([0.0, 0.05, 0.3, 1.0])
  lr = 0.1

  def train(rho):
    tx = optax.chain(sam_optax.fsam_perturb(grad_fn, rho=rho, sigma=0.5, lmbda=0.8), optax.sgd(lr))
    params, state = PARAMS, tx.init(PARAMS)
    step = sgd_step_fn(tx)
    for _ in range(3):
      params, state = step(params, state, BATCH)
    return params

  swept = jax.jit(jax.vmap(train))(rhos)
  for i, rho in enumerate(np.asarray(rhos)):
    # F-SAM by hand: d_t = g_t - sigma m_{t-1}, m_t = lmbda m_{t-1} + (1 - lmbda) g_t, m_0 = g_0.
    params, ema = PARAMS, None
    for _ in range(3):
      g = grad_fn(params, BATCH)
      d = g if ema is None else jax.tree.map(lambda gi, mi: gi - 0.5 * mi, g, ema)
      norm = tree_norm(d)
      perturbed = jax.tree.map(lambda w, di: w + rho * di / (norm + 1e-12), params, d)
      ema = g if ema is None else jax.tree.map(lambda mi, gi: 0.8 * mi + 0.2 * gi, ema, g)
      params = jax.tree.map(lambda w, gp: w - lr * gp, params, grad_fn(perturbed, BATCH))
    assert_trees_close(jax.tree.map(lambda x: x[i], swept), params, rtol=2e-5)


def test_concrete_bad_values_are_still_rejected_at_construction():
  with pytest.raises(ValueError, match="rho"):
    sam_optax.sam_perturb(grad_fn, rho=-1.0)
  with pytest.raises(ValueError, match="lmbda"):
    optax.inject_hyperparams(sam_optax.fsam_perturb, static_args=("grad_fn", "p"))(
        grad_fn, lmbda=1.5).init(PARAMS)


# -- 4. the SAM loss for free ----------------------------------------------------------------


@pytest.mark.parametrize("name", PERTURBATIONS)
def test_perturbed_loss_is_the_loss_at_w_plus_eps(name):
  tx = optax.chain(getattr(sam_optax, name)(value_and_grad_fn, rho=0.2, value_and_grad=True),
                   optax.sgd(0.1))
  state = tx.init(PARAMS)
  assert float(optax.tree_utils.tree_get(state, "perturbed_loss")) == 0.0

  @jax.jit
  def step(params, state):
    loss, gradient = value_and_grad_fn(params, BATCH)
    updates, state = tx.update(gradient, state, params, batch=BATCH)
    return optax.apply_updates(params, updates), state, loss

  params, state, loss = step(PARAMS, state)
  _, expected = by_hand_sam_gradient(PARAMS, BATCH, 0.2)  # step 0 is SAM for every variant
  perturbed_loss = optax.tree_utils.tree_get(state, "perturbed_loss")
  assert perturbed_loss.dtype == jnp.float32 and perturbed_loss.shape == ()
  np.testing.assert_allclose(perturbed_loss, expected, rtol=1e-6)
  assert perturbed_loss > loss  # the sharpness L(w + eps) - L(w) is positive here


def test_looksam_cheap_steps_keep_the_last_full_value():
  tx = sam_optax.looksam_perturb(value_and_grad_fn, rho=0.2, k=3, value_and_grad=True)
  state = tx.init(PARAMS)
  params = PARAMS
  values = []
  for step in range(4):
    _, gradient = value_and_grad_fn(params, BATCH)
    updates, state = tx.update(gradient, state, params, batch=BATCH)
    values.append(float(state.perturbed_loss))
    if step in (0, 3):  # full steps
      _, expected = by_hand_sam_gradient(params, BATCH, 0.2)
      np.testing.assert_allclose(values[-1], expected, rtol=1e-6)
    params = optax.apply_updates(params, jax.tree.map(lambda u: -0.1 * u, updates))
  assert values[0] == values[1] == values[2] != values[3]


def test_value_and_grad_needs_a_loss_and_gradient():
  tx = sam_optax.sam_perturb(grad_fn, value_and_grad=True)
  with pytest.raises(TypeError, match=r"value_and_grad=True.*\(loss, gradient\)"):
    tx.update(grad_fn(PARAMS, BATCH), tx.init(PARAMS), PARAMS, batch=BATCH)


# -- 5. wrappers -----------------------------------------------------------------------------


def test_inside_optax_masked_or_multi_transform_fails_loudly():
  mask = {"w1": True, "w2": False}
  for tx in (
      optax.masked(sam_optax.sam_perturb(grad_fn), mask),
      optax.multi_transform({"sam": sam_optax.sam_perturb(grad_fn), "plain": optax.sgd(0.1)},
                            {"w1": "sam", "w2": "plain"}),
  ):
    with pytest.raises(TypeError, match="mask="):
      tx.update(grad_fn(PARAMS, BATCH), tx.init(PARAMS), PARAMS, batch=BATCH)


def test_apply_if_finite_after_the_perturbation_catches_a_nan_in_pass_two():
  calls = {"n": 0}

  def flaky_grad(params, batch, poison):
    # poison is 0 for the first pass and NaN for the second one (the perturbed pass).
    return jax.tree.map(lambda g: g + poison, grad_fn(params, batch))

  tx = optax.chain(sam_optax.fsam_perturb(flaky_grad, rho=0.1),
                   optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=3))
  state = tx.init(PARAMS)
  updates, state = tx.update(grad_fn(PARAMS, BATCH), state, PARAMS, batch=BATCH,
                             poison=jnp.nan)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
  assert int(state[1].notfinite_count) == 1
  del calls
  # A NaN *incoming* gradient leaves F-SAM's EMA as it was (it would poison it for ever).
  bad = jax.tree.map(lambda g: g * jnp.nan, grad_fn(PARAMS, BATCH))
  _, state2 = tx.update(bad, state, PARAMS, batch=BATCH, poison=0.0)
  assert_trees_close(state2[0].gradient_ema, state[0].gradient_ema)


def test_fsam_ema_starts_at_the_first_finite_step():
  """Non-finite first steps (as under loss scaling) must not leave m at zero for the EMA."""
  rho, sigma, lmbda, lr = 0.1, 1.0, 0.9, 0.1
  tx = optax.chain(sam_optax.fsam_perturb(grad_fn, rho=rho, sigma=sigma, lmbda=lmbda),
                   optax.apply_if_finite(optax.sgd(lr), max_consecutive_errors=5))
  step = jax.jit(sgd_step_fn(tx))
  poisoned = {"x": X.at[0, 0].set(jnp.nan), "y": Y}
  halves = [{"x": X[:8], "y": Y[:8]}, {"x": X[8:], "y": Y[8:]}] * 2
  params, state = PARAMS, tx.init(PARAMS)
  for batch in [poisoned, poisoned] + halves:
    params, state = step(params, state, batch)
  # By hand (nblt/F-SAM): the momentum buffer is created by the first step that runs.
  expected, momentum = PARAMS, None
  for batch in halves:
    g = grad_fn(expected, batch)
    if momentum is None:
      direction, momentum = g, g
    else:
      direction = jax.tree.map(lambda gi, m: gi - sigma * m, g, momentum)
      momentum = jax.tree.map(lambda m, gi: lmbda * m + (1 - lmbda) * gi, momentum, g)
    norm = tree_norm(direction)
    perturbed = jax.tree.map(lambda w, d: w + rho * d / (norm + 1e-12), expected, direction)
    expected = jax.tree.map(lambda w, gs: w - lr * gs, expected, grad_fn(perturbed, batch))
  assert_trees_close(params, expected, rtol=1e-5)
  assert_trees_close(state[0].gradient_ema, momentum, rtol=1e-5)
  assert int(state[0].count) == 6


def test_looksam_with_clipping_after_the_perturbation_clips_full_and_cheap_steps():
  max_norm = 0.05
  tx = optax.chain(sam_optax.looksam_perturb(grad_fn, rho=0.2, k=2, alpha=0.7),
                   optax.clip_by_global_norm(max_norm))
  state = tx.init(PARAMS)
  params = PARAMS
  g_v = None
  for step in range(4):
    gradient = grad_fn(params, BATCH)
    updates, state = tx.update(gradient, state, params, batch=BATCH)
    # By hand: LookSAM's update, then the clip.
    if step % 2 == 0:
      expected, _ = by_hand_sam_gradient(params, BATCH, 0.2)
      coefficient = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(expected),
                                                       jax.tree.leaves(gradient)))
      coefficient = coefficient / tree_norm(gradient) ** 2
      g_v = jax.tree.map(lambda s, g: s - coefficient * g, expected, gradient)
    else:
      scale = 0.7 * tree_norm(gradient) / tree_norm(g_v)
      expected = jax.tree.map(lambda g, v: g + scale * v, gradient, g_v)
    factor = jnp.minimum(1.0, max_norm / tree_norm(expected))
    assert_trees_close(updates, jax.tree.map(lambda e: e * factor, expected), rtol=2e-5)
    assert float(tree_norm(updates)) <= max_norm * (1 + 1e-5)
    params = optax.apply_updates(params, jax.tree.map(lambda u: -u, updates))


# -- 6. float64 ------------------------------------------------------------------------------


def test_float64_norms_rho_and_eps():
  with jax.enable_x64(True):
    huge = {"w": jnp.asarray([3e39, 4e39], jnp.float64)}
    np.testing.assert_allclose(sam_optax.dual_vector(huge)["w"], [0.6, 0.8], rtol=1e-15)
    tiny = {"w": jnp.asarray([3e-300, 4e-300], jnp.float64)}
    np.testing.assert_allclose(sam_optax.dual_vector(tiny, eps=0.0)["w"], [0.6, 0.8], rtol=1e-15)
    # A float32 leaf beside float64 leaves that set a scale beyond float32's range.
    mixed = {"a": jnp.asarray([1e-30, 0.0], jnp.float32), "b": jnp.asarray([3e300, 4e300])}
    direction = sam_optax.dual_vector(mixed)
    assert direction["a"].dtype == jnp.float32
    np.testing.assert_array_equal(direction["a"], [0.0, 0.0])  # 1e-30 / 5e300 underflows
    np.testing.assert_allclose(direction["b"], [0.6, 0.8], rtol=1e-15)
    mixed = {"a": jnp.asarray([3.0, 0.0], jnp.float32), "b": jnp.asarray([4e-200, 0.0])}
    np.testing.assert_allclose(sam_optax.dual_vector(mixed, eps=0.0)["a"], [1.0, 0.0], rtol=1e-7)
    np.testing.assert_allclose(sam_optax.dual_vector(mixed, eps=0.0)["b"], [4e-200 / 3, 0.0], rtol=1e-7)

    g = RNG.normal(size=7)
    params = {"w": jnp.asarray(RNG.normal(size=7), jnp.float64)}
    tx = sam_optax.sam_perturb(lambda p, batch: {"w": g + 0 * p["w"]}, rho=0.05)
    out, _ = tx.update({"w": jnp.asarray(g)}, tx.init(params), params, batch=None)
    assert out["w"].dtype == jnp.float64
    eps = sam_optax.perturbation({"w": jnp.asarray(g)}, rho=0.05, params=params)["w"]
    assert eps.dtype == jnp.float64
    # eps = rho g / (||g|| + 1e-12) in float64 (rho enters as 0.05, not 0.0500000007).
    np.testing.assert_allclose(np.asarray(eps), 0.05 * g / (np.linalg.norm(g) + 1e-12), rtol=1e-14)
    # GSAM's lr-proportional radius keeps float64 too (0.03, not 0.029999999).
    lr = optax.linear_schedule(0.1, 0.0, transition_steps=100)
    rho = sam_optax.rho_schedule_from_learning_rate(lr, rho_max=0.05, rho_min=0.01)
    assert rho(50).dtype == jnp.float64
    np.testing.assert_allclose(float(rho(50)), 0.01 + 0.04 * 0.5, rtol=1e-14)
