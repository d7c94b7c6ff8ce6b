"""sam_optax.analysis with FSDP-style sharded params and batches sharded over 8 CPU devices.

Every result must equal the single-device one, and every vector the analysis
keeps (Krylov basis, eigenvectors, products) must carry the params' shardings:
nothing of size ``num_params`` is gathered onto one device.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding, PartitionSpec as P

from sam_optax import analysis

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake CPU) devices")


def loss_fn(params, batch):
  h = jnp.tanh(batch["x"] @ params["w1"]["kernel"] + params["w1"]["bias"])
  logits = h @ params["w2"]["kernel"] + params["w2"]["bias"]
  return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["y"][:, None], -1)[:, 0])


def make_params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w1": {"kernel": 0.5 * jax.random.normal(k1, (12, 32)), "bias": jnp.full((32,), 0.1)},
          "w2": {"kernel": 0.5 * jax.random.normal(k2, (32, 5)), "bias": jnp.zeros(5)}}


def make_batch(size, seed):
  rng = np.random.default_rng(seed)
  return {"x": jnp.asarray(rng.normal(size=(size, 12)), jnp.float32),
          "y": jnp.asarray(rng.integers(0, 5, size=size), jnp.int32)}


# Auto axes (GSPMD propagation), as FSDP under plain ``jit`` uses them.
MESH = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
# FSDP-style: each weight matrix split over the 8 devices along one axis; biases split or replicated.
SPECS = {"w1": {"kernel": P(None, "d"), "bias": P("d")}, "w2": {"kernel": P("d", None), "bias": P()}}
PARAMS = make_params()
BATCHES = [make_batch(16, 1), make_batch(40, 2)]
SHARDED_PARAMS = jax.tree.map(lambda x, spec: jax.device_put(x, NamedSharding(MESH, spec)), PARAMS, SPECS,
                              is_leaf=lambda x: isinstance(x, P))
SHARDED_BATCHES = [jax.device_put(b, NamedSharding(MESH, P("d"))) for b in BATCHES]
SHARDINGS = jax.tree.map(lambda x: x.sharding, SHARDED_PARAMS)


def assert_sharded_like_params(tree):
  assert jax.tree.structure(tree) == jax.tree.structure(SHARDED_PARAMS)
  for got, want in zip(jax.tree.leaves(tree), jax.tree.leaves(SHARDINGS)):
    assert got.sharding == want, (got.sharding, want)


def test_inputs_are_really_sharded():
  kernel = SHARDED_PARAMS["w1"]["kernel"]
  assert len(kernel.sharding.device_set) == 8
  assert kernel.addressable_shards[0].data.shape == (12, 4)
  assert SHARDED_BATCHES[0]["x"].addressable_shards[0].data.shape == (2, 12)


@pytest.fixture(scope="module")
def dense():
  flat, unravel = ravel_pytree(PARAMS)
  everything = {k: jnp.concatenate([b[k] for b in BATCHES]) for k in BATCHES[0]}
  with jax.default_matmul_precision("float32"):
    hessian = np.asarray(jax.hessian(lambda f: loss_fn(unravel(f), everything))(flat), np.float64)
  hessian = 0.5 * (hessian + hessian.T)
  return hessian, np.linalg.eigvalsh(hessian)


@pytest.mark.parametrize("linearize", [True, False])
def test_operator_products_keep_shardings(dense, linearize):
  hessian, _ = dense
  rng = np.random.default_rng(0)
  v = jax.tree.map(lambda p: np.asarray(rng.normal(size=p.shape), np.float32), PARAMS)
  sharded_v = jax.tree.map(lambda x, s: jax.device_put(x, s), v, SHARDINGS)
  operator = analysis.hessian_operator(loss_fn, SHARDED_PARAMS, SHARDED_BATCHES, linearize=linearize)
  assert operator.linearized == linearize
  product = operator.matvec(sharded_v)
  assert_sharded_like_params(product)
  flat_product = np.asarray(ravel_pytree(jax.device_get(product))[0], np.float64)
  np.testing.assert_allclose(flat_product, hessian @ np.asarray(ravel_pytree(v)[0], np.float64),
                             rtol=1e-4, atol=1e-5)
  block = jax.tree.map(lambda x: np.stack([x, 2 * x]), v)
  block = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(MESH, P(None, *s.spec))), block, SHARDINGS)
  forms = np.asarray(operator.quadratic_forms(block), np.float64)
  flat_v = np.asarray(ravel_pytree(v)[0], np.float64)
  np.testing.assert_allclose(forms, [flat_v @ hessian @ flat_v, 4 * flat_v @ hessian @ flat_v], rtol=1e-4)
  assert operator.counter[0] == 3


@pytest.mark.parametrize("mode", ["partial", "full"])
def test_krylov_basis_carries_the_params_shardings(mode):
  operator = analysis.hessian_operator(loss_fn, SHARDED_PARAMS, SHARDED_BATCHES)
  start = jax.tree.map(lambda p, s: jax.device_put(np.ones(p.shape, np.float32), s), PARAMS, SHARDINGS)
  result = analysis.lanczos(operator.matvec, start, 12, reorthogonalize=mode)
  assert len(result.basis) == 12
  for q in result.basis:
    assert_sharded_like_params(q)
  # The basis is orthonormal, or semi-orthogonal (|q_i^T q_k| <= sqrt(eps)) with partial
  # reorthogonalisation (Gram matrix in float64 on the host, for the check only).
  flat = np.stack([np.asarray(ravel_pytree(jax.device_get(q))[0], np.float64) for q in result.basis])
  tolerance = 1e-5 if mode == "full" else np.sqrt(np.finfo(np.float32).eps)
  np.testing.assert_allclose(flat @ flat.T, np.eye(12), atol=tolerance)


DESIGNS = ["host", "fused", "loop"]


def force_iterations(monkeypatch, design):
  """The host loop of separate calls, of fused calls (``HessianOperator.lanczos_step``), or device loops."""
  monkeypatch.setattr(analysis.hessian, "_iteration_design", lambda operator: design)


@pytest.mark.parametrize("design", DESIGNS)
def test_eigenpairs_match_single_device_and_dense(dense, design, monkeypatch):
  force_iterations(monkeypatch, design)
  _, values = dense
  kwargs = dict(top_k=3, key=jax.random.key(0))
  single = analysis.hessian_eigenvalues(loss_fn, PARAMS, BATCHES, **kwargs)
  sharded = analysis.hessian_eigenvalues(loss_fn, SHARDED_PARAMS, SHARDED_BATCHES, **kwargs)
  np.testing.assert_allclose(sharded.eigenvalues, single.eigenvalues, rtol=1e-4)
  assert sharded.num_hvps == single.num_hvps
  top = values[np.argsort(-np.abs(values))[:3]]
  np.testing.assert_allclose(sharded.eigenvalues, top, rtol=1e-3)
  for got, want in zip(sharded.eigenvectors, single.eigenvectors):
    assert_sharded_like_params(got)
    got, want = (np.asarray(ravel_pytree(jax.device_get(t))[0], np.float64) for t in (got, want))
    np.testing.assert_allclose(got * np.sign(got @ want), want, rtol=1e-4, atol=1e-4)


def test_trace_density_summary_match_single_device():
  key = jax.random.key(1)
  trace = [analysis.hessian_trace(loss_fn, p, b, 12, key=key, block_size=5)
           for p, b in ((PARAMS, BATCHES), (SHARDED_PARAMS, SHARDED_BATCHES))]
  np.testing.assert_allclose(trace[1].samples, trace[0].samples, rtol=1e-4)
  np.testing.assert_allclose(tuple(trace[1]), tuple(trace[0]), rtol=1e-4)
  density = [analysis.spectral_density(loss_fn, p, b, key=key, num_iters=10, num_runs=3, num_bins=50, block_size=2)
             for p, b in ((PARAMS, BATCHES), (SHARDED_PARAMS, SHARDED_BATCHES))]
  np.testing.assert_allclose(density[1].nodes, density[0].nodes, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(density[1].weights, density[0].weights, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(density[1].density, density[0].density, rtol=1e-3, atol=1e-4 * density[0].density.max())
  # sharpness_summary = hessian_extremes (lambda_max, lambda_min, ratio) + hessian_trace.
  summaries = [analysis.sharpness_summary(loss_fn, p, b, key=key, trace_samples=6)
               for p, b in ((PARAMS, BATCHES), (SHARDED_PARAMS, SHARDED_BATCHES))]
  np.testing.assert_allclose(summaries[1][:5], summaries[0][:5], rtol=1e-4)
  assert summaries[1].num_hvps == summaries[0].num_hvps


@pytest.mark.parametrize("design", DESIGNS)
def test_explicit_data_parallel_mesh(design, monkeypatch):
  """README integration 6's mesh: Explicit axes, replicated params, the batch split over 8 devices."""
  force_iterations(monkeypatch, design)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  params = jax.device_put(PARAMS, NamedSharding(mesh, P()))
  batches = [jax.device_put(b, NamedSharding(mesh, P("data"))) for b in BATCHES]
  key = jax.random.key(2)
  single = analysis.hessian_eigenvalues(loss_fn, PARAMS, BATCHES, top_k=2, key=key)
  sharded = analysis.hessian_eigenvalues(loss_fn, params, batches, top_k=2, key=key)
  np.testing.assert_allclose(sharded.eigenvalues, single.eigenvalues, rtol=1e-4)
  for vector in sharded.eigenvectors:
    for leaf in jax.tree.leaves(vector):
      assert leaf.sharding == NamedSharding(mesh, P())
  trace = [analysis.hessian_trace(loss_fn, p, b, 6, key=key) for p, b in ((PARAMS, BATCHES), (params, batches))]
  np.testing.assert_allclose(trace[1].samples, trace[0].samples, rtol=1e-4)


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit])
def test_wide_leaves_eigenvectors_keep_shardings(axis_type, design, monkeypatch):
  """Leaves whose last axis is a multiple of 128 (eigenvectors formed in the interleaved layout), sharded
  along the leading axis, along the last axis (not interleaved) or replicated: eigenpairs equal the known
  ones of ``H = diag(d)`` and the single-device result, and every eigenvector keeps the params' shardings."""
  force_iterations(monkeypatch, design)
  mesh = jax.make_mesh((8,), ("d",), axis_types=(axis_type,))
  rng = np.random.default_rng(11)
  shapes = {"rows": (8, 256), "columns": (4, 1024), "bias": (384,)}
  specs = {"rows": P("d", None), "columns": P(None, "d"), "bias": P()}
  curvature = {k: rng.uniform(0.1, 1.0, s).astype(np.float32) for k, s in shapes.items()}
  curvature["rows"][5, 130], curvature["columns"][2, 1000], curvature["bias"][7] = 9.0, 8.0, 7.0
  params = {k: jnp.ones(s, jnp.float32) for k, s in shapes.items()}
  shardings = {k: NamedSharding(mesh, specs[k]) for k in shapes}
  sharded_params = {k: jax.device_put(params[k], shardings[k]) for k in shapes}
  sharded_curvature = {k: jax.device_put(curvature[k], shardings[k]) for k in shapes}

  def quadratic(w, batch):
    return 0.5 * sum(jnp.sum(batch[k] * w[k] ** 2) for k in w)

  kwargs = dict(top_k=3, key=jax.random.key(3), tol=1e-6)
  single = analysis.hessian_eigenvalues(quadratic, params, [curvature], **kwargs)
  sharded = analysis.hessian_eigenvalues(quadratic, sharded_params, [sharded_curvature], **kwargs)
  np.testing.assert_allclose(sharded.eigenvalues, [9.0, 8.0, 7.0], rtol=1e-5)
  np.testing.assert_allclose(sharded.eigenvalues, single.eigenvalues, rtol=1e-5)
  for got, want in zip(sharded.eigenvectors, single.eigenvectors):
    for key in shapes:
      assert got[key].sharding == shardings[key], (key, got[key].sharding)
    got, want = (np.asarray(ravel_pytree(jax.device_get(t))[0], np.float64) for t in (got, want))
    # The exact eigenvectors are unit vectors. Partial reorthogonalisation keeps the basis orthogonal to
    # sqrt(eps) ~ 3e-4 only, so the Ritz vectors' small entries carry rounding of ~1e-5 that depends on the
    # reduction order (sharded or not), while the eigenvalues are exact to working precision (above).
    exact = np.zeros_like(want)
    exact[np.argmax(np.abs(want))] = 1.0
    for vector in (got, want):
      np.testing.assert_allclose(vector * np.sign(vector @ exact), exact, atol=5e-5)
    np.testing.assert_allclose(got * np.sign(got @ want), want, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("mode", ["partial", "full"])
def test_device_loop_basis_is_sharded_like_the_params(mode):
  """The device loops' Krylov basis (a leading iteration axis) keeps every leaf's sharding; its rows are
  the single-device run's, and orthonormal (full) or semi-orthogonal (partial)."""
  rows = {}
  for name, params, batches in (("single", PARAMS, BATCHES), ("sharded", SHARDED_PARAMS, SHARDED_BATCHES)):
    operator = analysis.hessian_operator(loss_fn, params, batches)
    start = analysis.hessian._start_vector(operator, jax.random.key(4))
    _, _, state, m, _ = analysis.hessian._lanczos_in_loop(
        lambda s, stop, operator=operator: operator.lanczos_loop(s, stop, mode == "full"), start, 12, 3,
        lambda ritz, residuals: np.inf, mode)
    assert m == 12
    if name == "sharded":
      for got, want in zip(jax.tree.leaves(state.basis), jax.tree.leaves(SHARDINGS)):
        assert got.sharding.is_equivalent_to(NamedSharding(MESH, P(None, *want.spec)), got.ndim), got.sharding
    rows[name] = np.stack([np.concatenate([np.asarray(leaf[i], np.float64).ravel()
                                           for leaf in jax.tree.leaves(jax.device_get(state.basis))])
                           for i in range(m)])
  np.testing.assert_allclose(rows["sharded"], rows["single"], atol=1e-4)
  tolerance = 1e-5 if mode == "full" else np.sqrt(np.finfo(np.float32).eps)
  np.testing.assert_allclose(rows["sharded"] @ rows["sharded"].T, np.eye(12), atol=tolerance)


@pytest.mark.parametrize("linearize", [None, True, False])
def test_programs_run_in_the_inputs_explicit_mesh(linearize):
  """jax >= 0.11 applies a gradient linearised on inputs sharded over Explicit axes only inside a mesh context
  (outside one: a ShardingTypeError from logsumexp's abs, which jax 0.10 did not raise). The operator enters the
  inputs' mesh when the caller has set none, so every program that traces the loss sees it; unsharded inputs get
  no mesh; a caller's own mesh context works as before. The products equal the unsharded ones."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  params = jax.device_put(PARAMS, NamedSharding(mesh, P()))
  batches = [jax.device_put(b, NamedSharding(mesh, P("data"))) for b in BATCHES]
  seen = []

  def recording(params, batch):  # a new function each time: jit caches programs by the loss function
    seen.append(jax.sharding.get_abstract_mesh())
    return loss_fn(params, batch)

  recording_loss = lambda *args: recording(*args)  # noqa: E731
  operator = analysis.hessian_operator(recording_loss, params, batches, linearize=linearize)
  product = operator.matvec(params)
  block = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), params)
  forms = operator.quadratic_forms(block)
  assert seen and all(m.axis_names == ("data",) for m in seen), seen
  plain = analysis.hessian_operator(loss_fn, PARAMS, BATCHES, linearize=linearize)
  for got, want in zip(jax.tree.leaves(product), jax.tree.leaves(plain.matvec(PARAMS))):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(forms), np.asarray(plain.quadratic_forms(
      jax.tree.map(lambda x: jnp.stack([x, 2 * x]), PARAMS))), rtol=1e-4)
  seen.clear()
  recording_loss = lambda *args: recording(*args)  # noqa: E731
  analysis.hessian_operator(recording_loss, PARAMS, BATCHES, linearize=linearize).matvec(PARAMS)
  assert seen and all(m.empty for m in seen)
  seen.clear()
  recording_loss = lambda *args: recording(*args)  # noqa: E731
  with jax.set_mesh(mesh):  # the caller's own: used as it is
    inside = analysis.hessian_operator(recording_loss, params, batches, linearize=linearize).matvec(params)
  assert seen and all(m.axis_names == ("data",) for m in seen)
  for got, want in zip(jax.tree.leaves(inside), jax.tree.leaves(product)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
