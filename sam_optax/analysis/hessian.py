"""Hessian spectra of a loss in pure JAX: HVPs, Lanczos eigenvalues, trace, density.

Conventions shared by every function here:

* ``loss_fn(params, batch) -> scalar`` is the *mean* loss of one batch.
* ``batches`` is a sequence (or iterable) of batches. The loss over several
  batches is their mean **weighted by batch size** (the leading dimension of
  a batch's first leaf), i.e. the mean loss over all their examples; so is its
  Hessian.
* Model state that is not a parameter (BatchNorm statistics, dropout) is the
  caller's to freeze inside ``loss_fn``, e.g. for a Flax linen model::

      def loss_fn(params, batch):
        logits = model.apply({'params': params, 'batch_stats': batch_stats},
                             batch['x'], train=False)      # running stats, no dropout
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch['y']).mean()

Design. Each Hessian-vector product (HVP) is forward-over-reverse
(``jax.jvp`` of ``jax.grad``) and one separately jitted call per batch; the
Lanczos recurrence runs on the host in float64 with full
reorthogonalisation. Two reasons: XLA:CPU runs convolutions inside
``lax.fori_loop``/``scan``/``cond`` ~40x slower than outside (jax-ml/jax#12868),
so a jitted Lanczos loop around a CNN's HVP is slow on CPU; and float64
reorthogonalisation keeps the Krylov basis orthogonal even when the model is
bf16/float32. The per-iteration host cost (a few vector operations on
``num_params`` floats) is small next to an HVP.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar, Iterable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

LossFn = Callable[[Any, Any], jax.Array]


def batch_size(batch: Any) -> int:
  """The number of examples of a batch: the leading dimension of its first leaf."""
  leaves = jax.tree.leaves(batch)
  if not leaves or np.ndim(leaves[0]) == 0:
    raise ValueError("a batch must be a pytree whose first leaf has a leading batch dimension")
  return int(np.shape(leaves[0])[0])


def _as_batch_list(batches: Any) -> list:
  if isinstance(batches, dict) or not isinstance(batches, Iterable):
    raise TypeError("batches must be a sequence (or iterable) of batches; wrap a single batch as [batch]")
  batches = list(batches)
  if not batches:
    raise ValueError("batches is empty")
  return batches


def hvp(loss_fn: LossFn, params: Any, batch: Any, v: Any) -> Any:
  """Hessian-vector product ``H v`` of ``loss_fn(., batch)`` at ``params``.

  Forward-over-reverse: ``jax.jvp(jax.grad(loss), (params,), (v,))``, which
  costs about two gradients and never forms ``H``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``.
    params: the point (a pytree).
    batch: one batch.
    v: a pytree like ``params``.

  Returns:
    ``H v``, a pytree like ``params``.

  Example::

      >>> import jax.numpy as jnp
      >>> from sam_optax import analysis
      >>> loss_fn = lambda w, batch: 0.5 * jnp.sum(batch * w ** 2)
      >>> analysis.hvp(loss_fn, jnp.ones(2), jnp.array([2.0, 3.0]), jnp.array([1.0, 1.0]))
      Array([2., 3.], dtype=float32)
  """
  v = jax.tree.map(lambda p, t: jnp.asarray(t, jnp.asarray(p).dtype), params, v)
  return jax.jvp(lambda p: jax.grad(loss_fn)(p, batch), (params,), (v,))[1]


class FlatOperator(NamedTuple):
  """The Hessian over several batches as a float64 matrix-free operator on flat vectors."""

  matvec: Callable[[np.ndarray], np.ndarray]
  dim: int
  unravel: Callable[[np.ndarray], Any]
  counter: list  # counter[0] = number of (full, all-batch) HVPs so far


def _flat_product_impl(loss_fn: LossFn, params: Any, batch: Any, flat_v: jax.Array) -> jax.Array:
  """Flat ``H v`` for flat ``v`` (the params' dtype inside, whatever ``flat_v``'s)."""
  flat_params, unravel = ravel_pytree(params)
  return ravel_pytree(hvp(loss_fn, params, batch, unravel(flat_v.astype(flat_params.dtype))))[0]


# ``loss_fn`` is static: JAX's jit cache then compiles the HVP once per loss
# function (and shapes), so eigenvalues, trace and density of one loss share it.
_flat_product = jax.jit(_flat_product_impl, static_argnums=0)


def hessian_operator(loss_fn: LossFn, params: Any, batches: Any, *, jit: bool = True) -> FlatOperator:
  """``v -> H v`` on flat float64 vectors, H the Hessian of the batch-size-weighted mean loss.

  The jitted HVP is cached per ``loss_fn``, so repeated analyses of the same
  loss (eigenvalues, trace, density) compile it once.
  """
  batches = _as_batch_list(batches)
  weights = np.array([batch_size(b) for b in batches], np.float64)
  weights /= weights.sum()
  flat_params, unravel = ravel_pytree(params)
  dtype = flat_params.dtype
  product = functools.partial(_flat_product if jit else _flat_product_impl, loss_fn)
  counter = [0]

  def matvec(vector: np.ndarray) -> np.ndarray:
    counter[0] += 1
    flat_v = jnp.asarray(vector, dtype)
    out = np.zeros(vector.shape, np.float64)
    for weight, batch in zip(weights, batches):
      out += weight * np.asarray(product(params, batch, flat_v), np.float64)
    return out

  return FlatOperator(matvec, int(flat_params.size), lambda x: unravel(jnp.asarray(x, dtype)), counter)


class LanczosResult(NamedTuple):
  ritz_values: np.ndarray  # eigenvalues of T, ascending
  ritz_vectors: np.ndarray  # eigenvectors of T (columns)
  basis: np.ndarray  # Krylov basis Q, shape (iterations, dim)
  residuals: np.ndarray  # |beta_m * s_{m,i}|, the residual norm of each Ritz pair


def lanczos(
    matvec: Callable[[np.ndarray], np.ndarray],
    start: np.ndarray,
    max_iters: int,
    *,
    converged: Optional[Callable[[np.ndarray, np.ndarray], bool]] = None,
    min_iters: int = 1,
) -> LanczosResult:
  """Lanczos tridiagonalisation with full (twice-applied) reorthogonalisation, float64.

  Stops after ``max_iters`` iterations, when the Krylov space is invariant
  (``beta`` ~ 0), or when ``converged(ritz_values, residuals)`` says so.
  """
  dim = start.size
  max_iters = max(1, min(max_iters, dim))
  basis = np.zeros((max_iters, dim))
  alphas, betas = [], []
  q = start / np.linalg.norm(start)
  for j in range(max_iters):
    basis[j] = q
    w = matvec(q)
    alpha = float(q @ w)
    w = w - alpha * q - (betas[-1] * basis[j - 1] if j > 0 else 0.0)
    for _ in range(2):  # full reorthogonalisation, twice is enough (Parlett)
      w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
    beta = float(np.linalg.norm(w))
    alphas.append(alpha)
    iterations = j + 1
    values, vectors = _tridiagonal_eigh(alphas, betas)
    residuals = np.abs(beta * vectors[-1, :])
    scale = max(1.0, float(np.max(np.abs(values))))
    if beta <= 1e-10 * scale or iterations == max_iters:
      break
    if iterations >= min_iters and converged is not None and converged(values, residuals):
      break
    betas.append(beta)
    q = w / beta
  return LanczosResult(values, vectors, basis[:iterations], residuals)


def _tridiagonal_eigh(alphas: Sequence[float], betas: Sequence[float]):
  m = len(alphas)
  tridiagonal = np.diag(np.asarray(alphas, np.float64))
  if m > 1:
    off = np.asarray(betas[: m - 1], np.float64)
    tridiagonal += np.diag(off, 1) + np.diag(off, -1)
  return np.linalg.eigh(tridiagonal)


def _start_vector(key: jax.Array, dim: int) -> np.ndarray:
  return np.asarray(jax.random.normal(key, (dim,), jnp.float32), np.float64)


class _UnpacksAs:
  """A result that unpacks (and indexes) as the short tuple its function promises.

  ``eigenvalues, eigenvectors = hessian_eigenvalues(...)`` works as the
  contract says, and the diagnostics (``num_hvps``, residuals, ...) stay
  available as attributes instead of lengthening the tuple.
  """

  _unpacks_as: ClassVar[tuple[str, ...]] = ()

  def _as_tuple(self) -> tuple:
    return tuple(getattr(self, name) for name in self._unpacks_as)

  def __iter__(self):
    return iter(self._as_tuple())

  def __len__(self) -> int:
    return len(self._unpacks_as)

  def __getitem__(self, index):
    return self._as_tuple()[index]


@dataclasses.dataclass(frozen=True)
class EigenResult(_UnpacksAs):
  """Result of :func:`hessian_eigenvalues`; unpacks as ``(eigenvalues, eigenvectors)``.

  Attributes:
    eigenvalues: (top_k,) float64, sorted by decreasing magnitude.
    eigenvectors: a list of ``top_k`` unit-norm pytrees like ``params``.
    num_hvps: the number of Hessian-vector products (each over all batches).
    residuals: ``||H y - theta y||`` for each pair (bounds the eigenvalue error).
  """

  _unpacks_as: ClassVar[tuple[str, ...]] = ("eigenvalues", "eigenvectors")

  eigenvalues: np.ndarray
  eigenvectors: list
  num_hvps: int
  residuals: np.ndarray


def hessian_eigenvalues(
    loss_fn: LossFn,
    params: Any,
    batches: Any,
    top_k: int = 1,
    *,
    key: jax.Array,
    tol: float = 1e-4,
    max_iters: int = 100,
    jit: bool = True,
) -> EigenResult:
  r"""The ``top_k`` Hessian eigenvalues of largest magnitude, and eigenvectors.

  Lanczos with full reorthogonalisation from a Gaussian start vector. It stops
  once every one of the ``top_k`` Ritz pairs has a residual
  ``||H y - theta y|| = |beta_m s_{m,i}| <= tol * |theta|``; since for a
  symmetric matrix some eigenvalue lies within the residual of every Ritz
  value, each returned eigenvalue is then within ``tol`` (relative) of an exact
  one — in practice far closer (the error decreases with the residual squared).
  PyHessian's power iteration stops on a relative *change* of 1e-3 between
  iterations, which often leaves it ~5e-3 from the exact value.

  Returns an :class:`EigenResult`: it unpacks as ``eigenvalues, eigenvectors =
  ...``, and ``.num_hvps`` / ``.residuals`` say what it cost and how exact it is.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar mean loss``.
    params: where the Hessian is taken.
    batches: a sequence of batches; the loss is their batch-size-weighted mean.
    top_k: how many eigenvalues. Default 1.
    key: a ``jax.random.PRNGKey`` for the start vector.
    tol: relative residual tolerance. Default 1e-4.
    max_iters: at most this many HVPs. Default 100.
    jit: jit the HVP (default True; False for debugging).

  Example::

      >>> import jax, jax.numpy as jnp
      >>> from sam_optax import analysis
      >>> loss_fn = lambda w, batch: 0.5 * jnp.sum(batch * w ** 2)   # H = diag(batch)
      >>> result = analysis.hessian_eigenvalues(loss_fn, jnp.ones(3), [jnp.array([1.0, 5.0, 2.0])],
      ...                                       top_k=2, key=jax.random.key(0))
      >>> [round(float(v), 4) for v in result.eigenvalues]
      [5.0, 2.0]

  References: Lanczos (1950); Yao et al., "PyHessian" (2020).
  """
  if top_k < 1:
    raise ValueError(f"top_k must be >= 1, got {top_k}")
  operator = hessian_operator(loss_fn, params, batches, jit=jit)
  top_k = min(top_k, operator.dim)

  def converged(values, residuals):
    order = np.argsort(-np.abs(values))[:top_k]
    if len(order) < top_k:
      return False
    return bool(np.all(residuals[order] <= tol * np.maximum(np.abs(values[order]), 1e-30)))

  result = lanczos(operator.matvec, _start_vector(key, operator.dim), max_iters,
                   converged=converged, min_iters=top_k + 1)
  order = np.argsort(-np.abs(result.ritz_values))[:top_k]
  vectors = [result.basis.T @ result.ritz_vectors[:, i] for i in order]
  vectors = [operator.unravel(v / np.linalg.norm(v)) for v in vectors]
  return EigenResult(result.ritz_values[order], vectors, operator.counter[0], result.residuals[order])


@dataclasses.dataclass(frozen=True)
class Extremes(_UnpacksAs):
  """Result of :func:`hessian_extremes`; unpacks as ``(lambda_max, lambda_min)``.

  Attributes:
    lambda_max: the largest eigenvalue.
    lambda_min: the smallest (most negative) eigenvalue.
    num_hvps: Hessian-vector products used.
    ratio: ``|lambda_max / lambda_min|`` (a property).
  """

  _unpacks_as: ClassVar[tuple[str, ...]] = ("lambda_max", "lambda_min")

  lambda_max: float
  lambda_min: float
  num_hvps: int

  @property
  def ratio(self) -> float:
    """``|lambda_max / lambda_min|``, the sharpness ratio the SAM study tabulates."""
    return abs(self.lambda_max / self.lambda_min) if self.lambda_min != 0 else math.inf


def hessian_extremes(
    loss_fn: LossFn,
    params: Any,
    batches: Any,
    *,
    key: jax.Array,
    tol: float = 1e-4,
    max_iters: int = 150,
    jit: bool = True,
) -> Extremes:
  """The largest and the smallest (most negative) Hessian eigenvalues.

  One Lanczos run gives both ends of the spectrum; it stops when both extreme
  Ritz values have residual ``<= tol * max(|lambda_max|, |lambda_min|)``.
  Returns :class:`Extremes`: it unpacks as ``lambda_max, lambda_min = ...``;
  ``.ratio`` is ``|lambda_max / lambda_min|`` (the sharpness ratio the SAM
  study tabulates) and ``.num_hvps`` the cost.

  Example::

      >>> import jax, jax.numpy as jnp
      >>> from sam_optax import analysis
      >>> loss_fn = lambda w, batch: 0.5 * jnp.sum(batch * w ** 2)   # H = diag(batch)
      >>> lambda_max, lambda_min = analysis.hessian_extremes(
      ...     loss_fn, jnp.ones(3), [jnp.array([4.0, -0.5, 1.0])], key=jax.random.key(0))
      >>> round(lambda_max, 4), round(lambda_min, 4)
      (4.0, -0.5)
  """
  operator = hessian_operator(loss_fn, params, batches, jit=jit)

  def converged(values, residuals):
    scale = max(abs(values[0]), abs(values[-1]), 1e-30)
    return bool(residuals[0] <= tol * scale and residuals[-1] <= tol * scale)

  result = lanczos(operator.matvec, _start_vector(key, operator.dim), max_iters,
                   converged=converged, min_iters=3)
  return Extremes(float(result.ritz_values[-1]), float(result.ritz_values[0]), operator.counter[0])


@dataclasses.dataclass(frozen=True)
class TraceEstimate(_UnpacksAs):
  """Result of :func:`hessian_trace`; unpacks as ``(trace, stderr)``.

  Attributes:
    trace: the Hutchinson estimate of ``tr(H)``.
    stderr: its standard error (sample standard deviation / sqrt(num_samples)).
    num_hvps: Hessian-vector products used.
  """

  _unpacks_as: ClassVar[tuple[str, ...]] = ("trace", "stderr")

  trace: float
  stderr: float
  num_hvps: int


def hessian_trace(
    loss_fn: LossFn,
    params: Any,
    batches: Any,
    num_samples: int = 64,
    *,
    key: jax.Array,
    jit: bool = True,
) -> TraceEstimate:
  """Hutchinson's estimate of ``tr(H)`` with Rademacher probes, and its standard error.

  ``tr(H) = E[v^T H v]`` for ``v`` with independent +-1 entries; the estimate
  is the mean of ``num_samples`` products and ``stderr`` the sample standard
  deviation over ``sqrt(num_samples)``. Returns :class:`TraceEstimate`, which
  unpacks as ``trace, stderr = ...`` (``.num_hvps`` is the cost).

  Example::

      >>> import jax, jax.numpy as jnp
      >>> from sam_optax import analysis
      >>> loss_fn = lambda w, batch: 0.5 * jnp.sum(batch * w ** 2)   # tr(H) = 6
      >>> trace, stderr = analysis.hessian_trace(loss_fn, jnp.ones(3), [jnp.array([1.0, 2.0, 3.0])],
      ...                                        key=jax.random.key(0))
      >>> round(trace, 4), stderr      # a diagonal H: every Rademacher probe gives tr(H) exactly
      (6.0, 0.0)

  Reference: Hutchinson (1989); Avron & Toledo (2011).
  """
  if num_samples < 2:
    raise ValueError(f"num_samples must be >= 2 for a standard error, got {num_samples}")
  operator = hessian_operator(loss_fn, params, batches, jit=jit)
  samples = []
  for probe_key in jax.random.split(key, num_samples):
    v = np.asarray(jax.random.rademacher(probe_key, (operator.dim,), jnp.float32), np.float64)
    samples.append(float(v @ operator.matvec(v)))
  samples = np.asarray(samples)
  return TraceEstimate(float(samples.mean()), float(samples.std(ddof=1) / math.sqrt(num_samples)),
                       operator.counter[0])


@dataclasses.dataclass(frozen=True)
class SpectralDensity(_UnpacksAs):
  """Result of :func:`spectral_density`; unpacks as ``(grid, density)``.

  Attributes:
    grid: (num_bins,) eigenvalue grid.
    density: (num_bins,) the smoothed density; integrates to 1 over ``grid``.
    nodes: (num_runs, m) the Ritz values of each run (NaN-padded).
    weights: (num_runs, m) their quadrature weights (squared first components).
  """

  _unpacks_as: ClassVar[tuple[str, ...]] = ("grid", "density")

  grid: np.ndarray
  density: np.ndarray
  nodes: np.ndarray
  weights: np.ndarray


def spectral_density(
    loss_fn: LossFn,
    params: Any,
    batches: Any,
    *,
    key: jax.Array,
    num_iters: int = 80,
    num_runs: int = 1,
    num_bins: int = 10_000,
    sigma_squared: float = 1e-5,
    overhead: float = 0.01,
    jit: bool = True,
) -> SpectralDensity:
  r"""Eigenvalue spectral density by stochastic Lanczos quadrature (SLQ).

  As Ghorbani et al. (2019) and PyHessian define it: for each of ``num_runs``
  random unit start vectors, ``num_iters`` Lanczos steps give a tridiagonal
  ``T`` whose eigenvalues (Ritz values ``theta_i``) are the quadrature nodes
  and the squared first components of its eigenvectors the weights ``w_i``.
  The density is their Gaussian-smoothed average::

      density(t) = mean_runs sum_i w_i N(t; theta_i, sigma^2),
      sigma^2 = sigma_squared * max(1, lambda_max - lambda_min),

  on ``num_bins`` points spanning the Ritz values (plus ``overhead``), then
  normalised to integrate to 1 over the grid. Its mean estimates ``tr(H)/n``.

  Returns :class:`SpectralDensity`: it unpacks as ``grid, density = ...``;
  ``.nodes`` and ``.weights`` are the quadrature of each run.

  Example::

      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from sam_optax import analysis
      >>> loss_fn = lambda w, batch: 0.5 * jnp.sum(batch * w ** 2)   # eigenvalues 1, 2, 3, 4
      >>> grid, density = analysis.spectral_density(loss_fn, jnp.ones(4), [jnp.arange(1.0, 5.0)],
      ...                                           key=jax.random.key(0), num_iters=4)
      >>> round(float(np.sum(density) * (grid[1] - grid[0])), 6)
      1.0
  """
  operator = hessian_operator(loss_fn, params, batches, jit=jit)
  all_nodes, all_weights = [], []
  for run_key in jax.random.split(key, num_runs):
    v = np.asarray(jax.random.rademacher(run_key, (operator.dim,), jnp.float32), np.float64)
    result = lanczos(operator.matvec, v, num_iters)
    all_nodes.append(result.ritz_values)
    all_weights.append(result.ritz_vectors[0, :] ** 2)
  lambda_max = float(np.mean([n.max() for n in all_nodes])) + overhead
  lambda_min = float(np.mean([n.min() for n in all_nodes])) - overhead
  grid = np.linspace(lambda_min, lambda_max, num_bins)
  # PyHessian's smoothing: variance sigma_squared * max(1, spectrum width).
  variance = sigma_squared * max(1.0, lambda_max - lambda_min)
  density = np.zeros(num_bins)
  for nodes, weights in zip(all_nodes, all_weights):
    gaussians = np.exp(-((grid[:, None] - nodes[None, :]) ** 2) / (2 * variance))
    density += gaussians @ weights / math.sqrt(2 * math.pi * variance)
  density /= num_runs
  density /= np.sum(density) * (grid[1] - grid[0])
  pad = max(len(n) for n in all_nodes)
  nodes = np.stack([np.pad(n, (0, pad - len(n)), constant_values=np.nan) for n in all_nodes])
  weights = np.stack([np.pad(w, (0, pad - len(w))) for w in all_weights])
  return SpectralDensity(grid, density, nodes, weights)


class SharpnessSummary(NamedTuple):
  """Everything the SAM study's Table I needs for one trained model."""

  lambda_max: float
  lambda_min: float
  lambda_ratio: float  # |lambda_max / lambda_min|
  trace: float
  trace_stderr: float
  num_hvps: int


def sharpness_summary(
    loss_fn: LossFn,
    params: Any,
    batches: Any,
    *,
    key: jax.Array,
    trace_samples: int = 32,
    tol: float = 1e-4,
    jit: bool = True,
) -> SharpnessSummary:
  """lambda_max, lambda_min, |lambda_max/lambda_min| and the Hessian trace in one call."""
  batches = _as_batch_list(batches)
  key_extremes, key_trace = jax.random.split(key)
  extremes = hessian_extremes(loss_fn, params, batches, key=key_extremes, tol=tol, jit=jit)
  trace = hessian_trace(loss_fn, params, batches, trace_samples, key=key_trace, jit=jit)
  return SharpnessSummary(extremes.lambda_max, extremes.lambda_min, extremes.ratio,
                          trace.trace, trace.stderr, extremes.num_hvps + trace.num_hvps)
