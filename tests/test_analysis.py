"""sam_optax.analysis against the dense ``jax.hessian`` of small models."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from sam_optax import analysis

RNG = np.random.default_rng(0)


def make_params(key=0):
  """A tiny conv + MLP with leaves of mixed shapes (~300 parameters)."""
  keys = jax.random.split(jax.random.key(key), 4)
  return {
      "conv": {"kernel": 0.5 * jax.random.normal(keys[0], (3, 3, 1, 4)), "bias": jnp.full((4,), 0.1)},
      "dense": {"kernel": 0.3 * jax.random.normal(keys[1], (36, 6)), "bias": jnp.zeros(6)},
      "head": {"kernel": 0.3 * jax.random.normal(keys[2], (6, 3)), "bias": jnp.zeros(3)},
  }


def loss_fn(params, batch):
  x = jax.lax.conv_general_dilated(batch["x"], params["conv"]["kernel"], (1, 1), "VALID",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  x = jnp.tanh(x + params["conv"]["bias"]).reshape(x.shape[0], -1)
  x = jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"])
  logits = x @ params["head"]["kernel"] + params["head"]["bias"]
  return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["y"][:, None], -1)[:, 0])


def make_batch(size, seed):
  rng = np.random.default_rng(seed)
  return {"x": jnp.asarray(rng.normal(size=(size, 5, 5, 1)), jnp.float32),
          "y": jnp.asarray(rng.integers(0, 3, size=size), jnp.int32)}


PARAMS = make_params()
# Batches of different sizes: the analysis must weight them by size.
BATCHES = [make_batch(7, 1), make_batch(20, 2), make_batch(3, 3)]
ALL = {k: jnp.concatenate([b[k] for b in BATCHES]) for k in BATCHES[0]}


@pytest.fixture(scope="module")
def dense():
  """Dense Hessian of the mean loss over ALL examples (= size-weighted mean of batches)."""
  with jax.default_matmul_precision("float32"):
    flat, unravel = ravel_pytree(PARAMS)
    hessian = jax.hessian(lambda f: loss_fn(unravel(f), ALL))(flat)
  hessian = np.asarray(hessian, np.float64)
  hessian = 0.5 * (hessian + hessian.T)
  values, vectors = np.linalg.eigh(hessian)
  return hessian, values, vectors


def flat(tree):
  return np.asarray(ravel_pytree(tree)[0], np.float64)


def test_hvp_matches_dense(dense):
  hessian, _, _ = dense
  v = jax.tree.map(lambda p: jnp.asarray(RNG.normal(size=p.shape), jnp.float32), PARAMS)
  got = flat(analysis.hvp(loss_fn, PARAMS, ALL, v))
  np.testing.assert_allclose(got, hessian @ flat(v), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("jit", [True, False])
def test_top_k_eigenpairs(dense, jit):
  _, values, vectors = dense
  order = np.argsort(-np.abs(values))
  result = analysis.hessian_eigenvalues(loss_fn, PARAMS, BATCHES, top_k=3, key=jax.random.key(0), jit=jit)
  np.testing.assert_allclose(result.eigenvalues, values[order[:3]], rtol=1e-3)
  for got, index in zip(result.eigenvectors, order[:3]):
    cosine = abs(flat(got) @ vectors[:, index]) / np.linalg.norm(flat(got))
    assert cosine > 0.999
  assert result.num_hvps <= 100
  eigenvalues, eigenvectors = result  # the contract: unpacks as exactly (eigenvalues, eigenvectors)
  np.testing.assert_array_equal(eigenvalues, result.eigenvalues)
  assert len(eigenvectors) == 3 and jax.tree.structure(eigenvectors[0]) == jax.tree.structure(PARAMS)
  assert np.all(result.residuals <= 1e-4 * np.abs(result.eigenvalues))


def test_extremes_and_ratio(dense):
  _, values, _ = dense
  extremes = analysis.hessian_extremes(loss_fn, PARAMS, BATCHES, key=jax.random.key(1))
  scale = max(abs(values[0]), abs(values[-1]))
  np.testing.assert_allclose(extremes.lambda_max, values[-1], rtol=1e-3, atol=1e-4 * scale)
  np.testing.assert_allclose(extremes.lambda_min, values[0], rtol=1e-3, atol=1e-4 * scale)
  assert values[0] < 0  # the test model is not convex: lambda_min is a real negative eigenvalue
  np.testing.assert_allclose(extremes.ratio, abs(values[-1] / values[0]), rtol=2e-3)
  lambda_max, lambda_min = extremes  # the contract: unpacks as exactly (lambda_max, lambda_min)
  assert (lambda_max, lambda_min) == (extremes.lambda_max, extremes.lambda_min)
  assert 3 <= extremes.num_hvps <= 150


def test_trace_within_standard_error(dense):
  hessian, _, _ = dense
  estimate = analysis.hessian_trace(loss_fn, PARAMS, BATCHES, num_samples=200, key=jax.random.key(2))
  exact = np.trace(hessian)
  assert estimate.stderr > 0
  assert abs(estimate.trace - exact) < 4 * estimate.stderr
  # Rademacher variance is 2 * sum_{i != j} H_ij^2, so the stderr is predictable too.
  expected_stderr = np.sqrt(2 * (np.sum(hessian**2) - np.sum(np.diag(hessian) ** 2)) / 200)
  assert 0.6 * expected_stderr < estimate.stderr < 1.5 * expected_stderr
  trace, stderr = estimate  # the contract: unpacks as exactly (trace, stderr)
  assert (trace, stderr) == (estimate.trace, estimate.stderr) and estimate.num_hvps == 200


def test_spectral_density_normalised_and_mean(dense):
  hessian, values, _ = dense
  n = len(values)
  result = analysis.spectral_density(loss_fn, PARAMS, BATCHES, key=jax.random.key(3), num_iters=n, num_runs=8)
  grid, density = result  # the contract: unpacks as exactly (grid, density)
  assert grid is result.grid and density is result.density and grid.shape == density.shape
  step = grid[1] - grid[0]
  np.testing.assert_allclose(np.sum(density) * step, 1.0, rtol=1e-6)
  # With num_iters = n, each run's quadrature is exact: sum_i w_i theta_i = v'Hv/v'v.
  quadrature_means = np.nansum(result.nodes * result.weights, axis=1)
  assert np.all(result.weights.sum(axis=1) > 0.999)
  mean = np.sum(grid * density) * step
  np.testing.assert_allclose(mean, quadrature_means.mean(), rtol=1e-3, atol=1e-5)
  # ... and the Rademacher quadratic forms estimate tr(H)/n.
  assert abs(mean - np.trace(hessian) / n) < 0.25 * np.abs(values).max()
  assert grid.min() <= values.min() + 1e-3 and grid.max() >= values.max() - 1e-3


def test_several_batches_are_weighted_by_size(dense):
  _, values, _ = dense
  # Unweighted averaging of the three batch Hessians would give a different top eigenvalue.
  per_batch = []
  for batch in BATCHES:
    f, unravel = ravel_pytree(PARAMS)
    per_batch.append(np.asarray(jax.jit(jax.hessian(lambda x, b: loss_fn(unravel(x), b)))(f, batch)))
  unweighted_top = np.max(np.abs(np.linalg.eigvalsh(np.mean(per_batch, axis=0))))
  weighted = analysis.hessian_eigenvalues(loss_fn, PARAMS, BATCHES, key=jax.random.key(4)).eigenvalues[0]
  assert abs(abs(weighted) - np.abs(values).max()) < 1e-3 * np.abs(values).max()
  assert abs(abs(weighted) - unweighted_top) > 1e-2 * unweighted_top


def test_bf16_params_accumulate_in_float32(dense):
  """bfloat16 params, a loss computing in float32. The top eigenvalue against the dense float32 Hessian (to
  bfloat16's rounding of the params, ~0.4 %); trace and SLQ on a known diagonal H = diag(d), where every
  Rademacher probe's v^T H v is sum(d) and every run's quadrature mean is v^T H v / v^T v = mean(d)."""
  _, values, _ = dense
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
  bf16_loss = lambda p, b: loss_fn(jax.tree.map(lambda x: x.astype(jnp.float32), p), b)  # noqa: E731
  top = analysis.hessian_eigenvalues(bf16_loss, params, BATCHES, key=jax.random.key(0), max_iters=40)
  np.testing.assert_allclose(np.abs(top.eigenvalues), np.abs(values).max(), rtol=5e-2)

  quadratic, wide, curvature = _wide_quadratic()
  wide = jax.tree.map(lambda x: x.astype(jnp.bfloat16), wide)
  in_float32 = lambda w, d: quadratic(jax.tree.map(lambda x: x.astype(jnp.float32), w), d)  # noqa: E731
  d = flat(curvature)
  trace = analysis.hessian_trace(in_float32, wide, [curvature], 4, key=jax.random.key(1))
  np.testing.assert_allclose(trace.samples, d.sum(), rtol=1e-6)
  density = analysis.spectral_density(in_float32, wide, [curvature], key=jax.random.key(2), num_iters=20,
                                      num_runs=2)
  np.testing.assert_allclose(np.sum(density.density) * (density.grid[1] - density.grid[0]), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.nansum(density.nodes * density.weights, axis=1), d.mean(), rtol=1e-3)
  np.testing.assert_allclose(np.nanmax(density.nodes, axis=1), 9.0, rtol=5e-3)  # H v rounded to bfloat16


def test_float16_params_keep_unit_lanczos_vectors():
  """The host loop keeps unnormalised vectors (``||w|| H q`` products) only where the params have float32's
  range: in float16 (max 65504) a product of an unnormalised Gaussian start would overflow here."""
  wide = analysis.hessian._wide_range
  assert wide(PARAMS) and wide(jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS))
  assert wide({"steps": jnp.zeros(3, jnp.int32), "w": jnp.ones(2)})
  assert not wide(jax.tree.map(lambda x: x.astype(jnp.float16), PARAMS))
  curvature = jnp.asarray(np.concatenate([[3e4, 1e4], np.linspace(1.0, 10.0, 62)]), jnp.float16)
  quadratic = lambda w, d: 0.5 * jnp.sum(d * w ** 2)  # H = diag(d), every product in float16
  params = jnp.ones(64, jnp.float16)
  assert analysis.hessian._iteration_design(analysis.hessian_operator(quadratic, params, [curvature], jit=False)) \
      == "host"
  result = analysis.hessian_eigenvalues(quadratic, params, [curvature], top_k=2, key=jax.random.key(0), jit=False)
  np.testing.assert_allclose(result.eigenvalues, [3e4, 1e4], rtol=1e-3)


def test_inputs_are_not_mutated():
  before = [np.array(x) for x in jax.tree.leaves(PARAMS)]
  analysis.sharpness_summary(loss_fn, PARAMS, BATCHES, key=jax.random.key(5), trace_samples=4)
  analysis.loss_surface_1d(loss_fn, PARAMS, BATCHES, PARAMS, [0.5])
  for a, b in zip(before, jax.tree.leaves(PARAMS)):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_summary_fields(dense):
  _, values, _ = dense
  summary = analysis.sharpness_summary(loss_fn, PARAMS, BATCHES, key=jax.random.key(6), trace_samples=8)
  np.testing.assert_allclose(summary.lambda_max, values[-1], rtol=1e-3)
  np.testing.assert_allclose(summary.lambda_min, values[0], rtol=1e-3, atol=1e-4 * values[-1])
  np.testing.assert_allclose(summary.lambda_ratio, abs(values[-1] / values[0]), rtol=5e-3)
  assert summary.num_hvps > 8


def test_filter_normalized_direction():
  direction = analysis.filter_normalized_direction(PARAMS, jax.random.key(7))
  for name in ("conv", "dense", "head"):
    w, d = np.asarray(PARAMS[name]["kernel"]), np.asarray(direction[name]["kernel"])
    axes = tuple(range(w.ndim - 1))  # one filter per output channel (last axis)
    np.testing.assert_allclose(np.sqrt((d**2).sum(axes)), np.sqrt((w**2).sum(axes)), rtol=1e-5)
    assert not np.allclose(d, w)
    np.testing.assert_array_equal(np.asarray(direction[name]["bias"]), 0.0)
  copied = analysis.filter_normalized_direction(PARAMS, jax.random.key(7), ignore=None)
  np.testing.assert_array_equal(np.asarray(copied["conv"]["bias"]), np.asarray(PARAMS["conv"]["bias"]))
  with pytest.raises(ValueError, match="^filter_normalized_direction: ignore must be"):
    analysis.filter_normalized_direction(PARAMS, jax.random.key(7), ignore="bn")
  # Only 1-D leaves: ignore='biasbn' would give a zero direction (a flat landscape).
  with pytest.raises(ValueError, match="every leaf of params is 0- or 1-D.*ignore=None"):
    analysis.filter_normalized_direction({"w": jnp.ones(3), "b": jnp.ones(())}, jax.random.key(7))


def weighted_loss(params):
  sizes = np.array([len(b["y"]) for b in BATCHES], np.float64)
  return float(sum(s * loss_fn(params, b) for s, b in zip(sizes, BATCHES)) / sizes.sum())


def shifted(params, *terms):
  return jax.tree.map(lambda w, *ds: w + sum(c * d for c, d in zip(terms[::2], ds)), params, *terms[1::2])


def test_a_key_riding_in_the_batch_does_not_set_its_weight():
  """``{'dropout_rng': raw key, 'x', 'y'}``: the key is the first leaf, but the weights stay n_b / N."""
  keyed = [{"dropout_rng": jax.random.PRNGKey(i), **b} for i, b in enumerate(BATCHES)]
  typed = [{"a_key": jax.random.key(i), **b} for i, b in enumerate(BATCHES)]
  keyed_loss = lambda params, batch: loss_fn(params, {"x": batch["x"], "y": batch["y"]})  # noqa: E731
  for batches in (keyed, typed):
    curve = analysis.loss_surface_1d(keyed_loss, PARAMS, batches, jax.tree.map(jnp.zeros_like, PARAMS), [0.0])
    np.testing.assert_allclose(curve[0], weighted_loss(PARAMS), rtol=1e-5)


def test_loss_surfaces_match_point_by_point():
  dx = analysis.filter_normalized_direction(PARAMS, jax.random.key(8))
  dy = analysis.filter_normalized_direction(PARAMS, jax.random.key(9))
  alphas = np.linspace(-1, 1, 5)
  curve = analysis.loss_surface_1d(loss_fn, PARAMS, BATCHES, dx, alphas, chunk_size=2)
  assert curve.shape == (5,)
  np.testing.assert_allclose(curve[2], weighted_loss(PARAMS), rtol=1e-5)  # alpha = 0 is the loss
  for alpha, value in zip(alphas, curve):
    np.testing.assert_allclose(value, weighted_loss(jax.tree.map(lambda w, d: w + alpha * d, PARAMS, dx)), rtol=1e-5)
  xs, ys = np.linspace(-0.5, 0.5, 3), np.linspace(-1, 1, 4)
  grid = analysis.loss_surface_2d(loss_fn, PARAMS, BATCHES, dx, dy, xs, ys, chunk_size=5)
  assert grid.shape == (3, 4)
  for i, x in enumerate(xs):
    for j, y in enumerate(ys):
      point = jax.tree.map(lambda w, a, b: w + x * a + y * b, PARAMS, dx, dy)
      np.testing.assert_allclose(grid[i, j], weighted_loss(point), rtol=1e-5)


def test_bad_batches_are_rejected():
  with pytest.raises(TypeError, match="sequence"):
    analysis.hessian_trace(loss_fn, PARAMS, BATCHES[0], key=jax.random.key(0))
  with pytest.raises(ValueError, match="empty"):
    analysis.hessian_extremes(loss_fn, PARAMS, [], key=jax.random.key(0))


_ENTRY_POINTS = {
    "hessian_operator": lambda loss, params, batches: analysis.hessian_operator(loss, params, batches),
    "hessian_eigenvalues": lambda loss, params, batches: analysis.hessian_eigenvalues(
        loss, params, batches, key=jax.random.key(0)),
    "hessian_extremes": lambda loss, params, batches: analysis.hessian_extremes(
        loss, params, batches, key=jax.random.key(0)),
    "hessian_trace": lambda loss, params, batches: analysis.hessian_trace(loss, params, batches, key=jax.random.key(0)),
    "spectral_density": lambda loss, params, batches: analysis.spectral_density(
        loss, params, batches, key=jax.random.key(0)),
    "sharpness_summary": lambda loss, params, batches: analysis.sharpness_summary(
        loss, params, batches, key=jax.random.key(0)),
    "loss_surface_1d": lambda loss, params, batches: analysis.loss_surface_1d(
        loss, params, batches, jax.tree.map(jnp.ones_like, params), [0.0]),
    "loss_surface_2d": lambda loss, params, batches: analysis.loss_surface_2d(
        loss, params, batches, jax.tree.map(jnp.ones_like, params), jax.tree.map(jnp.ones_like, params), [0.0], [0.0]),
}


@pytest.mark.parametrize("name", sorted(_ENTRY_POINTS))
@pytest.mark.parametrize("batches, error, match", [
    # one batch passed bare: iterating an array would make every example (row) a batch of its own
    (jnp.ones((4, 4)), TypeError, r"batches must be a sequence \(or iterable\) of batches, got type ArrayImpl; wrap"),
    (np.ones((4, 4)), TypeError, "batches must be a sequence .* got type ndarray"),
    ({"x": jnp.ones((4, 4))}, TypeError, "batches must be a sequence .* got type dict"),
    (3.0, TypeError, "batches must be a sequence"),
    ([], ValueError, "batches is empty"),
    ([jnp.ones((2, 4)), jnp.float32(1.0)], ValueError, r"batches\[1\] must be a pytree with an array leaf that has a"),
])
def test_every_entry_point_names_itself_and_batches(name, batches, error, match):
  """Each public analysis function checks ``batches`` before any work, and the message starts with its name."""
  loss = lambda w, batch: 0.5 * jnp.sum(jnp.mean(batch, axis=0) * w ** 2)  # noqa: E731
  with pytest.raises(error, match=f"^{name}: {match}"):
    _ENTRY_POINTS[name](loss, jnp.ones(4), batches)


@pytest.mark.parametrize("name", sorted(set(_ENTRY_POINTS) - {"loss_surface_1d", "loss_surface_2d"}))
def test_jit_must_be_a_bool(name):
  """``jit="false"`` would have jitted (a non-empty string is truthy)."""
  call = {"hessian_operator": lambda: analysis.hessian_operator(*_ARGS, jit="false"),
          "hessian_eigenvalues": lambda: analysis.hessian_eigenvalues(*_ARGS, key=_KEY, jit="false"),
          "hessian_extremes": lambda: analysis.hessian_extremes(*_ARGS, key=_KEY, jit="false"),
          "hessian_trace": lambda: analysis.hessian_trace(*_ARGS, key=_KEY, jit="false"),
          "spectral_density": lambda: analysis.spectral_density(*_ARGS, key=_KEY, jit="false"),
          "sharpness_summary": lambda: analysis.sharpness_summary(*_ARGS, key=_KEY, jit="false")}[name]
  with pytest.raises(TypeError, match=f"^{name}: jit must be True or False, got 'false'"):
    call()


def test_linearize_must_be_none_or_a_bool():
  with pytest.raises(TypeError, match="^hessian_operator: linearize must be True or False, got 'auto'"):
    analysis.hessian_operator(*_ARGS, linearize="auto")


@pytest.mark.parametrize("name", sorted(_ENTRY_POINTS))
def test_every_entry_point_names_itself_for_loss_fn_and_params(name):
  batches = [jnp.ones((2, 4))]
  with pytest.raises(TypeError, match=f"^{name}: loss_fn must be a callable"):
    _ENTRY_POINTS[name]("loss", jnp.ones(4), batches)
  with pytest.raises(TypeError, match=f"^{name}: params must be a non-empty pytree of floating-point arrays"):
    _ENTRY_POINTS[name](lambda w, b: jnp.sum(w), jnp.ones(4, jnp.int32), batches)


_KEY = jax.random.key(0)
_DIAGONAL_LOSS = lambda w, batch: 0.5 * jnp.sum(batch * w ** 2)  # noqa: E731  H = diag(batch)
_ARGS = (_DIAGONAL_LOSS, jnp.ones(4), [jnp.arange(1.0, 5.0)])


@pytest.mark.parametrize("call, error, match", [
    (lambda: analysis.hessian_eigenvalues(*_ARGS, top_k=0, key=_KEY), ValueError, "top_k"),
    (lambda: analysis.hessian_eigenvalues(*_ARGS, top_k=2.0, key=_KEY), ValueError, "top_k"),
    (lambda: analysis.hessian_eigenvalues(*_ARGS, max_iters=0, key=_KEY), ValueError, "max_iters"),
    (lambda: analysis.hessian_eigenvalues(*_ARGS, top_k=3, max_iters=2, key=_KEY), ValueError,
     r"^hessian_eigenvalues: max_iters \(2\) must be >= top_k \(3\)"),
    (lambda: analysis.hessian_eigenvalues(*_ARGS, tol=-1.0, key=_KEY), ValueError, "tol"),
    (lambda: analysis.hessian_eigenvalues(*_ARGS, tol=float("nan"), key=_KEY), ValueError, "tol"),
    (lambda: analysis.hessian_eigenvalues(*_ARGS, key=0), TypeError, "key"),
    (lambda: analysis.hessian_eigenvalues(*_ARGS, key=jax.random.split(_KEY)), TypeError, "key"),
    (lambda: analysis.hessian_extremes(*_ARGS, tol=-1e-3, key=_KEY), ValueError, "tol"),
    (lambda: analysis.hessian_extremes(*_ARGS, max_iters=0, key=_KEY), ValueError, "max_iters"),
    (lambda: analysis.hessian_extremes(*_ARGS, key=None), TypeError, "key"),
    (lambda: analysis.hessian_trace(*_ARGS, 1, key=_KEY), ValueError, "num_samples"),
    (lambda: analysis.hessian_trace(*_ARGS, key=_KEY, block_size=0), ValueError, "block_size"),
    (lambda: analysis.hessian_trace(*_ARGS, key=7), TypeError, "key"),
    (lambda: analysis.spectral_density(*_ARGS, key=_KEY, num_iters=0), ValueError, "num_iters"),
    (lambda: analysis.spectral_density(*_ARGS, key=_KEY, num_runs=0), ValueError, "num_runs"),
    (lambda: analysis.spectral_density(*_ARGS, key=_KEY, num_bins=1), ValueError, "num_bins"),
    (lambda: analysis.spectral_density(*_ARGS, key=_KEY, sigma_squared=0.0), ValueError, "sigma_squared"),
    (lambda: analysis.spectral_density(*_ARGS, key=_KEY, overhead=-0.1), ValueError, "overhead"),
    (lambda: analysis.spectral_density(*_ARGS, key=_KEY, block_size=0), ValueError, "block_size"),
    (lambda: analysis.sharpness_summary(*_ARGS, key=_KEY, trace_samples=1), ValueError, "trace_samples"),
    (lambda: analysis.sharpness_summary(*_ARGS, key=_KEY, trace_block_size=0), ValueError, "trace_block_size"),
    (lambda: analysis.sharpness_summary(*_ARGS, key=_KEY, tol=-1.0), ValueError, "tol"),
    (lambda: analysis.hessian_operator(None, jnp.ones(4), _ARGS[2]), TypeError, "loss_fn"),
    (lambda: analysis.hessian_operator(_DIAGONAL_LOSS, {}, _ARGS[2]), TypeError, "params"),
    (lambda: analysis.hessian_operator(_DIAGONAL_LOSS, jnp.ones(4, jnp.int32), _ARGS[2]), TypeError, "params"),
    (lambda: analysis.hvp(_DIAGONAL_LOSS, jnp.ones(4), _ARGS[2][0], jnp.ones(3)), ValueError, "v must"),
    (lambda: analysis.hvp(_DIAGONAL_LOSS, jnp.ones(4), _ARGS[2][0], {"a": jnp.ones(4)}), ValueError, "v must"),
    (lambda: analysis.lanczos(lambda v: 2.0 * v, jnp.ones(3), 0), ValueError, "max_iters"),
    (lambda: analysis.lanczos(lambda v: 2.0 * v, jnp.ones(3), 3, min_iters=0), ValueError, "min_iters"),
    (lambda: analysis.lanczos(lambda v: 2.0 * v, jnp.zeros(3), 3), ValueError, "start"),
    (lambda: analysis.lanczos(lambda v: 2.0 * v, jnp.array([1.0, jnp.inf]), 3), ValueError, "start"),
    (lambda: analysis.lanczos("H", jnp.ones(3), 3), TypeError, "matvec"),
    (lambda: analysis.lanczos(lambda v: v, jnp.ones(3), 3, converged=True), TypeError, "converged"),
    (lambda: analysis.loss_surface_1d(*_ARGS, jnp.ones(4), [0.0, 1.0], chunk_size=0), ValueError, "chunk_size"),
    (lambda: analysis.loss_surface_1d(*_ARGS, jnp.ones(3), [0.0, 1.0]), ValueError, "direction"),
    (lambda: analysis.loss_surface_2d(*_ARGS, jnp.ones(4), {"a": jnp.ones(4)}, [0.0], [0.0]), ValueError, "dir_y"),
    (lambda: analysis.filter_normalized_direction({"k": jnp.ones((2, 2))}, 0), TypeError, "key"),
])
def test_bad_arguments_are_rejected_by_name(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_a_raw_prng_key_is_the_same_key():
  """``jax.random.PRNGKey(seed)`` (raw uint32 data) gives exactly what ``jax.random.key(seed)`` gives, and
  another seed does not (so the comparison can tell keys apart)."""
  a = np.random.default_rng(0).normal(size=(12, 12))
  matrix = jnp.asarray(a + a.T, jnp.float32)
  quadratic = lambda w, batch: 0.5 * jnp.mean(batch) * w @ matrix @ w  # noqa: E731  H = matrix
  args = (quadratic, jnp.ones(12), [jnp.ones(2)])

  def fields(result):
    return jax.tree.leaves(vars(result) if dataclasses.is_dataclass(result) else result._asdict())

  for fn, kwargs in ((analysis.hessian_eigenvalues, dict(top_k=2)), (analysis.hessian_extremes, {}),
                     (analysis.hessian_trace, dict(num_samples=4)), (analysis.sharpness_summary, {}),
                     (analysis.spectral_density, dict(num_iters=4, num_bins=16))):
    typed, raw, other = (fields(fn(*args, key=key, **kwargs))
                         for key in (jax.random.key(3), jax.random.PRNGKey(3), jax.random.key(4)))
    assert len(typed) == len(raw) >= 2
    for x, y in zip(typed, raw):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(typed, other)), fn.__name__


@pytest.mark.parametrize("jit", [True, False])
def test_lanczos_of_a_matvec_returning_its_argument(jit):
  """``H = diag(1, 1, 3)`` with ``H v`` handing back ``v``'s own array for the identity block: no clash with
  the in-place three-term step, and the eigenvalues are exact."""
  start = {"identity": jnp.ones(2), "three": jnp.ones(1)}
  result = analysis.lanczos(lambda v: {"identity": v["identity"], "three": 3.0 * v["three"]}, start, 3, jit=jit)
  np.testing.assert_allclose(np.sort(result.ritz_values)[-1], 3.0, rtol=1e-6)
  np.testing.assert_allclose(np.sort(result.ritz_values)[0], 1.0, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(start["identity"]), np.ones(2))  # the caller's start is untouched


def test_zero_tolerance_runs_max_iters(dense):
  """``tol=0``: no early stop (and no warnings); ``max_iters`` HVPs, the eigenvalue still exact."""
  _, values, _ = dense
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    result = analysis.hessian_eigenvalues(loss_fn, PARAMS, BATCHES, key=jax.random.key(1), tol=0.0, max_iters=30)
  assert result.num_hvps == 30
  np.testing.assert_allclose(result.eigenvalues[0], values[np.argmax(np.abs(values))], rtol=1e-5)


def test_stopping_short_of_tol_warns():
  """``max_iters`` reached before ``tol``: a RuntimeWarning naming both; a converged run stays silent."""
  with pytest.warns(RuntimeWarning, match=r"hessian_eigenvalues: not converged within max_iters=4"):
    result = analysis.hessian_eigenvalues(loss_fn, PARAMS, BATCHES, top_k=2, key=jax.random.key(2), max_iters=4)
  assert result.num_hvps == 4 and np.max(result.residuals / np.abs(result.eigenvalues)) > 1e-4
  with pytest.warns(RuntimeWarning, match=r"hessian_extremes: not converged within max_iters=3"):
    analysis.hessian_extremes(loss_fn, PARAMS, BATCHES, key=jax.random.key(2), max_iters=3)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    analysis.hessian_extremes(loss_fn, PARAMS, BATCHES, key=jax.random.key(2))


def _diagonal_operator():
  """A 4000 x 4000 diagonal H (five outliers over a bulk in [0, 5]) acting on a two-leaf pytree."""
  values = np.concatenate([[100.0, 95.0, 80.0, 60.0, 50.0], np.random.default_rng(0).uniform(0, 5, 3995)])
  d = jnp.asarray(values, jnp.float32)

  def matvec(v):
    return {"a": d[:1000] * v["a"], "b": d[1000:].reshape(60, 50) * v["b"]}

  start = {"a": jnp.ones(1000), "b": jnp.ones((60, 50))}
  return matvec, start, values


def _gram_error(basis):
  q = np.stack([np.concatenate([np.asarray(v["a"], np.float64), np.asarray(v["b"], np.float64).ravel()])
                for v in basis])
  return np.abs(q @ q.T - np.eye(len(basis))).max()


def test_lanczos_without_reorthogonalisation_loses_orthogonality():
  """The premise of the next test, in plain float32 numpy: the bare three-term recurrence."""
  _, _, values = _diagonal_operator()
  h = values.astype(np.float32)
  q, q_prev, beta, basis = np.full(h.size, 1 / np.sqrt(h.size), np.float32), np.zeros(h.size, np.float32), 0.0, []
  for _ in range(120):
    basis.append(q)
    w = h * q
    w = w - np.dot(q, w) * q - beta * q_prev
    beta = np.linalg.norm(w)
    q_prev, q = q, w / beta
  q = np.stack(basis).astype(np.float64)
  assert np.abs(q @ q.T - np.eye(120)).max() > 0.1


@pytest.mark.parametrize("mode", ["partial", "full"])
def test_lanczos_reorthogonalisation(mode):
  """Partial (Simon's PRO): semi-orthogonal basis, the exact outliers, no ghost copies; full: orthonormal."""
  matvec, start, values = _diagonal_operator()
  result = analysis.lanczos(matvec, start, 120, reorthogonalize=mode)
  eps = np.finfo(np.float32).eps
  ritz = np.sort(result.ritz_values)[::-1]
  np.testing.assert_allclose(ritz[:5], values[:5], rtol=1e-5)
  assert np.all(ritz[5:] < 5.0 + 1e-3)  # a lost-orthogonality Lanczos repeats converged outliers ("ghosts")
  if mode == "full":
    assert result.num_reorthogonalizations == 120
    assert _gram_error(result.basis) < 1e-5
  else:
    assert 0 < result.num_reorthogonalizations < 120
    assert _gram_error(result.basis) <= np.sqrt(eps)


def _noisy_diagonal_operator(size):
  """The diagonal operator, each product off by ``size`` times a fresh random unit vector: rounding at
  ``size / 100`` of ``||H||``, some 10^4 times float32's ``eps`` (a float32 product through a trained
  network rounds up to ~50 ``eps ||H||``)."""
  matvec, start, values = _diagonal_operator()
  noise = np.random.default_rng(1).standard_normal((130, 4000)).astype(np.float32)
  noise *= size / np.linalg.norm(noise, axis=1, keepdims=True)
  calls = []

  def noisy(v):
    w, f = matvec(v), noise[len(calls)]
    calls.append(None)
    return {"a": w["a"] + f[:1000], "b": w["b"] + f[1000:].reshape(60, 50)}
  return noisy, start, values


def test_partial_reorthogonalisation_measures_the_rounding_level(monkeypatch):
  """Partial reorthogonalisation takes its rounding level from the products (``<q_{j-1}, w>`` after each
  three-term step), so a product that rounds 10^4 times above ``eps`` still gives the exact outliers, no
  ghost copies and a semi-orthogonal basis. With the level held at ``eps ||T||`` (the measured part
  switched off) the same run loses orthogonality completely: ghosts, and Ritz values far outside H's
  spectrum."""
  matvec, start, values = _noisy_diagonal_operator(0.1)
  result = analysis.lanczos(matvec, start, 120, reorthogonalize="partial")
  ritz = np.sort(result.ritz_values)[::-1]
  np.testing.assert_allclose(ritz[:5], values[:5], rtol=1e-3)  # the products are only that exact
  assert np.sum(ritz > 10) == 5 and ritz[5] < 5.2
  assert _gram_error(result.basis) < 1e-2
  assert result.num_reorthogonalizations < 120

  monkeypatch.setattr(analysis.hessian, "_ROUNDING_SAFETY", 0.0)
  matvec, start, _ = _noisy_diagonal_operator(0.1)
  result = analysis.lanczos(matvec, start, 120, reorthogonalize="partial")
  assert _gram_error(result.basis) > 0.5
  assert np.sum(result.ritz_values > 10) > 5 and np.max(result.ritz_values) > 200


def test_lanczos_rejects_unknown_reorthogonalisation():
  matvec, start, _ = _diagonal_operator()
  with pytest.raises(ValueError, match="^lanczos: reorthogonalize must be 'partial' or 'full', got 'sometimes'"):
    analysis.lanczos(matvec, start, 3, reorthogonalize="sometimes")
  with pytest.raises(ValueError, match="^lanczos: reorthogonalize must be"):
    analysis.lanczos(matvec, start, 3, reorthogonalize=["full"])  # unhashable: still the message, not a TypeError
  with pytest.raises(TypeError, match="^lanczos: jit must be True or False, got 'no'"):
    analysis.lanczos(matvec, start, 3, jit="no")


def test_partial_and_full_reorthogonalisation_agree(dense):
  """Same eigenvalues (and about the same HVP count) as full reorthogonalisation, both against dense."""
  _, values, _ = dense
  top = values[np.argsort(-np.abs(values))[:5]]
  results = {mode: analysis.hessian_eigenvalues(loss_fn, PARAMS, BATCHES, top_k=5, key=jax.random.key(5),
                                                tol=1e-6, reorthogonalize=mode)
             for mode in ("partial", "full")}
  for result in results.values():
    np.testing.assert_allclose(result.eigenvalues, top, rtol=1e-4)
  np.testing.assert_allclose(results["partial"].eigenvalues, results["full"].eigenvalues, rtol=1e-5)
  assert abs(results["partial"].num_hvps - results["full"].num_hvps) <= 1
  with pytest.raises(ValueError, match="^hessian_eigenvalues: reorthogonalize must be"):
    analysis.hessian_eigenvalues(loss_fn, PARAMS, BATCHES, key=jax.random.key(5), reorthogonalize="never")


def _wide_quadratic():
  """``loss = 0.5 sum_i d_i w_i^2``: H = diag(d), known eigenpairs, with leaves whose last axis is a
  multiple of 128 (the eigenvectors' interleaved layout) and leaves whose last axis is not."""
  rng = np.random.default_rng(7)
  shapes = {"wide": (3, 256), "odd": (2, 5, 7), "bias": (384,), "scalar": ()}
  curvature = {k: rng.uniform(0.1, 1.0, s).astype(np.float32) for k, s in shapes.items()}
  # Five outliers in different leaves, so every eigenvector lives in one place.
  curvature["wide"][1, 200], curvature["bias"][17], curvature["odd"][1, 3, 6] = 9.0, 7.5, 6.0
  curvature["wide"][0, 3], curvature["scalar"] = 5.0, np.float32(4.0)
  params = {k: jnp.ones(s, jnp.float32) for k, s in shapes.items()}

  def quadratic(w, batch):
    return 0.5 * sum(jnp.sum(batch[k] * w[k] ** 2) for k in w)
  return quadratic, params, {k: jnp.asarray(v) for k, v in curvature.items()}


@pytest.mark.parametrize("top_k", [1, 5])
def test_eigenvectors_of_a_known_diagonal_hessian(top_k):
  """Eigenvectors formed from the basis (interleaved and plain leaves, padded groups) are the unit vectors."""
  quadratic, params, curvature = _wide_quadratic()
  flat_curvature = flat(curvature)
  result = analysis.hessian_eigenvalues(quadratic, params, [curvature], top_k=top_k, key=jax.random.key(1), tol=1e-6)
  order = np.argsort(-flat_curvature)[:top_k]
  np.testing.assert_allclose(result.eigenvalues, flat_curvature[order], rtol=1e-5)
  for vector, index in zip(result.eigenvectors, order):
    got = flat(vector)
    assert jax.tree.structure(vector) == jax.tree.structure(params)
    assert abs(np.linalg.norm(got) - 1.0) < 1e-5
    assert abs(got[index]) > 1 - 1e-6


def test_ritz_vectors_match_numpy():
  """Combination of a basis (groups of 32 and 8, the last padded) into k normalised vectors, as numpy does it."""
  from sam_optax.analysis import hessian  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(3)
  like = {"wide": jnp.zeros((2, 256)), "odd": jnp.zeros((5, 3)), "scalar": jnp.zeros(())}
  for count in (3, 13, 45):
    basis = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), like) for _ in range(count)]
    coefficients = rng.normal(size=(count, 4))
    stacked = np.stack([flat(q) for q in basis])
    want = coefficients.T @ stacked
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    for consume in (False, True):
      # pylint: disable-next=protected-access
      vectors = hessian._ritz_vectors(hessian._JITTED, list(basis), coefficients, like, consume=consume)
      np.testing.assert_allclose(np.stack([flat(v) for v in vectors]), want, rtol=1e-4, atol=1e-5)
      assert all(leaf.is_deleted() for q in basis[:4] for leaf in jax.tree.leaves(q)) == consume


def test_float64_under_x64():
  """With ``jax_enable_x64`` and float64 params everything accumulates in float64: a known diagonal H to 1e-12."""
  with jax.enable_x64(True):
    quadratic, params, curvature = _wide_quadratic()
    params, curvature = (jax.tree.map(lambda x: x.astype(jnp.float64), t) for t in (params, curvature))
    flat_curvature = flat(curvature)
    result = analysis.hessian_eigenvalues(quadratic, params, [curvature], top_k=5, key=jax.random.key(1), tol=1e-10)
    order = np.argsort(-flat_curvature)[:5]
    np.testing.assert_allclose(result.eigenvalues, flat_curvature[order], rtol=1e-12)
    for vector, index in zip(result.eigenvectors, order):
      assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(vector))
      assert abs(abs(flat(vector)[index]) - 1.0) < 1e-12
    # Rademacher probes: v^T diag(d) v = sum(d) exactly, for every probe.
    trace = analysis.hessian_trace(quadratic, params, [curvature], 4, key=jax.random.key(0))
    np.testing.assert_allclose(trace.samples, np.sum(flat_curvature), rtol=1e-12)
    # SLQ: each run's quadrature weights sum to 1 and its mean is v^T H v / v^T v = mean(d) for a Rademacher v.
    density = analysis.spectral_density(quadratic, params, [curvature], key=jax.random.key(2), num_iters=20,
                                        num_runs=3)
    assert density.nodes.dtype == np.float64
    np.testing.assert_allclose(density.weights.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.nansum(density.nodes * density.weights, axis=1), np.mean(flat_curvature),
                               rtol=1e-12)
    np.testing.assert_allclose(np.nanmax(density.nodes, axis=1), 9.0, rtol=1e-9)
    # Landscapes: float64 coordinates and losses (alpha = 0.1 is not 0.100000001), by hand.
    alphas = [0.1, -0.3]
    direction = jax.tree.map(jnp.ones_like, params)
    surface = analysis.loss_surface_1d(quadratic, params, [curvature], direction, alphas)
    by_hand = [float(quadratic(jax.tree.map(lambda w, d, a=a: w + a * d, params, direction), curvature))
               for a in alphas]
    np.testing.assert_allclose(surface, by_hand, rtol=1e-14)


@pytest.mark.parametrize("linearize", [True, False])
@pytest.mark.parametrize("batches", [BATCHES, BATCHES[1:2]], ids=["3 batches", "1 batch"])
def test_fused_lanczos_step_matches_dense(dense, linearize, batches):
  """``lanczos_step``: q = v / beta, w = H q - alpha q - beta_prev q_prev, alpha = q^T H q, ||w||, q_prev^T w by hand
  with the dense Hessian; every batch count and both product kinds (linearised once, or recomputed)."""
  if len(batches) == 1:
    f, unravel = ravel_pytree(PARAMS)
    hessian = np.asarray(jax.hessian(lambda x: loss_fn(unravel(x), batches[0]))(f), np.float64)
  else:
    hessian = dense[0]
  operator = analysis.hessian_operator(loss_fn, PARAMS, batches, linearize=linearize)
  unravel = ravel_pytree(PARAMS)[1]
  v_flat, prev_flat = RNG.normal(size=(2, hessian.shape[0]))
  prev_flat /= np.linalg.norm(prev_flat)
  beta, beta_prev = 2.5, 0.7
  for scaled in (False, True):
    v = unravel(jnp.asarray(v_flat, jnp.float32))
    q_flat = v_flat / beta if scaled else v_flat
    q, w, (alpha, norm, left), norm_on_device = operator.lanczos_step(
        v, jnp.float32(beta) if scaled else None, unravel(jnp.asarray(prev_flat, jnp.float32)), jnp.float32(beta_prev))
    assert float(norm_on_device) == float(norm)
    hq = hessian @ q_flat
    want_alpha = q_flat @ hq
    want_w = hq - want_alpha * q_flat - beta_prev * prev_flat
    np.testing.assert_allclose(flat(q), q_flat, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(alpha), want_alpha, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(flat(w), want_w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(norm), np.linalg.norm(want_w), rtol=1e-4)
    np.testing.assert_allclose(float(left), prev_flat @ want_w, rtol=1e-4, atol=1e-5 * np.linalg.norm(want_w))
  assert operator.counter[0] == 2
  assert analysis.hessian_operator(loss_fn, PARAMS, batches, jit=False).lanczos_step is None


def force_design(monkeypatch, design):
  """``"host"`` (separate calls, XLA:CPU's default), ``"fused"`` or ``"loop"`` (device loops)."""
  monkeypatch.setattr(analysis.hessian, "_iteration_design", lambda operator: design)


@pytest.mark.parametrize("design", ["fused", "loop"])
def test_iteration_designs_equal_the_host_loop(dense, design, monkeypatch):
  """The fused iterations and the device loops (forced here, on CPU) give the host loop's HVP counts and
  eigenpairs, and the dense Hessian's eigenvalues, with partial and full reorthogonalisation."""
  _, values, _ = dense
  top = values[np.argsort(-np.abs(values))[:3]]
  kwargs = dict(key=jax.random.key(7), tol=1e-6)
  results = {}
  for name in ("host", design):
    force_design(monkeypatch, name)
    results[name] = (analysis.hessian_eigenvalues(loss_fn, PARAMS, BATCHES, top_k=3, **kwargs),
                     analysis.hessian_extremes(loss_fn, PARAMS, BATCHES, **kwargs),
                     analysis.hessian_eigenvalues(loss_fn, PARAMS, BATCHES, top_k=3, reorthogonalize="full", **kwargs))
  for want, got in zip(results["host"], results[design]):
    assert got.num_hvps == want.num_hvps
  (host, _, host_full), (other, ends, full) = results["host"], results[design]
  np.testing.assert_allclose(other.eigenvalues, top, rtol=1e-5)
  np.testing.assert_allclose(other.eigenvalues, host.eigenvalues, rtol=1e-6)
  np.testing.assert_allclose(full.eigenvalues, host_full.eigenvalues, rtol=1e-6)
  np.testing.assert_allclose(tuple(ends), (values[-1], values[0]), rtol=1e-4)
  for got, want in zip(other.eigenvectors, host.eigenvectors):
    assert jax.tree.structure(got) == jax.tree.structure(PARAMS)
    got, want = flat(got), flat(want)
    np.testing.assert_allclose(np.linalg.norm(got), 1.0, rtol=1e-5)
    np.testing.assert_allclose(got * np.sign(got @ want), want, atol=1e-4)


def _numpy_lanczos(matrix, start, iterations):
  """Textbook Lanczos in float64 with full reorthogonalisation (twice): alphas, betas, basis rows.

  ``matrix``: an array, or a function ``v -> H v`` on float64 vectors."""
  product = matrix if callable(matrix) else (lambda v: matrix @ v)
  q = start / np.linalg.norm(start)
  basis, alphas, betas = [q], [], []
  for j in range(iterations):
    w = product(basis[j])
    alphas.append(basis[j] @ w)
    for _ in range(2):
      w = w - np.stack(basis).T @ (np.stack(basis) @ w)
    betas.append(np.linalg.norm(w))
    basis.append(w / betas[-1])
  return np.array(alphas), np.array(betas), np.stack(basis[:iterations])


def _lanczos_rows(design, operator, start, iterations, reorthogonalize):
  """``iterations`` Lanczos steps of ``operator`` from ``start`` without a convergence test, driven as ``design``
  says ("loop": device loops in chunks; "unnormalised"/"unit": the host loop keeping ``w`` and its scale, or
  unit vectors): alphas, betas, and the unit basis vectors as rows (float64, leaves in ravel_pytree's order)."""
  if design == "loop":
    alphas, betas, state, m, performed = analysis.hessian._lanczos_in_loop(
        lambda s, stop: operator.lanczos_loop(s, stop, reorthogonalize == "full"), start, iterations, 5,
        lambda ritz, residuals: np.inf, reorthogonalize)
    assert m == performed == iterations
    return alphas, betas, np.stack([np.concatenate([np.asarray(leaf[i], np.float64).ravel()
                                                    for leaf in jax.tree.leaves(state.basis)])
                                    for i in range(iterations)])
  alphas, betas, basis, lengths, _, scales = analysis.hessian._lanczos_run(
      analysis.hessian._JITTED, operator.matvec, start, iterations, False, reorthogonalize=reorthogonalize,
      unit=design == "unit")
  assert lengths[0] == len(basis) == iterations
  if design == "unit":
    np.testing.assert_array_equal(scales, 1.0)
  else:  # the basis holds w_j = beta_j q_j and 1 / beta_j (the first: the start vector and 1 / its norm)
    np.testing.assert_allclose(scales[1:, 0], 1.0 / betas[:-1, 0], rtol=1e-12)
    np.testing.assert_allclose(scales[0, 0], 1.0 / np.linalg.norm(flat(start)), rtol=1e-6)
  return alphas[:, 0], betas[:, 0], np.stack([scale[0] * flat(v) for v, scale in zip(basis, scales)])


@pytest.mark.parametrize("design", ["loop", "unnormalised", "unit"])
@pytest.mark.parametrize("reorthogonalize", ["full", "partial"])
def test_lanczos_designs_match_numpy_lanczos(dense, reorthogonalize, design):
  """Device loops in chunks, and the host loop with unnormalised or unit vectors: alpha, beta and the basis
  against textbook float64 Lanczos on the dense Hessian (full), or a semi-orthogonal basis and the dense
  extreme eigenvalues (partial)."""
  hessian_matrix, values, _ = dense
  operator = analysis.hessian_operator(loss_fn, PARAMS, BATCHES)
  start = jax.tree.map(lambda p: jnp.asarray(RNG.normal(size=p.shape), jnp.float32), PARAMS)
  start_flat = flat(start)
  iterations = 40
  alphas, betas, rows = _lanczos_rows(design, operator, start, iterations, reorthogonalize)
  if reorthogonalize == "full":
    want_alphas, want_betas, want_basis = _numpy_lanczos(hessian_matrix, start_flat, iterations)
    np.testing.assert_allclose(alphas, want_alphas, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(betas, want_betas, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(rows[:10], want_basis[:10], atol=1e-4)
    np.testing.assert_allclose(rows @ rows.T, np.eye(iterations), atol=1e-5)
  else:
    np.testing.assert_allclose(rows @ rows.T, np.eye(iterations), atol=np.sqrt(np.finfo(np.float32).eps))
  ritz = np.linalg.eigvalsh(np.diag(alphas) + np.diag(betas[:-1], 1) + np.diag(betas[:-1], -1))
  np.testing.assert_allclose([ritz[-1], ritz[0]], [values[-1], values[0]], rtol=1e-4)
  if design == "loop":
    assert operator.counter[0] == 0  # the loop does not count; its caller does


def test_device_loop_on_an_invariant_krylov_space():
  """H = diag with 3 distinct eigenvalues: the Krylov space of a start vector has dimension 3, so 3
  iterations give them exactly (residuals ~0), as a dense eigendecomposition does."""
  curvature = jnp.asarray([1.0, 1.0, 2.0, 2.0, 2.0, 5.0, 5.0, 1.0])
  quadratic = lambda w, batch: 0.5 * jnp.sum(batch * w ** 2)
  operator = analysis.hessian_operator(quadratic, jnp.ones(8), [curvature])
  assert analysis.hessian._iteration_design(operator) == "loop"  # tiny, no convolution: loops on CPU too
  result = analysis.hessian_eigenvalues(quadratic, jnp.ones(8), [curvature], top_k=2, key=jax.random.key(0))
  assert result.num_hvps == 3
  np.testing.assert_allclose(result.eigenvalues, [5.0, 2.0], rtol=1e-6)
  assert np.all(result.residuals < 1e-6)


def test_iteration_design_on_cpu():
  """XLA:CPU: device loops for small convolution-free losses, the host loop for convolutions and large models."""
  design = analysis.hessian._iteration_design
  assert design(analysis.hessian_operator(loss_fn, PARAMS, BATCHES)) == "host"  # a convolution
  dense_loss = lambda w, batch: jnp.mean(jnp.tanh(batch @ w) ** 2)
  small, large = jnp.ones((16, 4)), jnp.ones((1000, 300))  # 64 and 300k parameters
  assert design(analysis.hessian_operator(dense_loss, small, [jnp.ones((3, 16))])) == "loop"
  assert design(analysis.hessian_operator(dense_loss, large, [jnp.ones((3, 1000))])) == "host"
  assert design(analysis.hessian_operator(dense_loss, small, [jnp.ones((3, 16))], jit=False)) == "host"

def test_device_loops_only_where_their_basis_fits():
  """Accelerators: device loops unless 64 basis vectors (32 rows, doubled once) exceed half the free memory;
  params on XLA:CPU (no memory statistics) always fit."""
  fits = analysis.hessian._basis_fits
  assert fits(vector_bytes=100, bytes_limit=64 * 100 * 2 + 1000, bytes_in_use=1000)
  assert not fits(vector_bytes=100, bytes_limit=64 * 100 * 2 + 1000, bytes_in_use=1001)
  assert not fits(vector_bytes=4 * 10 ** 9, bytes_limit=80 * 10 ** 9, bytes_in_use=0)  # a 1B model on 80 GB
  assert analysis.hessian._loop_fits(PARAMS)


def _dense_eigh(loss, params, batch):
  flat_params, unravel = ravel_pytree(params)
  hessian = np.asarray(jax.hessian(lambda f: loss(unravel(f), batch))(flat_params), np.float64)
  return np.linalg.eigh(0.5 * (hessian + hessian.T))


@pytest.mark.parametrize("design", ["host", "fused", "loop"])
def test_repeated_eigenvalues_come_with_their_multiplicity(design, monkeypatch):
  """A start vector reaches each eigenspace in one direction: its Krylov space turns invariant before top_k
  values. The result still has top_k eigenvalues, with multiplicity, as numpy's dense eigh has them."""
  force_design(monkeypatch, design)
  quadratic = lambda w, batch: 0.5 * jnp.sum(batch * w ** 2)  # noqa: E731  H = diag(batch)
  curvature = jnp.asarray([1.0, 1.0, 2.0, 2.0, 2.0, 5.0, 5.0, 1.0])
  # A rank-5 Hessian with 40 parameters: eigenvalue 0 has multiplicity 35.
  x = jax.random.normal(jax.random.key(1), (5, 40))
  least_squares = lambda w, x: 0.5 * jnp.mean((x @ w) ** 2)  # noqa: E731
  cases = [(quadratic, jnp.ones(8), curvature, 4), (quadratic, jnp.ones(8), curvature, 8),
           (least_squares, jnp.ones(40), x, 8), (quadratic, jnp.ones(4), jnp.zeros(4), 2)]
  for loss, params, batch, top_k in cases:
    values, vectors = _dense_eigh(loss, params, batch)
    want = values[np.argsort(-np.abs(values))[:top_k]]
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # converged: no "not converged" warning
      result = analysis.hessian_eigenvalues(loss, params, [batch], top_k=top_k, key=jax.random.key(0))
    assert result.eigenvalues.shape == (top_k,) and len(result.eigenvectors) == top_k
    assert result.num_hvps <= top_k + 2
    np.testing.assert_allclose(result.eigenvalues, want, rtol=1e-5, atol=1e-5 * abs(want[0]) + 1e-7)
    hessian = vectors @ np.diag(values) @ vectors.T
    found = np.stack([np.asarray(v, np.float64) for v in result.eigenvectors])
    np.testing.assert_allclose(found @ found.T, np.eye(top_k), atol=1e-5)  # orthonormal, as eigh's
    np.testing.assert_allclose(found @ hessian, result.eigenvalues[:, None] * found,
                               atol=1e-5 * max(1.0, abs(want[0])))


@pytest.mark.parametrize("name", sorted(_ENTRY_POINTS))
def test_a_loss_that_is_not_a_scalar_is_refused_by_name(name):
  per_example = lambda w, batch: 0.5 * (batch @ w) ** 2  # noqa: E731  .mean() forgotten
  with pytest.raises(ValueError, match=f"^{name}: loss_fn must return a scalar .* got shape \\(7,\\)"):
    _ENTRY_POINTS[name](per_example, jnp.ones(3), [jnp.ones((7, 3))])


def test_batches_without_examples_are_left_out():
  """Weight n_b / n = 0: an empty batch changes nothing (its mean loss, NaN, used to poison the sums)."""
  loss = lambda w, x: 0.5 * jnp.mean((x @ w) ** 2)  # noqa: E731
  x = jax.random.normal(jax.random.key(1), (20, 3))
  w, key = jnp.ones(3), jax.random.key(0)
  full, with_empty = [x[:10], x[10:]], [x[:10], x[10:], x[20:]]
  assert with_empty[2].shape == (0, 3)
  for batches in (full, with_empty):
    trace = analysis.hessian_trace(loss, w, batches, 8, key=key).trace
    surface = analysis.loss_surface_1d(loss, w, batches, w, [0.0, 1.0])
    top = analysis.hessian_eigenvalues(loss, w, batches, key=key).eigenvalues
    assert np.isfinite(trace) and np.all(np.isfinite(surface))
  np.testing.assert_allclose(surface, [float(loss(w, x)), float(loss(2 * w, x))], rtol=1e-6)
  np.testing.assert_allclose(trace, analysis.hessian_trace(loss, w, full, 8, key=key).trace, rtol=1e-6)
  np.testing.assert_allclose(top, np.linalg.eigvalsh(np.asarray(x.T @ x / 20, np.float64))[-1:], rtol=1e-5)
  with pytest.raises(ValueError, match=r"^hessian_trace: every batch has zero examples \(leading dimensions \[0\]\)"):
    analysis.hessian_trace(loss, w, [x[:0]], 8, key=key)


def test_an_unhashable_loss_is_traced_on_every_call():
  """A mutable dataclass cannot be a cached static argument: it is accepted, and never seen with stale fields."""

  @dataclasses.dataclass
  class ScaledLoss:
    scale: float

    def __call__(self, w, x):
      return 0.5 * self.scale * jnp.mean((x @ w) ** 2)

  x = jax.random.normal(jax.random.key(1), (20, 3))
  exact = np.linalg.eigvalsh(np.asarray(x.T @ x / 20, np.float64))[-1]
  loss = ScaledLoss(1.0)
  for scale in (1.0, 10.0):
    loss.scale = scale
    result = analysis.hessian_eigenvalues(loss, jnp.ones(3), [x], key=jax.random.key(0))
    np.testing.assert_allclose(result.eigenvalues, [scale * exact], rtol=1e-5)
    np.testing.assert_allclose(analysis.hessian_trace(loss, jnp.ones(3), [x], 4, key=jax.random.key(0)).trace,
                               analysis.hessian_trace(ScaledLoss(scale), jnp.ones(3), [x], 4,
                                                      key=jax.random.key(0)).trace, rtol=1e-6)


def test_loss_surface_2d_flattens_its_coordinates():
  loss = lambda w, batch: 0.5 * jnp.mean(batch * w ** 2)  # noqa: E731
  out = analysis.loss_surface_2d(loss, jnp.zeros(2), [jnp.array([1.0, 2.0])], jnp.array([1.0, 0.0]),
                                 jnp.array([0.0, 1.0]), [[0.0, 1.0], [2.0, 3.0]], 0.5)
  assert out.shape == (4, 1)
  np.testing.assert_allclose(out[:, 0], [0.25 * (x ** 2 + 2 * 0.25) for x in (0.0, 1.0, 2.0, 3.0)], rtol=1e-6)


def _by_hand_lanczos_extremes(loss, params, batch, iterations, seed=0):
  """Lanczos with full float64 reorthogonalisation on the host; products by plain jax.jvp of jax.grad."""
  flat, unravel = ravel_pytree(params)
  gradient = jax.grad(lambda v: loss(unravel(v), batch))
  product = jax.jit(lambda v: jax.jvp(gradient, (flat,), (v,))[1])
  alphas, betas, _ = _numpy_lanczos(lambda v: np.asarray(product(jnp.asarray(v, flat.dtype)), np.float64),
                                    np.random.default_rng(seed).standard_normal(flat.size), iterations)
  tridiagonal = np.diag(alphas) + np.diag(betas[:-1], 1) + np.diag(betas[:-1], -1)
  values = np.linalg.eigvalsh(tridiagonal)
  return values[-1], values[0]


def test_extremes_of_a_trained_cnn_whose_products_round_above_eps_norm_t():
  """The main job's SAM-trained digits CNN: its float32 HVPs round far above eps ||T|| in the first iterations
  (||T|| is still small then), and partial reorthogonalisation that trusted eps ||T|| lost orthogonality: the
  extremes came back as (1.5, -1.4), or (1e12, -1e12) for another key, instead of (0.140, -0.0023)."""
  from sam_optax.experiments import data as data_lib, models, report, train as train_lib

  dataset = data_lib.load_dataset("digits")
  model = models.get_model("cnn", num_classes=dataset.num_classes)
  config = train_lib.TrainConfig(optimizer="sam", base="sgd", epochs=25, batch_size=64, weight_decay=5e-4, seed=0)
  state = train_lib.train(model, dataset.x_train, dataset.y_train, config, progress=False).state
  loss = train_lib.make_eval_loss_fn(model, state.batch_stats)
  batches = report.analysis_batches(dataset.x_train, dataset.y_train, 256)
  expected_max, expected_min = _by_hand_lanczos_extremes(loss, state.params, batches[0], 120)
  for seed in (0, 1):
    with warnings.catch_warnings():
      warnings.simplefilter("error", RuntimeWarning)  # converged, within max_iters
      lambda_max, lambda_min = analysis.hessian_extremes(loss, state.params, batches, key=jax.random.key(seed))
    np.testing.assert_allclose(lambda_max, expected_max, rtol=1e-3)
    np.testing.assert_allclose(lambda_min, expected_min, rtol=1e-2, atol=1e-4 * expected_max)
