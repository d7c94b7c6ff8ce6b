"""GSAM, LookSAM and partial perturbation (masks) against independent numpy math."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import sam_optax

RNG = np.random.default_rng(1)
N = 7
A = RNG.normal(size=(N, N))
A = A @ A.T / N + np.eye(N)
W0 = RNG.normal(size=N)
MATRICES = [A + np.diag(RNG.uniform(0.0, 1.0, size=N)) for _ in range(12)]


def split(w):
  return {"a": jnp.asarray(w[:3], jnp.float32), "b": jnp.asarray(w[3:].reshape(2, 2), jnp.float32)}


def flat(tree):
  return np.concatenate([np.asarray(tree["a"]).ravel(), np.asarray(tree["b"]).ravel()])


def loss(params, matrix):
  w = jnp.concatenate([params["a"], params["b"].ravel()])
  return 0.5 * w @ matrix @ w


grad_fn = jax.grad(loss)


def numpy_gsam_direction(w, matrix, rho, alpha):
  g = matrix @ w
  g_p = matrix @ (w + rho * g / np.linalg.norm(g))
  g_parallel = (g @ g_p) / (g_p @ g_p) * g_p
  return g_p - alpha * (g - g_parallel)


class GSAMTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_direction_matches_numpy_decomposition(self):
    rho, alpha = 0.3, 0.4
    tx = sam_optax.gsam_perturb(grad_fn, rho=rho, alpha=alpha)

    @self.variant
    def direction(params, matrix):
      out, _ = tx.update(grad_fn(params, matrix), tx.init(params), params, matrix=matrix)
      return out

    for matrix in MATRICES[:3]:
      got = flat(direction(split(W0), jnp.asarray(matrix, jnp.float32)))
      np.testing.assert_allclose(got, numpy_gsam_direction(W0, matrix, rho, alpha), rtol=1e-5)

  def test_decomposition_properties(self):
    # g_perp is orthogonal to g_p, so <out, g_p> = ||g_p||^2 (f_p is not increased).
    rho, alpha = 0.3, 0.4
    tx = sam_optax.gsam_perturb(grad_fn, rho=rho, alpha=alpha)
    matrix = jnp.asarray(MATRICES[0], jnp.float32)
    out, _ = tx.update(grad_fn(split(W0), matrix), tx.init(split(W0)), split(W0), matrix=matrix)
    g = MATRICES[0] @ W0
    g_p = MATRICES[0] @ (W0 + rho * g / np.linalg.norm(g))
    np.testing.assert_allclose(flat(out) @ g_p, g_p @ g_p, rtol=1e-5)

  def test_alpha_zero_is_sam(self):
    matrix = jnp.asarray(A, jnp.float32)
    params = split(W0)
    outs = []
    for tx in (sam_optax.gsam_perturb(grad_fn, 0.2, alpha=0.0), sam_optax.sam_perturb(grad_fn, 0.2)):
      outs.append(flat(tx.update(grad_fn(params, matrix), tx.init(params), params, matrix=matrix)[0]))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6)

  def test_rho_schedule_from_learning_rate(self):
    lr = optax.linear_schedule(0.1, 0.0, 10)
    rho = sam_optax.rho_schedule_from_learning_rate(lr, rho_max=0.2, rho_min=0.02)
    for step in range(11):
      lr_t = 0.1 * (1 - step / 10)
      expected = 0.02 + (0.2 - 0.02) * lr_t / 0.1
      np.testing.assert_allclose(float(rho(step)), expected, rtol=1e-5, atol=1e-7)
    # Used as rho: the radius of step t is rho(t).
    tx = sam_optax.gsam_perturb(grad_fn, rho=rho, alpha=0.0)
    params, matrix = split(W0), jnp.asarray(A, jnp.float32)
    state = tx.init(params)
    for step in range(3):
      out, state = tx.update(grad_fn(params, matrix), state, params, matrix=matrix)
      np.testing.assert_allclose(
          flat(out), numpy_gsam_direction(W0, A, float(rho(step)), 0.0), rtol=1e-5
      )


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(rho_max=float("nan")), ValueError, "rho_max must be finite and >= 0, got rho_max=nan"),
    (dict(rho_max=-0.1), ValueError, "rho_max must be finite and >= 0"),
    (dict(rho_max=0.1, rho_min=float("nan")), ValueError, "rho_min must be finite and >= 0"),
    (dict(rho_max=0.01, rho_min=0.1), ValueError, "need 0 <= rho_min <= rho_max"),
    (dict(rho_max=None), TypeError, "rho_max must be a number"),
    (dict(rho_max=0.1, lr_max=float("inf")), ValueError, "lr_max must be finite"),
    (dict(rho_max=0.1, lr_min="zero"), TypeError, "lr_min must be a number"),
    (dict(rho_max=0.1, lr_max="0.1"), TypeError, "lr_max must be a number"),
    (dict(rho_max=0.1, lr_max=True), TypeError, "lr_max must be a number"),
    (dict(rho_max=0.1, lr_max=0.1, lr_min=0.1), ValueError, "need lr_max > lr_min"),
])
def test_rho_schedule_from_learning_rate_rejects_bad_arguments_by_name(kwargs, error, match):
  """NaN radii used to pass (0 <= nan is False both ways) and made every rho(t) NaN."""
  with pytest.raises(error, match=f"^rho_schedule_from_learning_rate: {match}"):
    sam_optax.rho_schedule_from_learning_rate(optax.linear_schedule(0.1, 0.0, 10), **kwargs)


def test_rho_schedule_from_a_non_finite_learning_rate_is_refused():
  with pytest.raises(ValueError, match=r"learning_rate\(0\) \(the default lr_max\) must be finite"):
    sam_optax.rho_schedule_from_learning_rate(lambda count: float("nan"), 0.1)


def numpy_looksam(w, matrices, rho, k, alpha, lr):
  """LookSAM + plain SGD, written from Liu et al. 2022, Algorithm 2."""
  g_v = np.zeros_like(w)
  calls = 0
  for t, matrix in enumerate(matrices):
    g = matrix @ w
    if t % k == 0:
      g_s = matrix @ (w + rho * g / np.linalg.norm(g))
      calls += 1
      cos = g @ g_s / (np.linalg.norm(g) * np.linalg.norm(g_s))
      g_v = g_s - np.linalg.norm(g_s) * cos * g / np.linalg.norm(g)
      direction = g_s
    else:
      direction = g + alpha * np.linalg.norm(g) / np.linalg.norm(g_v) * g_v
    w = w - lr * direction
  return w, g_v, calls


class LookSAMTest(chex.TestCase):

  def _run(self, phase, k=3, rho=0.3, alpha=0.7, lr=0.05):
    calls = []

    def counting_grad_fn(params, matrix):
      jax.debug.callback(lambda: calls.append(1))
      return grad_fn(params, matrix)

    tx = optax.chain(sam_optax.looksam_perturb(counting_grad_fn, rho=rho, k=k, alpha=alpha), optax.sgd(lr))

    @functools.partial(jax.jit, static_argnames="full_step")
    def step(params, state, matrix, full_step=None):
      updates, state = tx.update(grad_fn(params, matrix), state, params, matrix=matrix, full_step=full_step)
      return optax.apply_updates(params, updates), state

    params = split(W0)
    state = tx.init(params)
    for t, matrix in enumerate(MATRICES):
      if phase == "static":
        full_step = t % k == 0
      elif phase == "traced":
        full_step = None
      params, state = step(params, state, jnp.asarray(matrix, jnp.float32), full_step=full_step)
    jax.effects_barrier()
    return params, state, len(calls)

  @parameterized.parameters("static", "traced")
  def test_matches_python_loop_and_skips_second_pass(self, phase):
    k, rho, alpha, lr = 3, 0.3, 0.7, 0.05
    params, state, calls = self._run(phase, k, rho, alpha, lr)
    expected_w, expected_g_v, expected_calls = numpy_looksam(W0, MATRICES, rho, k, alpha, lr)
    np.testing.assert_allclose(flat(params), expected_w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(flat(state[0].orthogonal_gradient), expected_g_v, rtol=1e-4, atol=1e-6)
    # grad_fn ran on every k-th step only: 12 steps, k=3 -> 4 calls.
    self.assertEqual(expected_calls, 4)
    self.assertEqual(calls, expected_calls)

  @parameterized.parameters("static", "traced")
  def test_rho_zero_is_plain_sgd(self, phase):
    """At rho = 0, g_s = g and g_v is rounding noise: it must not be rescaled to alpha ||g||."""
    lr = 0.05
    params, state, _ = self._run(phase, k=3, rho=0.0, alpha=0.7, lr=lr)
    w = W0.copy()
    for matrix in MATRICES:
      w = w - lr * matrix @ w
    np.testing.assert_allclose(flat(params), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(flat(state[0].orthogonal_gradient), np.zeros_like(w))

  def test_static_cheap_step_has_no_second_pass(self):
    traced = []

    def recording_grad_fn(params, matrix):
      traced.append(1)
      return grad_fn(params, matrix)

    tx = sam_optax.looksam_perturb(recording_grad_fn, k=5)
    params = split(W0)
    jax.make_jaxpr(lambda p, s: tx.update(p, s, p, matrix=A, full_step=False))(params, tx.init(params))
    self.assertEqual(traced, [])
    jax.make_jaxpr(lambda p, s: tx.update(p, s, p, matrix=A, full_step=True))(params, tx.init(params))
    self.assertEqual(traced, [1])

  def test_full_step_is_not_forwarded(self):
    seen = {}

    def grad_fn_kwargs(params, **kwargs):
      seen.update(kwargs)
      return grad_fn(params, kwargs["matrix"])

    tx = sam_optax.looksam_perturb(grad_fn_kwargs, k=2)
    params = split(W0)
    tx.update(params, tx.init(params), params, matrix=A, full_step=True)
    self.assertEqual(sorted(seen), ["matrix"])

  def test_bad_arguments(self):
    for bad in (0, -1, 2.5, True):
      with self.assertRaisesRegex(ValueError, "k"):
        sam_optax.looksam_perturb(grad_fn, k=bad)
    with self.assertRaisesRegex(ValueError, "alpha"):
      sam_optax.looksam_perturb(grad_fn, alpha=-0.1)
    with self.assertRaisesRegex(ValueError, "alpha"):
      sam_optax.gsam_perturb(grad_fn, alpha=-0.1)
    with self.assertRaisesRegex(ValueError, "rho"):
      sam_optax.gsam_perturb(grad_fn, rho=-0.1)
    with self.assertRaisesRegex(TypeError, "grad_fn"):
      sam_optax.looksam_perturb(3)


NESTED_PARAMS = {
    "encoder": {"dense": {"kernel": np.arange(6.0).reshape(2, 3) / 5 - 0.4, "bias": np.array([0.1, -0.2, 0.3])},
                "norm": {"scale": np.array([1.0, 0.9, 1.1])}},
    "head": {"kernel": np.array([[0.3], [-0.1], [0.2]]), "norm": {"scale": np.array([1.2])}},
}


def nested_loss(params, x):
  h = x @ params["encoder"]["dense"]["kernel"] + params["encoder"]["dense"]["bias"]
  h = jnp.tanh(h) * params["encoder"]["norm"]["scale"]
  out = (h @ params["head"]["kernel"]) * params["head"]["norm"]["scale"]
  return jnp.mean(out**2) + 0.1 * jnp.sum(params["encoder"]["dense"]["kernel"] ** 2)


def only_norm_scales(params):
  """SAM-ON: perturb only the normalization layers."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(getattr(key, "key", None) == "norm" for key in path), params
  )


@pytest.mark.parametrize("transform", ["sam", "fsam", "gsam", "looksam"])
@pytest.mark.parametrize("mask_kind", ["tree", "callable"])
def test_mask_on_nested_pytree(transform, mask_kind):
  rho = 0.5
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), NESTED_PARAMS)
  x = jnp.asarray(RNG.normal(size=(4, 2)), jnp.float32)
  nested_grad = jax.grad(nested_loss)
  mask = only_norm_scales if mask_kind == "callable" else only_norm_scales(params)
  make = {
      "sam": lambda: sam_optax.sam_perturb(nested_grad, rho=rho, mask=mask),
      "fsam": lambda: sam_optax.fsam_perturb(nested_grad, rho=rho, mask=mask),
      "gsam": lambda: sam_optax.gsam_perturb(nested_grad, rho=rho, alpha=0.0, mask=mask),
      "looksam": lambda: sam_optax.looksam_perturb(nested_grad, rho=rho, mask=mask),
  }[transform]
  tx = make()
  out, _ = jax.jit(lambda p: tx.update(nested_grad(p, x), tx.init(p), p, x=x))(params)
  # Independent computation: perturb the two norm scales only, with their own norm.
  g = nested_grad(params, x)
  selected = np.concatenate([np.asarray(g["encoder"]["norm"]["scale"]), np.asarray(g["head"]["norm"]["scale"])])
  norm = np.linalg.norm(selected)
  perturbed = jax.tree.map(lambda w: w, params)
  perturbed["encoder"]["norm"]["scale"] = params["encoder"]["norm"]["scale"] + rho * g["encoder"]["norm"]["scale"] / norm
  perturbed["head"]["norm"]["scale"] = params["head"]["norm"]["scale"] + rho * g["head"]["norm"]["scale"] / norm
  expected = nested_grad(perturbed, x)
  chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-6)


def test_mask_with_wrong_structure_is_rejected():
  params = split(W0)
  tx = sam_optax.sam_perturb(grad_fn, mask={"a": True})
  with pytest.raises(ValueError, match="mask"):
    tx.update(params, tx.init(params), params, matrix=A)


def test_gsam_and_looksam_under_pmap_match_per_device_numpy():
  devices = jax.local_device_count()
  assert devices == 8, "conftest sets 8 CPU devices"
  rho, alpha, k, lr = 0.3, 0.4, 2, 0.05
  matrices = np.stack([MATRICES[i] for i in range(devices)])

  def mean_sam_gradient(w, rho):
    return np.mean([m @ (w + rho * (m @ w) / np.linalg.norm(m @ w)) for m in matrices], axis=0)

  def project_out(v, ref):
    return v - (v @ ref) / (ref @ ref) * ref

  # GSAM: eps from each device's own gradient, decomposition of averaged g, g_p.
  tx = sam_optax.gsam_perturb(grad_fn, rho=rho, alpha=alpha, axis_name="devices")
  params = split(W0)
  state = tx.init(params)
  replicate = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * devices), tree)
  out, _ = jax.pmap(
      lambda p, s, m: tx.update(grad_fn(p, m), s, p, matrix=m), axis_name="devices"
  )(replicate(params), replicate(state), jnp.asarray(matrices, jnp.float32))
  g = np.mean([m @ W0 for m in matrices], axis=0)
  g_p = mean_sam_gradient(W0, rho)
  expected = g_p - alpha * project_out(g, g_p)
  for device in range(devices):
    np.testing.assert_allclose(flat(jax.tree.map(lambda x: x[device], out)), expected, rtol=1e-4)

  # LookSAM over 4 steps (full, cheap, full, cheap) with SGD.
  tx = optax.chain(sam_optax.looksam_perturb(grad_fn, rho=rho, k=k, alpha=0.7, axis_name="devices"), optax.sgd(lr))
  params, state = replicate(split(W0)), replicate(tx.init(split(W0)))

  def step(p, s, m):
    updates, s = tx.update(grad_fn(p, m), s, p, matrix=m)
    return optax.apply_updates(p, updates), s

  pstep = jax.pmap(step, axis_name="devices")
  w, g_v = W0.copy(), None
  for t in range(4):
    params, state = pstep(params, state, jnp.asarray(matrices, jnp.float32))
    g = np.mean([m @ w for m in matrices], axis=0)
    if t % k == 0:
      g_s = mean_sam_gradient(w, rho)
      g_v = project_out(g_s, g)
      direction = g_s
    else:
      direction = g + 0.7 * np.linalg.norm(g) / np.linalg.norm(g_v) * g_v
    w = w - lr * direction
  for device in range(devices):
    np.testing.assert_allclose(flat(jax.tree.map(lambda x: x[device], params)), w, rtol=1e-4, atol=1e-6)
