"""SAM, ASAM and F-SAM against independent numpy math."""

import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import sam_optax

RNG = np.random.default_rng(0)
A = RNG.normal(size=(7, 7))
A = A @ A.T + np.eye(7)  # symmetric positive definite
W0 = RNG.normal(size=7)


def split(w):
  """A flat vector as a two-leaf pytree of mixed shapes (norm is over the tree)."""
  return {"a": jnp.asarray(w[:3], jnp.float32), "b": jnp.asarray(w[3:].reshape(2, 2), jnp.float32)}


def flat(tree):
  return np.concatenate([np.asarray(tree["a"]).ravel(), np.asarray(tree["b"]).ravel()])


def quadratic_loss(params, matrix):
  w = jnp.concatenate([params["a"], params["b"].ravel()])
  return 0.5 * w @ matrix @ w


quadratic_grad = jax.grad(quadratic_loss)


def numpy_dual(g, p):
  if math.isinf(p):
    return np.sign(g)
  q = p / (p - 1)
  return np.sign(g) * np.abs(g) ** (q - 1) / np.sum(np.abs(g) ** q) ** ((q - 1) / q)


def one_update(tx, params, matrix):
  state = tx.init(params)
  updates, _ = tx.update(quadratic_grad(params, matrix), state, params, matrix=matrix)
  return flat(updates)


class ClosedFormTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_sam_gradient_on_quadratic(self):
    rho = 0.3
    tx = sam_optax.sam_perturb(quadratic_grad, rho=rho)
    matrix = jnp.asarray(A, jnp.float32)

    @self.variant
    def sam_gradient(params):
      updates, _ = tx.update(quadratic_grad(params, matrix), tx.init(params), params, matrix=matrix)
      return updates

    # On L = 1/2 w^T A w: grad at w + rho A w / ||A w||.
    g = A @ W0
    expected = A @ (W0 + rho * g / np.linalg.norm(g))
    np.testing.assert_allclose(flat(sam_gradient(split(W0))), expected, rtol=1e-5)

  @parameterized.parameters(1.5, 2.0, 3.0, 4.5, math.inf)
  def test_general_p_against_numpy(self, p):
    rho = 0.2
    tx = sam_optax.sam_perturb(quadratic_grad, rho=rho, p=p)
    g = A @ W0
    expected = A @ (W0 + rho * numpy_dual(g, p))
    np.testing.assert_allclose(one_update(tx, split(W0), jnp.asarray(A, jnp.float32)), expected, rtol=2e-5)

  def test_p_inf_is_sign(self):
    g = {"x": jnp.array([-3.0, 0.0, 2e-8]), "y": jnp.array([[5.0]])}
    eps = sam_optax.perturbation(g, rho=0.7, p=float("inf"))
    rho = np.float32(0.7)
    np.testing.assert_array_equal(eps["x"], np.array([-rho, 0.0, rho], np.float32))
    np.testing.assert_array_equal(eps["y"], np.array([[rho]], np.float32))

  def test_asam_against_numpy(self):
    rho, eps = 0.5, 1e-12
    tx = sam_optax.sam_perturb(quadratic_grad, rho=rho, adaptive=True, eps=eps)
    g = A @ W0
    # davda54/sam and nblt/F-SAM: e_w = rho * w^2 * g / (||w * g||_2 + eps)
    e_w = rho * W0**2 * g / (np.linalg.norm(W0 * g) + eps)
    np.testing.assert_allclose(
        one_update(tx, split(W0), jnp.asarray(A, jnp.float32)), A @ (W0 + e_w), rtol=1e-5
    )

  def test_asam_general_p(self):
    rho, p = 0.5, 3.0
    g = A @ W0
    got = sam_optax.perturbation(split(g), rho, p, params=split(W0), adaptive=True)
    expected = rho * np.abs(W0) * numpy_dual(np.abs(W0) * g, p)
    np.testing.assert_allclose(flat(got), expected, rtol=2e-5)

  def test_dual_vector_unit_norm_and_alignment(self):
    g = RNG.normal(size=7)
    for p in (1.5, 2.0, 5.0):
      q = p / (p - 1)
      v = flat(sam_optax.dual_vector(split(g), p))
      np.testing.assert_allclose(np.sum(np.abs(v) ** p) ** (1 / p), 1.0, rtol=1e-5)
      # Hoelder equality: <g, v> = ||g||_q on the unit p-ball.
      np.testing.assert_allclose(g @ v, np.sum(np.abs(g) ** q) ** (1 / q), rtol=1e-5)

  def test_rho_schedule_uses_step_count(self):
    schedule = optax.linear_schedule(0.0, 1.0, transition_steps=4)
    tx = sam_optax.sam_perturb(quadratic_grad, rho=schedule)
    params = split(W0)
    matrix = jnp.asarray(A, jnp.float32)
    state = tx.init(params)
    g = A @ W0
    for step in range(4):
      updates, state = tx.update(quadratic_grad(params, matrix), state, params, matrix=matrix)
      rho = step / 4
      np.testing.assert_allclose(flat(updates), A @ (W0 + rho * g / np.linalg.norm(g)), rtol=1e-5)

  def test_mask_perturbs_selected_leaves_with_their_own_norm(self):
    rho = 0.4
    tx = sam_optax.sam_perturb(quadratic_grad, rho=rho, mask={"a": False, "b": True})
    g = A @ W0
    e = np.zeros(7)
    e[3:] = rho * g[3:] / np.linalg.norm(g[3:])
    np.testing.assert_allclose(
        one_update(tx, split(W0), jnp.asarray(A, jnp.float32)), A @ (W0 + e), rtol=1e-5
    )


def numpy_fsam_trajectory(w, batches, rho, sigma, lmbda, lr, adaptive=False, eps=1e-12):
  """Friendly-SAM + plain SGD written from the algorithm (nblt/F-SAM first_step)."""
  momentum = None
  for matrix in batches:
    g = matrix @ w
    if momentum is None:
      d = g.copy()
      momentum = g.copy()
    else:
      d = g - sigma * momentum
      momentum = momentum * lmbda + g * (1 - lmbda)
    if adaptive:
      e_w = rho * w**2 * d / (np.linalg.norm(w * d) + eps)
    else:
      e_w = rho * d / (np.linalg.norm(d) + eps)
    w = w - lr * (matrix @ (w + e_w))
  return w, momentum


class FriendlySAMTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  @parameterized.parameters(False, True)
  def test_multi_step_matches_python_loop(self, adaptive):
    rho, sigma, lmbda, lr = 0.2, 1.0, 0.9, 0.05
    batches = [np.diag(RNG.uniform(0.5, 2.0, size=7)) + 0.1 * A for _ in range(6)]
    tx = optax.chain(
        sam_optax.fsam_perturb(quadratic_grad, rho=rho, sigma=sigma, lmbda=lmbda, adaptive=adaptive),
        optax.sgd(lr),
    )
    params = split(W0)
    state = tx.init(params)

    @self.variant
    def step(params, state, matrix):
      updates, state = tx.update(quadratic_grad(params, matrix), state, params, matrix=matrix)
      return optax.apply_updates(params, updates), state

    for matrix in batches:
      params, state = step(params, state, jnp.asarray(matrix, jnp.float32))
    expected_w, expected_m = numpy_fsam_trajectory(W0, batches, rho, sigma, lmbda, lr, adaptive)
    np.testing.assert_allclose(flat(params), expected_w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(flat(state[0].gradient_ema), expected_m, rtol=1e-4, atol=1e-5)
    self.assertEqual(int(state[0].count), len(batches))

  def test_sigma_zero_first_step_equals_sam(self):
    matrix = jnp.asarray(A, jnp.float32)
    fsam = sam_optax.fsam_perturb(quadratic_grad, rho=0.3, sigma=0.0)
    sam = sam_optax.sam_perturb(quadratic_grad, rho=0.3)
    np.testing.assert_allclose(
        one_update(fsam, split(W0), matrix), one_update(sam, split(W0), matrix), rtol=1e-6
    )

  def test_ema_is_float32_for_bf16_params(self):
    params = {"w": jnp.ones((3,), jnp.bfloat16)}
    state = sam_optax.fsam_perturb(lambda p: p).init(params)
    self.assertEqual(state.gradient_ema["w"].dtype, jnp.float32)


def numpy_sam_grad(w, matrix, rho):
  g = matrix @ w
  return matrix @ (w + rho * g / np.linalg.norm(g))


@pytest.mark.parametrize(
    "base",
    [
        lambda: optax.sgd(0.05),
        lambda: optax.sgd(0.05, momentum=0.9),
        lambda: optax.adam(1e-2),
        lambda: optax.chain(optax.add_decayed_weights(5e-2), optax.sgd(0.05, momentum=0.9)),
        lambda: optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(0.05)),
        lambda: optax.sgd(optax.cosine_decay_schedule(0.05, 10)),
    ],
    ids=["sgd", "momentum", "adam", "weight_decay", "clipping", "schedule"],
)
def test_composition_with_any_chain(base):
  """chain(sam_perturb, base) == base applied to the numpy SAM gradient."""
  rho = 0.1
  matrix = jnp.asarray(A, jnp.float32)
  tx = optax.chain(sam_optax.sam_perturb(quadratic_grad, rho=rho), base())
  reference_tx = base()
  params = split(W0)
  reference_params = split(W0)
  state, reference_state = tx.init(params), reference_tx.init(reference_params)
  step = jax.jit(lambda p, s: tx.update(quadratic_grad(p, matrix), s, p, matrix=matrix))
  for _ in range(5):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    sam_grad = split(numpy_sam_grad(flat(reference_params).astype(np.float64), A, rho))
    reference_updates, reference_state = reference_tx.update(sam_grad, reference_state, reference_params)
    reference_params = optax.apply_updates(reference_params, reference_updates)
  np.testing.assert_allclose(flat(params), flat(reference_params), rtol=1e-4, atol=1e-6)


class RobustnessTest(chex.TestCase):

  @parameterized.parameters(2.0, 3.0, math.inf)
  def test_zero_gradient_gives_zero_perturbation(self, p):
    zeros = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    for eps in (1e-12, 0.0):
      out = sam_optax.perturbation(zeros, rho=0.05, p=p, eps=eps)
      for leaf in jax.tree.leaves(out):
        self.assertTrue(np.all(np.asarray(leaf) == 0.0))
    out = sam_optax.perturbation(zeros, 0.05, p, params=split(W0), adaptive=True)
    self.assertTrue(all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(out)))
    tx = sam_optax.fsam_perturb(lambda params: params, rho=0.05, p=p)
    state = tx.init(zeros)
    updates, state = tx.update(zeros, state, zeros)
    self.assertTrue(all(np.all(np.isfinite(x)) for x in jax.tree.leaves((updates, state))))

  def test_huge_gradients_do_not_overflow(self):
    # Up to float32's largest finite values, eagerly (where XLA:CPU divides through a
    # flushed-denormal reciprocal) and under jit.
    for top in (1e30, 3e38 / 5):
      g = np.array([3.0, -4.0, 0.0, 0.1, 2.0, -1.0, 5.0]) * top
      for p in (2.0, 3.0):
        expected = numpy_dual(g / top, p)
        for run in (lambda t: sam_optax.perturbation(t, rho=1.0, p=p),
                    jax.jit(lambda t: sam_optax.perturbation(t, rho=1.0, p=p))):
          got = flat(run(split(g)))
          self.assertTrue(np.all(np.isfinite(got)))
          np.testing.assert_allclose(got, expected, rtol=1e-5)

  def test_tiny_gradients_keep_direction(self):
    g = np.array([3e-20, -4e-20, 0, 0, 0, 0, 0])
    got = flat(sam_optax.perturbation(split(g), rho=1.0, eps=0.0))
    np.testing.assert_allclose(got[:2], [0.6, -0.8], rtol=1e-5)

  def test_bf16_params(self):
    params = {"w": jnp.asarray(W0, jnp.bfloat16)}
    matrix = jnp.asarray(A, jnp.bfloat16)
    grad_fn = jax.grad(lambda p, matrix: 0.5 * p["w"] @ matrix @ p["w"])
    for transform in (sam_optax.sam_perturb, sam_optax.fsam_perturb):
      tx = optax.chain(transform(grad_fn, rho=0.1), optax.sgd(0.01))
      state = tx.init(params)
      updates, state = jax.jit(lambda p, s: tx.update(grad_fn(p, matrix), s, p, matrix=matrix))(params, state)
      self.assertEqual(updates["w"].dtype, jnp.bfloat16)
      expected = -0.01 * numpy_sam_grad(W0, A, 0.1)
      np.testing.assert_allclose(np.asarray(updates["w"], np.float32), expected, rtol=5e-2, atol=5e-2)
    eps = sam_optax.perturbation({"w": jnp.asarray([3e30, 4e30], jnp.bfloat16)}, 1.0)
    np.testing.assert_allclose(np.asarray(eps["w"], np.float32), [0.6, 0.8], rtol=1e-2)


class BadInputTest(chex.TestCase):

  def test_rejects_bad_arguments_naming_them(self):
    grad_fn = jax.grad(quadratic_loss)
    cases = [
        (lambda: sam_optax.sam_perturb(grad_fn, rho=-0.1), ValueError, "rho"),
        (lambda: sam_optax.sam_perturb(grad_fn, rho=float("nan")), ValueError, "rho"),
        (lambda: sam_optax.sam_perturb(grad_fn, rho=lambda step: -1.0), ValueError, "rho"),
        (lambda: sam_optax.sam_perturb(grad_fn, p=1), ValueError, "p"),
        (lambda: sam_optax.sam_perturb(grad_fn, p=0.5), ValueError, "p"),
        (lambda: sam_optax.sam_perturb(grad_fn, p="l2"), ValueError, "p"),
        (lambda: sam_optax.sam_perturb("not a function"), TypeError, "grad_fn"),
        (lambda: sam_optax.fsam_perturb(grad_fn, lmbda=1.0), ValueError, "lmbda"),
        (lambda: sam_optax.fsam_perturb(grad_fn, lmbda=-0.1), ValueError, "lmbda"),
        (lambda: sam_optax.fsam_perturb(grad_fn, sigma=-1.0), ValueError, "sigma"),
        (lambda: sam_optax.fsam_perturb(grad_fn, rho=-1.0), ValueError, "rho"),
        (lambda: sam_optax.fsam_perturb(None), TypeError, "grad_fn"),
        (lambda: sam_optax.dual_vector({"w": jnp.ones(2)}, p=1.0), ValueError, "p"),
        (lambda: sam_optax.sam_perturb(grad_fn, p=True), TypeError, "got p=True"),
        (lambda: sam_optax.gsam_perturb(grad_fn, mask=3), TypeError, "mask must be None"),
        (lambda: sam_optax.sam_perturb(grad_fn, mask={"a": True, "b": 0.5}), TypeError,
         r"got 0.5 at mask\['b'\]"),
        (lambda: sam_optax.looksam_perturb(grad_fn, axis_name=["batch"]), TypeError,
         "axis_name must be"),
        (lambda: sam_optax.sam_perturb(lambda params, matrix, /: grad_fn(params, matrix)),
         TypeError, "parameter 'matrix' is positional-only"),
    ]
    for make, error, word in cases:
      with self.assertRaisesRegex(error, word):
        make()

  def test_wrong_tree_names_both_structures(self):
    params = split(W0)
    tx = sam_optax.sam_perturb(lambda p, matrix: {"a": p["a"]}, rho=0.1)
    with self.assertRaisesRegex(TypeError, r"(?s)params:.*'b'.*grad_fn returned:"):
      tx.update(params, tx.init(params), params, matrix=A)
    tx = sam_optax.sam_perturb(lambda p, matrix: (p, 0.0), rho=0.1)
    with self.assertRaisesRegex(TypeError, "same tree structure"):
      jax.jit(lambda p: tx.update(p, tx.init(p), p, matrix=A))(params)

  def test_wrong_incoming_updates_are_named_as_such(self):
    params = split(W0)
    for transform in (sam_optax.sam_perturb, sam_optax.looksam_perturb):
      tx = transform(quadratic_grad, rho=0.1)
      with self.assertRaisesRegex(TypeError, r"(?s)incoming updates.*updates: PyTreeDef"):
        tx.update({"a": params["a"]}, tx.init(params), params, matrix=A)

  def test_integer_params_are_refused_by_path(self):
    params = {**split(W0), "count": jnp.zeros((), jnp.int32)}
    grad = lambda p, matrix: jax.grad(
        lambda q: quadratic_loss({"a": q["a"], "b": q["b"]}, matrix), allow_int=True)(p)
    for transform in (sam_optax.sam_perturb, sam_optax.looksam_perturb):
      tx = transform(grad, rho=0.1)
      with self.assertRaisesRegex(TypeError, r"dtype int32 at \['count'\]"):
        tx.update(grad(params, A), tx.init(params), params, matrix=A)

  def test_wrong_shape_is_rejected(self):
    params = split(W0)
    tx = sam_optax.sam_perturb(lambda p: {"a": p["a"], "b": p["b"].ravel()}, rho=0.1)
    with self.assertRaisesRegex(TypeError, r"shape \(4,\).*\['b'\]"):
      tx.update(params, tx.init(params), params)

  def test_missing_batch_argument_is_named(self):
    params = split(W0)
    for transform in (sam_optax.sam_perturb, sam_optax.fsam_perturb):
      tx = transform(quadratic_grad)
      with self.assertRaisesRegex(TypeError, "'matrix'"):
        jax.jit(lambda p: tx.update(p, tx.init(p), p))(params)
      with self.assertRaisesRegex(ValueError, "params"):
        tx.update(params, tx.init(params))

  def test_forwards_only_accepted_keywords(self):
    params = split(W0)
    matrix = jnp.asarray(A, jnp.float32)
    seen = {}

    def grad_fn(p, matrix, scale=1.0):
      seen["scale"] = scale
      return jax.tree.map(lambda x: scale * x, quadratic_grad(p, matrix))

    tx = optax.chain(sam_optax.sam_perturb(grad_fn, rho=0.0), optax.identity())
    updates, _ = tx.update(quadratic_grad(params, matrix), tx.init(params), params,
                           matrix=matrix, scale=2.0, unrelated=object())
    self.assertEqual(seen["scale"], 2.0)
    np.testing.assert_allclose(flat(updates), 2.0 * A @ W0, rtol=1e-5)

    def grad_fn_kwargs(p, **kwargs):
      seen["kwargs"] = sorted(kwargs)
      return quadratic_grad(p, kwargs["matrix"])

    tx = sam_optax.sam_perturb(grad_fn_kwargs, rho=0.0)
    tx.update(params, tx.init(params), params, matrix=matrix, other=1)
    self.assertEqual(seen["kwargs"], ["matrix", "other"])


if __name__ == "__main__":
  import absl.testing.absltest
  absl.testing.absltest.main()


_TRANSFORMATIONS = ("sam_perturb", "fsam_perturb", "gsam_perturb", "looksam_perturb")


@pytest.mark.parametrize("name", _TRANSFORMATIONS)
@pytest.mark.parametrize("argument", ["adaptive", "sync_perturbation", "value_and_grad"])
@pytest.mark.parametrize("value", ["false", "True", None, 1, 0.0])
def test_flags_must_be_bools(name, argument, value):
  """A flag read from a config file as the string "false" used to switch ASAM (or synchronised eps) *on*:
  every non-empty string is truthy. Only True and False (numpy bools too) are accepted."""
  with pytest.raises(TypeError, match=f"^{name}: {argument} must be True or False, got {value!r}"):
    getattr(sam_optax, name)(jax.grad(quadratic_loss), **{argument: value})


@pytest.mark.parametrize("name", _TRANSFORMATIONS)
def test_numpy_bool_flags_are_accepted(name):
  getattr(sam_optax, name)(jax.grad(quadratic_loss), adaptive=np.bool_(True), sync_perturbation=np.bool_(False))


@pytest.mark.parametrize("name, argument", [(n, a) for n in _TRANSFORMATIONS for a in ("rho", "eps")]
                         + [("fsam_perturb", "sigma"), ("fsam_perturb", "lmbda"), ("gsam_perturb", "alpha"),
                            ("looksam_perturb", "alpha")])
@pytest.mark.parametrize("value", [True, "0.05"])
def test_numbers_are_not_bools_or_strings(name, argument, value):
  """``float(True)`` is 1.0 and ``float("0.05")`` is 0.05: both used to be taken as numbers."""
  with pytest.raises(TypeError, match=f"^{name}: {argument} (\\(the EMA decay\\) )?must be"):
    getattr(sam_optax, name)(jax.grad(quadratic_loss), **{argument: value})


def test_perturbation_flag_is_checked():
  with pytest.raises(TypeError, match="^perturbation: adaptive must be True or False, got 'yes'"):
    sam_optax.perturbation({"w": jnp.ones(2)}, 0.1, params={"w": jnp.ones(2)}, adaptive="yes")


@pytest.mark.parametrize("call, error, match", [
    (lambda: sam_optax.perturbation({"w": jnp.ones(2)}, rho=float("nan")), ValueError,
     "^perturbation: rho must be finite and >= 0, got rho=nan"),
    (lambda: sam_optax.perturbation({"w": jnp.ones(2)}, rho=-0.1), ValueError, "^perturbation: rho must be finite"),
    (lambda: sam_optax.perturbation({"w": jnp.ones(2)}, rho=jnp.float32(-0.1)), ValueError, "^perturbation: rho"),
    (lambda: sam_optax.perturbation({"w": jnp.ones(2)}, eps=-1.0), ValueError, "^perturbation: eps must be finite"),
    (lambda: sam_optax.perturbation({"w": jnp.ones(2)}, p=1.0), ValueError, "^perturbation: p must be in"),
    (lambda: sam_optax.dual_vector({"w": jnp.ones(2)}, eps=float("nan")), ValueError, "^dual_vector: eps must be"),
    (lambda: sam_optax.dual_vector({"w": jnp.ones(2)}, eps=-1e-12), ValueError, "^dual_vector: eps must be"),
])
def test_the_functional_forms_check_concrete_arguments(call, error, match):
  """A NaN rho used to give a NaN perturbation, a negative eps a silently wrong one."""
  with pytest.raises(error, match=match):
    call()


def test_the_functional_forms_take_traced_arguments():
  """Under jit (and inject_hyperparams) rho and eps are traced: they cannot be checked and are used as given."""
  g = {"w": jnp.array([3.0, 4.0])}
  eps = jax.jit(lambda rho, eps: sam_optax.perturbation(g, rho, eps=eps))(0.5, 0.0)
  np.testing.assert_allclose(eps["w"], [0.3, 0.4], rtol=1e-6)


def test_described_arguments_are_named_bare_in_the_value():
  with pytest.raises(ValueError, match=re.escape("looksam_perturb: k (the full-step period) must be an int >= 1, got k=0.")):
    sam_optax.looksam_perturb(jax.grad(quadratic_loss), k=0)
  with pytest.raises(ValueError, match=re.escape("fsam_perturb: lmbda (the EMA decay) must be in [0, 1), got lmbda=1.0.")):
    sam_optax.fsam_perturb(jax.grad(quadratic_loss), lmbda=1.0)


@pytest.mark.parametrize("name", _TRANSFORMATIONS)
def test_complex_params_are_refused_at_trace_time(name):
  """For a complex leaf jax.grad returns the conjugate of the ascent direction and the p=2 formula squared
  g instead of |g|: the perturbation of [3+4j] came out as [1-1e-8j], not a unit step along the ascent."""
  loss = lambda p, batch: jnp.sum(jnp.abs(p["w"] * batch) ** 2)  # noqa: E731
  grad_fn = jax.grad(loss)
  params = {"w": jnp.ones(2, jnp.complex64)}
  tx = getattr(sam_optax, name)(grad_fn, 0.1)
  with pytest.raises(TypeError, match=f"^{name}: params has complex leaves \\(complex64\\); .*two real parameters"):
    jax.jit(tx.update)(grad_fn(params, jnp.ones(2)), tx.init(params), params, batch=jnp.ones(2))


def test_complex_gradients_are_refused_by_the_functional_forms():
  g = {"w": jnp.array([3 + 4j, 0j], jnp.complex64), "b": jnp.ones(2)}
  with pytest.raises(TypeError, match="^dual_vector: gradient has complex leaves"):
    sam_optax.dual_vector(g)
  with pytest.raises(TypeError, match="^perturbation: gradient or params has complex leaves"):
    sam_optax.perturbation(g, 0.1)
