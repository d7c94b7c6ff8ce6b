"""Hessian spectra of a loss in pure JAX: HVPs, Lanczos eigenvalues, trace, density.

Conventions shared by every function here:

* ``loss_fn(params, batch) -> scalar`` is the *mean* loss of one batch.
* ``batches`` is a sequence (or iterable) of batches. The loss over several
  batches is their mean **weighted by batch size** (the leading dimension
  most of a batch's array leaves share, so a key riding along does not count),
  i.e. the mean loss over all their examples; so is its Hessian.
* Model state that is not a parameter (BatchNorm statistics, dropout) is the
  caller's to freeze inside ``loss_fn``, e.g. for a Flax linen model::

      def loss_fn(params, batch):
        logits = model.apply({'params': params, 'batch_stats': batch_stats},
                             batch['x'], train=False)      # running stats, no dropout
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch['y']).mean()

Where the work lives. Everything of size ``num_params`` stays on the devices,
laid out like the params: every Krylov vector, probe and eigenvector is a
pytree with the params' shapes and shardings (sharded params, e.g. FSDP, stay
sharded; nothing is flattened with ``ravel_pytree`` or gathered onto one
device), and the Lanczos basis is a Python list of such pytrees (in device
loops, one such pytree with a leading iteration axis).

* ``H v`` over several batches is ``sum_b (n_b / n) H_b v``: one jitted call
  per batch adds its term into an on-device accumulator (donated, so updated in
  place); nothing goes to the host between batches. Each ``H_b v`` is
  forward-over-reverse (``jax.jvp`` of ``jax.grad``). When the batches'
  linearisation residuals fit in :data:`LINEARIZE_BUDGET_BYTES`, the loss'
  gradient is linearised once per batch (``jax.linearize``) and every later
  product evaluates only the linear (tangent) part, like PyHessian's retained
  double-backward graph.
* Reorthogonalisation is partial (Simon 1984): the loss of orthogonality is
  estimated on the host from ``alpha_j, beta_j`` alone, with each step's
  rounding taken as ``eps1 ||T||``, ``eps1`` measured by the three-term steps
  themselves (twice the largest ``|<q_{j-1}, w>|`` left so far, over
  ``||T||``; at least the unit roundoff), and only when it exceeds
  ``sqrt(eps1)`` is a vector (and the next) orthogonalised, against the basis
  vectors it lost orthogonality to. That is jitted tree arithmetic
  on the devices: block Gram-Schmidt against groups of up to 32 basis
  vectors per call, in float32 (float64 when ``jax_enable_x64`` is on),
  repeated once more when a pass cancels more than ``1 - 1/sqrt(2)`` of the
  vector's norm (Daniel, Gragg, Kaufman & Stewart 1976: "twice is enough").
* Only the tridiagonal coefficients ``alpha_j, beta_j`` (scalars) go to the
  host, where the small ``T`` is diagonalised in float64 to test convergence
  (in device loops, once per chunk of iterations; see below). A third design,
  fused host iterations (:attr:`HessianOperator.lanczos_step`: the first
  batch's call also normalises the previous vector, the last batch's also
  does the three-term step), measured 0.905x the separate calls on an H100
  and slower on XLA:CPU; it is kept, tested, and timed by the benchmark.
* The eigenvectors ``y_k = sum_j s_{j,k} q_j`` are formed in one read of the
  basis: each leaf's ``k`` combinations are interleaved in blocks of 128
  elements, so a block of every basis vector is read from memory once and
  reused from cache for all ``k`` (a ``(k, ...)`` layout streams the basis
  ``k`` times), in groups of 32 or 8 basis vectors per call (the last group
  padded with a zero-weight repeat). The normalised eigenvectors are then
  written into the memory of the basis, which is dead by then, and the start
  vector is normalised in place: on XLA:CPU, fresh memory costs page faults
  that are as slow as the arithmetic.
* Who drives the iterations depends on the backend and the model, by
  measurement (:func:`_iteration_design`). On an accelerator, and on
  XLA:CPU for convolution-free models of at most 250k parameters, the
  iterations of :func:`hessian_eigenvalues` / :func:`hessian_extremes` run
  in device loops (``lax.while_loop``: product, three-term step, Simon's
  estimate and reorthogonalisation against a preallocated basis, all on the
  devices), and the host reads ``alpha, beta`` once per chunk of
  iterations to test every prefix for convergence (the same results and
  HVP counts as a test after every iteration; the chunk lengths follow the
  residuals' decrease). Elsewhere a Python loop drives separately jitted
  calls: XLA:CPU runs a convolution inside ``lax.while_loop``/``scan``/
  ``cond`` several times slower than outside (jax-ml/jax#12868), and the
  vector work of a large model too.
* Hutchinson (trace) and stochastic Lanczos quadrature (density) evaluate a
  block of probes per call. Hutchinson's ``v^T H v`` is a second directional
  derivative, forward-over-forward (two nested ``jax.jvp``, no backward pass,
  no ``H v``), with the block unrolled in one program so XLA computes the
  primal pass once; SLQ's block is ``jax.vmap`` over the probes' HVPs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
import weakref
from typing import Any, Callable, ClassVar, Iterable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from sam_optax import _common

LossFn = Callable[[Any, Any], jax.Array]

#: Linearise each batch's gradient once (and reuse it for every HVP) when the
#: residuals of all batches together take at most this many bytes.
LINEARIZE_BUDGET_BYTES = 1 << 30
_GROUP_SIZES = (32, 16, 8, 4, 2, 1)  # basis vectors per reorthogonalisation call
_COMBINE_SIZES = (32, 8)  # basis vectors per call forming eigenvectors (see _combine_bounds)
_INTERLEAVE = 128  # block width of the interleaved layout of eigenvector combinations
_REORTH_AGAIN = 1 / math.sqrt(2)  # DGKS: a second pass when the norm drops below this fraction


def batch_size(batch: Any, name: str = "batch_size", what: str = "a batch") -> int:
  """The number of examples of a batch (errors name ``name``).

  The leading dimension that most of the batch's array leaves share (ties go to
  the largest leaf), typed PRNG keys left out: a dropout key or a mask riding
  along in the batch (``{'dropout_rng': key, 'x': ..., 'y': ...}``, whose first
  leaf is the key) does not set the batch's weight.
  """
  leaves = [leaf for leaf in jax.tree.leaves(batch)
            if np.ndim(leaf) > 0 and not (hasattr(leaf, "dtype")
                                          and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key))]
  if not leaves:
    shapes = [np.shape(leaf) for leaf in jax.tree.leaves(batch)]
    raise ValueError(f"{name}: {what} must be a pytree with an array leaf that has a leading batch dimension, "
                     f"got {type(batch).__name__} with leaf shapes {shapes}.")
  votes: dict[int, list[int]] = {}
  for leaf in leaves:
    count_and_size = votes.setdefault(int(np.shape(leaf)[0]), [0, 0])
    count_and_size[0] += 1
    count_and_size[1] = max(count_and_size[1], int(np.size(leaf)))
  return max(votes, key=lambda size: tuple(votes[size]))


def _as_batch_list(batches: Any, name: str) -> list:
  """``batches`` as a list, each batch checked for a leading batch dimension (errors name ``name``).

  Batches of zero examples are left out: their weight ``n_b / n`` is 0, and
  the mean loss of an empty batch is NaN (0 * NaN would poison the sums).
  """
  # A mapping or an array is one batch, not a sequence of them: iterating it would silently make each key or
  # each example a batch.
  if isinstance(batches, (Mapping, np.ndarray, jax.Array)) or not isinstance(batches, Iterable):
    raise TypeError(f"{name}: batches must be a sequence (or iterable) of batches, got type "
                    f"{type(batches).__name__}; wrap a single batch as [batch].")
  batches = list(batches)
  if not batches:
    raise ValueError(f"{name}: batches is empty; pass at least one batch.")
  sizes = [batch_size(batch, name, f"batches[{index}]") for index, batch in enumerate(batches)]
  if not any(sizes):
    raise ValueError(f"{name}: every batch has zero examples (leading dimensions {sizes}).")
  return [batch for batch, size in zip(batches, sizes) if size]


class _CheckedLoss:
  """``loss_fn`` with its output checked to be a scalar when traced (no cost at run time).

  It is a static argument of the jitted programs, so it hashes and compares
  like ``loss_fn`` (compiled programs are reused across calls with the same
  function, as ``jax.jit`` reuses them); an unhashable callable (a mutable
  dataclass with ``__call__``) is compared by this wrapper's identity instead,
  so it is traced afresh on each call and never with stale attributes.
  """

  __slots__ = ("fn", "name", "cache_key", "__weakref__")

  def __init__(self, fn: Callable, name: str):
    self.fn, self.name = fn, name
    try:
      hash(fn)
      self.cache_key = fn  # what the module's per-loss caches are keyed on
    except TypeError:
      self.cache_key = self

  def __hash__(self) -> int:
    return object.__hash__(self) if self.cache_key is self else hash(self.cache_key)

  def __eq__(self, other: Any) -> bool:
    if not isinstance(other, _CheckedLoss):
      return NotImplemented
    if self.cache_key is self or other.cache_key is other:
      return self is other
    return self.cache_key == other.cache_key

  def __call__(self, params: Any, batch: Any) -> jax.Array:
    value = self.fn(params, batch)
    if np.shape(value) != ():
      raise ValueError(f"{self.name}: loss_fn must return a scalar (the mean loss over the batch), got shape "
                       f"{np.shape(value)}; reduce it, e.g. with .mean().")
    return value


def _check_problem(loss_fn: Any, params: Any, batches: Any, name: str,
                   jit: Any = True) -> tuple[Callable, Any, list]:
  """The checks shared by every entry point: ``loss_fn`` callable (and scalar, when traced), ``params`` floating
  point, ``batches`` (empty ones left out), ``jit``. Returns ``(loss_fn, params, batches)``."""
  _common.check_flag(jit, "jit", name)
  if not callable(loss_fn):
    raise TypeError(f"{name}: loss_fn must be a callable loss_fn(params, batch) -> scalar, got "
                    f"{type(loss_fn).__name__}.")
  params = jax.tree.map(jnp.asarray, params)
  if not jax.tree.leaves(params) or any(not jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree.leaves(params)):
    raise TypeError(f"{name}: params must be a non-empty pytree of floating-point arrays, got leaves of dtypes "
                    f"{sorted({str(x.dtype) for x in jax.tree.leaves(params)})}.")
  if not isinstance(loss_fn, _CheckedLoss):
    loss_fn = _CheckedLoss(loss_fn, name)
  return loss_fn, params, _as_batch_list(batches, name)


# Argument checks of the public functions: a clear error naming the argument, before any work (the core's
# _common.check_static_int / check_nonnegative for counts and tolerances).


def _check_positive(value: Any, argument: str, name: str) -> float:
  value = _common.check_nonnegative(value, argument, name)
  if value == 0:
    raise ValueError(f"{name}: {argument} must be > 0, got {argument}=0.")
  return value


def _check_shaped_like(params: Any, tree: Any, argument: str, name: str) -> None:
  if jax.tree.structure(tree) != jax.tree.structure(params) or any(
      np.shape(t) != np.shape(p) for t, p in zip(jax.tree.leaves(tree), jax.tree.leaves(params))):
    raise ValueError(f"{name}: {argument} must be a pytree shaped like params (same structure and leaf shapes).")


def _check_key(key: Any, name: str) -> jax.Array:
  """One typed PRNG key: ``jax.random.key(seed)`` as it is, a raw ``jax.random.PRNGKey(seed)`` wrapped (the same
  key: both give the same results)."""
  if isinstance(key, (jax.Array, np.ndarray)):
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      if key.ndim == 0:
        return key
    elif key.dtype == np.uint32 and key.ndim == 1:
      try:
        return jax.random.wrap_key_data(key)
      except (TypeError, ValueError):
        pass
  shape = f" of shape {tuple(np.shape(key))} and dtype {key.dtype}" if hasattr(key, "dtype") else ""
  raise TypeError(f"{name}: key must be one PRNG key, jax.random.key(seed) or jax.random.PRNGKey(seed); got "
                  f"{type(key).__name__}{shape}")


def _warn_unless_converged(name: str, worst: float, tol: float, max_iters: int, num_hvps: int) -> None:
  """A ``RuntimeWarning`` when Lanczos stopped at ``max_iters`` short of ``tol`` (``worst > 1``); none for ``tol=0``."""
  if tol > 0 and worst > 1:
    warnings.warn(f"{name}: not converged within max_iters={max_iters} ({num_hvps} HVPs): the worst residual is "
                  f"{worst:.3g} x its tolerance (tol={tol:g}); raise max_iters or tol",
                  RuntimeWarning, stacklevel=3)


def _relative_residuals(residuals: np.ndarray, scale: np.ndarray, tol: float) -> np.ndarray:
  """``residuals / (tol * scale)``: <= 1 is converged; with ``tol = 0`` only an exact zero residual is."""
  if tol == 0:
    return np.where(residuals == 0, 0.0, np.inf)
  return residuals / (tol * np.maximum(scale, 1e-30))


def _accumulation_dtype():
  """float32, or float64 when ``jax_enable_x64`` is on."""
  return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


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
  _check_shaped_like(params, v, "v", "hvp")
  v = jax.tree.map(lambda p, t: jnp.asarray(t, jnp.asarray(p).dtype), params, v)
  return jax.jvp(lambda p: jax.grad(loss_fn)(p, batch), (params,), (v,))[1]


# --------------------------------------------------------------------------
# Tree arithmetic. ``block=True``: every leaf has a leading probe axis and the
# reductions are per probe.


def _dot(a: Any, b: Any, block: bool = False) -> jax.Array:
  dtype = _accumulation_dtype()
  total = 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    axes = tuple(range(1 if block else 0, x.ndim))
    total = total + jnp.sum(x.astype(dtype) * y.astype(dtype), axis=axes)
  return jnp.asarray(total, dtype)


def _scaled(c: jax.Array, x: jax.Array, block: bool) -> jax.Array:
  """``c * x`` with ``c`` a scalar, or one coefficient per probe when ``block``."""
  if block:
    c = jnp.reshape(c, c.shape + (1,) * (x.ndim - 1))
  return c.astype(x.dtype) * x


def _local_step_impl(w, q, q_prev, beta_prev, block, scale=None):
  """``alpha = <q, w>``; ``w - alpha q - beta_prev q_prev``; its norm; and ``<q_prev, result>``.

  The last one is what is left of ``q_prev`` in the result: ``beta_j
  omega_{j+1,j-1}``, measured, from which :class:`_OrthogonalityEstimate`
  takes the rounding level of the steps. XLA:CPU reads ``q_prev`` and the
  result once more for it (cost_analysis: 0.80 -> 0.89 GB for the last
  batch's product and the step at 11.6M parameters; 3.5 ms of a 330 ms
  iteration).

  ``scale`` (unnormalised basis vectors, see :func:`_lanczos_run`): the
  Lanczos vector is ``scale * q`` and ``w = H q``; then ``alpha = scale^2
  <q, w>``, the result is ``scale (w - alpha q) - beta_prev q_prev`` and
  ``beta_prev`` is the coupling times the previous vector's scale (by which
  the caller multiplies ``<q_prev, result>``).
  """
  if scale is None:
    alpha = _dot(q, w, block)
    w = jax.tree.map(lambda a, b, c: a - _scaled(alpha, b, block) - _scaled(beta_prev, c, block), w, q, q_prev)
  else:
    alpha = jnp.square(scale) * _dot(q, w, block)
    w = jax.tree.map(lambda a, b, c: _scaled(scale, a - _scaled(alpha, b, block), block) - _scaled(beta_prev, c, block),
                     w, q, q_prev)
  return w, alpha, jnp.sqrt(_dot(w, w, block)), _dot(q_prev, w, block)


def _project_out_impl(w, vectors, block, factors=None):
  """One classical Gram-Schmidt pass of ``w`` against ``vectors`` (a tuple); and the new norm.

  ``factors[i]`` (unnormalised vectors): the squared scale of ``vectors[i]``,
  so that ``w -= factors[i] <vectors[i], w> vectors[i]``.
  """
  coefficients = [_dot(q, w, block) for q in vectors]
  if factors is not None:
    coefficients = [f * c for f, c in zip(factors, coefficients)]
  w = jax.tree.map(lambda a, *qs: a - sum(_scaled(c, x, block) for c, x in zip(coefficients, qs)), w, *vectors)
  return w, jnp.sqrt(_dot(w, w, block))


def _scale_impl(w, factor, block):
  return jax.tree.map(lambda x: _scaled(factor, x, block), w)


def _norm_impl(w, block):
  return jnp.sqrt(_dot(w, w, block))


def _normalize_impl(w, block):
  norm = _norm_impl(w, block)
  return _scale_impl(w, 1.0 / norm, block), norm


def _interleaves(x: Any) -> bool:
  """Whether :func:`_combine_impl` interleaves the combinations of this leaf (see there).

  Its last axis must split into blocks of :data:`_INTERLEAVE` and must not be
  partitioned (a sharded leading axis, as with FSDP, is fine).
  """
  if np.ndim(x) == 0 or np.shape(x)[-1] % _INTERLEAVE:
    return False
  sharding = getattr(x, "sharding", None)
  if isinstance(sharding, NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (np.ndim(x) - len(sharding.spec))
    return spec[-1] is None
  return sharding is None or sharding.is_fully_replicated or len(sharding.device_set) == 1


def _combine_impl(accumulator, coefficients, vectors, interleave):
  """``accumulator + [sum_i coefficients[i, k] * vectors[i]]_k``: ``k`` combinations in one read of ``vectors``.

  ``coefficients`` is (len(vectors), k); ``interleave`` has a flag per leaf
  (see :func:`_interleaves`). A leaf whose flag is set is laid out
  ``(..., d / B, k, B)``, ``B`` = :data:`_INTERLEAVE`: XLA writes the output
  in that order, so each block of ``B`` elements of every vector is read from
  memory once and reused from cache for all ``k`` combinations (with
  ``(k, ...)`` it would stream every vector ``k`` times). Other leaves get a
  leading axis of size ``k``.
  """
  def leaf(flag, xs):
    x = xs[0]
    if flag:
      shape = x.shape[:-1] + (x.shape[-1] // _INTERLEAVE, 1, _INTERLEAVE)
      return sum(jnp.reshape(c, (-1, 1)).astype(v.dtype) * jnp.reshape(v, shape) for c, v in zip(coefficients, xs))
    return sum(jnp.reshape(c, c.shape + (1,) * x.ndim).astype(v.dtype) * v[None] for c, v in zip(coefficients, xs))
  treedef = jax.tree.structure(vectors[0])
  columns = zip(*[jax.tree.leaves(v) for v in vectors])
  total = treedef.unflatten([leaf(flag, xs) for flag, xs in zip(interleave, columns)])
  if accumulator is None:
    return total
  return jax.tree.map(jnp.add, accumulator, total)


def _split_impl(stacked, like, into, interleave):
  """The ``k`` combinations of :func:`_combine_impl`, unit-normalised, each cast to the dtypes of ``like``.

  ``into``: up to ``k`` dead pytrees like ``like`` (basis vectors), donated so
  that the results are written into their memory instead of fresh memory.
  """
  del into  # only their buffers are used
  dtype = _accumulation_dtype()
  leaves, treedef = jax.tree.flatten(stacked)
  squares = 0.0
  for x, flag in zip(leaves, interleave):
    axis = x.ndim - 2 if flag else 0  # the axis of the k combinations
    squares = squares + jnp.sum(jnp.square(x.astype(dtype)), axis=tuple(a for a in range(x.ndim) if a != axis))
  inverse = 1.0 / jnp.sqrt(squares)

  def row(x, flag, p, k):
    x = jnp.reshape(x[..., k, :], np.shape(p)) if flag else x[k]
    return (x * inverse[k].astype(x.dtype)).astype(p.dtype)
  return [treedef.unflatten([row(x, flag, p, k) for x, flag, p in zip(leaves, interleave, jax.tree.leaves(like))])
          for k in range(inverse.shape[0])]


_local_step = jax.jit(_local_step_impl, static_argnums=4, donate_argnums=0)
_project_out = jax.jit(_project_out_impl, static_argnums=2, donate_argnums=0)
_scale = jax.jit(_scale_impl, static_argnums=2, donate_argnums=0)
_norm = jax.jit(_norm_impl, static_argnums=1)
_normalize = jax.jit(_normalize_impl, static_argnums=1)
_normalize_in_place = jax.jit(_normalize_impl, static_argnums=1, donate_argnums=0)
_combine = jax.jit(_combine_impl, static_argnums=3, donate_argnums=0)
_split = jax.jit(_split_impl, static_argnums=3, donate_argnums=2, keep_unused=True)


# --------------------------------------------------------------------------
# Random vectors laid out like the params.


def _stacked_sharding(sharding: Any) -> Any:
  """The sharding of a leaf with an extra leading (probe or iteration) axis."""
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
  if isinstance(sharding, jax.sharding.SingleDeviceSharding):
    return sharding
  return None


def _leaf_shardings(params: Any, stacked: bool) -> Any:
  def one(p):
    sharding = getattr(p, "sharding", None)
    return _stacked_sharding(sharding) if stacked else sharding
  return jax.tree.map(one, params)


def _relayout(tree: Any, shardings: Any) -> Any:
  """``tree`` with exactly the given shardings.

  Sharding propagation may label a result with an equivalent spec (``P('d')``
  for ``P('d', None)``) or, for some programs, pick another layout; this puts
  it back where the params live (a relabel when equivalent, else a reshard).
  """
  def one(x, sharding):
    if sharding is None or x.sharding == sharding:
      return x
    return jax.device_put(x, sharding)
  return jax.tree.map(one, tree, shardings)


def _rademacher(key: jax.Array, shape: tuple, dtype) -> jax.Array:
  """Independent signs ``+-1`` shaped ``shape``: 32 from each random 32-bit word (:func:`jax.random.rademacher`
  draws a word per sign; threefry's words are most of the cost: 11.6M signs took 161 ms that way, 20 ms this way).

  The words are drawn for ``shape`` with its last axis divided by 32
  (rounded up), so the values depend on the key and ``shape`` only, not on
  the sharding of the result (threefry is partitionable).
  """
  flat = tuple(shape) if shape else (1,)
  words = jax.random.bits(key, flat[:-1] + (-(-flat[-1] // 32),), jnp.uint32)
  bits = (words[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1  # each word's 32 bits, side by side
  bits = jnp.reshape(bits, words.shape[:-1] + (32 * words.shape[-1],))[..., :flat[-1]]
  return jnp.reshape(1 - 2 * bits.astype(jnp.int32), shape).astype(dtype)


@functools.lru_cache(maxsize=64)
def _random_fn(treedef, shapes: tuple, shardings: tuple, num: Optional[int], kind: str, dtype):
  def draw(keys):
    def one(key):
      leaves = []
      for index, shape in enumerate(shapes):
        leaf_key = jax.random.fold_in(key, index)
        if kind == "normal":
          leaves.append(jax.random.normal(leaf_key, shape, dtype))
        else:
          leaves.append(_rademacher(leaf_key, shape, dtype))
      return jax.tree.unflatten(treedef, leaves)
    return one(keys) if num is None else jax.vmap(one)(keys)
  out = None if any(s is None for s in shardings) else jax.tree.unflatten(treedef, list(shardings))
  return jax.jit(draw, out_shardings=out)


def _random_like(params: Any, keys: jax.Array, kind: str) -> Any:
  """Random pytree(s) shaped and sharded like ``params``, in the accumulation dtype.

  ``keys`` is one key (one pytree) or a 1-D array of keys (a block: every leaf
  gets a leading probe axis). Leaf ``i`` of the vector for key ``k`` is drawn
  from ``fold_in(k, i)``, so the values depend on the key only — not on the
  sharding, nor on how probes are grouped into blocks.
  """
  leaves, treedef = jax.tree.flatten(params)
  num = None if keys.ndim == 0 else int(keys.shape[0])
  shardings = jax.tree.leaves(_leaf_shardings(params, stacked=num is not None),
                              is_leaf=lambda x: x is None)
  fn = _random_fn(treedef, tuple(tuple(np.shape(x)) for x in leaves), tuple(shardings), num, kind,
                  _accumulation_dtype())
  return fn(keys)


# --------------------------------------------------------------------------
# The multi-batch Hessian operator.


def _tangent(params, v):
  return jax.tree.map(lambda p, t: t.astype(p.dtype), params, v)


def _hvp_block(loss_fn, params, batch, v, block):
  if not block:
    return hvp(loss_fn, params, batch, v)
  return jax.vmap(lambda t: hvp(loss_fn, params, batch, t))(v)


def _accumulate(accumulator, weight, product):
  dtype = _accumulation_dtype()
  if accumulator is None:
    return jax.tree.map(lambda h: weight * h.astype(dtype), product)
  return jax.tree.map(lambda a, h: a + weight * h.astype(dtype), accumulator, product)


def _hvp_into_impl(loss_fn, block, accumulator, weight, params, batch, v):
  """``accumulator + weight * H_batch v`` (one batch's term of the multi-batch HVP)."""
  return _accumulate(accumulator, weight, _hvp_block(loss_fn, params, batch, v, block))


def _linear_hvp_into_impl(block, accumulator, weight, linear, params, v):
  """Same as :func:`_hvp_into_impl` with the batch's gradient linearised beforehand."""
  v = jax.vmap(_tangent, (None, 0))(params, v) if block else _tangent(params, v)
  return _accumulate(accumulator, weight, jax.vmap(linear)(v) if block else linear(v))


def _second_directional_derivative(loss_fn, params, batch, v):
  """``v^T H_batch v = d^2/dt^2 loss(params + t v, batch)`` at ``t = 0``: forward-over-forward.

  Two nested ``jax.jvp``: only forward passes (the primal, a first- and a
  second-order tangent), no backward pass and no ``H v``.
  """
  v = _tangent(params, v)
  first = lambda w: jax.jvp(lambda u: loss_fn(u, batch), (w,), (v,))[1]
  return jax.jvp(first, (params,), (v,))[1].astype(_accumulation_dtype())


def _quad_into_impl(loss_fn, accumulator, weight, params, batch, v):
  """``accumulator + weight * [v_r^T H_batch v_r]_r`` for a block of probes.

  The block is unrolled inside one program (not ``jax.vmap``): XLA computes
  the primal forward pass once for all probes, and every probe's tangent
  passes keep unbatched weights, which XLA:CPU runs far faster than the
  batched-weight (grouped) convolutions ``vmap`` over weight tangents gives.
  """
  count = jax.tree.leaves(v)[0].shape[0]
  forms = weight * jnp.stack([_second_directional_derivative(loss_fn, params, batch, jax.tree.map(lambda x: x[r], v))
                              for r in range(count)])
  return forms if accumulator is None else accumulator + forms


def _linearize_impl(loss_fn, params, batch):
  return jax.linearize(lambda p: jax.grad(loss_fn)(p, batch), params)[1]


def _lanczos_product_impl(loss_fn, scale_input, finish, accumulator, weight, params, data, v, beta, q_prev,
                          beta_prev):
  """One batch's term of ``H q`` in a Lanczos iteration, fused with the iteration's own vector work.

  ``data`` is the batch, or its linearised gradient when ``loss_fn`` is None.
  ``scale_input``: ``v`` is the previous iteration's unnormalised ``w`` and
  ``q = v / beta`` is formed here (in ``v``'s memory, donated), not in a pass
  of its own; else ``q = v``. ``finish`` (the last batch): the three-term step
  follows in the same program, ``alpha = <q, H q>``,
  ``w = H q - alpha q - beta_prev q_prev`` and ``||w||``.
  Returns ``(q, accumulator)``, or ``(q, w, [alpha, ||w||, <q_prev, w>], ||w||)`` when ``finish``: the host
  reads the three in one transfer (on a GPU each transfer waits about 0.1 ms more), the devices keep ``||w||``.
  """
  q = _scale_impl(v, 1.0 / beta, False) if scale_input else v
  product = data(_tangent(params, q)) if loss_fn is None else hvp(loss_fn, params, data, q)
  accumulator = _accumulate(accumulator, weight, product)
  if not finish:
    return q, accumulator
  w, alpha, norm, left = _local_step_impl(accumulator, q, q_prev, beta_prev, False)
  return q, w, jnp.stack([alpha, norm, left]), norm


# ``loss_fn`` (and ``block``) are static: JAX's jit cache compiles each
# product once per loss function and shapes, so eigenvalues, trace and density
# of one loss share it. The accumulator is donated: updated in place.
_hvp_into = jax.jit(_hvp_into_impl, static_argnums=(0, 1), donate_argnums=2)
_linear_hvp_into = jax.jit(_linear_hvp_into_impl, static_argnums=0, donate_argnums=1)
_quad_into = jax.jit(_quad_into_impl, static_argnums=0, donate_argnums=1)
_linearize = jax.jit(_linearize_impl, static_argnums=0)
_lanczos_product = jax.jit(_lanczos_product_impl, static_argnums=(0, 1, 2), donate_argnums=3)
_lanczos_product_scaling = jax.jit(_lanczos_product_impl, static_argnums=(0, 1, 2), donate_argnums=(3, 7))


def _scalars_beside(params: Any, values: np.ndarray) -> list:
  """``values`` as scalars in the accumulation dtype, on the devices of ``params`` (replicated over a mesh).

  A Python float argument is copied to the device at every call, and on a GPU
  that copy waits for the work queued before it: measured on an H100, a
  batch's product was dispatched in 0.40 ms with a Python float weight and in
  0.20 ms with a device-resident one. Params on no single device or mesh
  keep Python floats.
  """
  leaves = jax.tree.leaves(params)
  sharding = getattr(leaves[0], "sharding", None) if leaves else None
  if isinstance(sharding, NamedSharding):
    sharding = NamedSharding(sharding.mesh, PartitionSpec())
  elif not isinstance(sharding, jax.sharding.SingleDeviceSharding):
    return [float(v) for v in values]
  dtype = _accumulation_dtype()
  return [jax.device_put(np.asarray(v, dtype), sharding) for v in values]


def _tree_bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _abstract(tree) -> tuple:
  """``tree``'s structure and its leaves' (shape, dtype): a hashable key."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in leaves)


_RESIDUAL_BYTES = weakref.WeakKeyDictionary()  # loss_fn -> {(treedef, leaves): bytes}; dies with the loss


def _residual_bytes(loss_fn, treedef, leaves) -> int:
  """Bytes of a batch's linearisation residuals (``jax.linearize``), traced once per loss and shapes.

  Tracing the gradient costs about a millisecond a batch, comparable to a
  product on a GPU, so repeated analyses of one model reuse it.
  """
  try:
    known = _RESIDUAL_BYTES.setdefault(getattr(loss_fn, 'cache_key', loss_fn), {})
  except TypeError:  # not weakly referenceable: no cache
    known = {}
  if (treedef, leaves) not in known:
    params, batch = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in leaves])
    known[treedef, leaves] = _tree_bytes(_linearize.eval_shape(loss_fn, params, batch))
  return known[treedef, leaves]


_CONVOLUTIONS = weakref.WeakKeyDictionary()  # loss_fn -> {(treedef, leaves): bool}; dies with the loss


def _uses_convolution(loss_fn, params, batch) -> bool:
  """Whether ``H_batch v`` contains a convolution (its jaxpr, nested ones included), once per loss and shapes."""
  try:
    known = _CONVOLUTIONS.setdefault(getattr(loss_fn, 'cache_key', loss_fn), {})
  except TypeError:  # not weakly referenceable: no cache
    known = {}
  key = _abstract((params, batch))
  if key not in known:
    known[key] = "conv_general_dilated" in str(jax.make_jaxpr(lambda p, b: hvp(loss_fn, p, b, p))(params, batch))
  return known[key]


class HessianOperator(NamedTuple):
  """``H`` of the batch-size-weighted mean loss, as products with pytrees on the devices.

  Attributes:
    matvec: ``v -> H v`` for a pytree ``v`` like the params (accumulation dtype).
    matvec_block: the same for a block of vectors (every leaf with a leading
      probe axis), vmapped over the probes.
    quadratic_forms: a block of probes ``V -> [v_r^T H v_r]_r``, shape (probes,),
      by forward-over-forward second directional derivatives (no ``H v``).
    params: the params (``jnp`` arrays, their shardings kept).
    num_params: the dimension of ``H``.
    linearized: whether each batch's gradient was linearised once up front.
    counter: ``counter[0]`` is the number of (all-batch) products so far;
      a block of ``r`` probes counts ``r``.
    lanczos_step: ``(v, beta, q_prev, beta_prev) -> (q, w, [alpha, ||w||, <q_prev, w>], ||w||)``,
      one Lanczos iteration with its vector work fused into the product's
      programs: ``q = v / beta`` (``v`` given up; ``beta=None``: ``q = v``),
      ``w = H q - alpha q - beta_prev q_prev``, ``alpha = <q, H q>``. One
      dispatch per batch and iteration instead of three extra calls and a
      pass of their own; ``None`` when not jitted.
    lanczos_loop: ``(state, stop, full) -> state``, Lanczos iterations up to
      ``stop`` in one device loop (:func:`_lanczos_loop_impl`); ``None``
      when not jitted. Does not count products (its caller does).
    uses_convolution: ``() -> bool``, whether a batch's product contains a
      convolution (traced once per loss and shapes).
  """

  matvec: Callable[[Any], Any]
  matvec_block: Callable[[Any], Any]
  quadratic_forms: Callable[[Any], jax.Array]
  params: Any
  num_params: int
  linearized: bool
  counter: list
  lanczos_step: Optional[Callable] = None
  lanczos_loop: Optional[Callable] = None
  uses_convolution: Callable[[], bool] = lambda: False


def _explicit_mesh(*trees: Any) -> Any:
  """The mesh of the first array in ``trees`` sharded over a mesh with Explicit axes, else ``None``."""
  explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
  if explicit is None or not hasattr(jax, "set_mesh") or not hasattr(jax.sharding, "get_abstract_mesh"):
    return None  # an older jax: no Explicit axes, or no jax.set_mesh (nothing to enter; it needed none)
  for leaf in jax.tree.leaves(trees):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and explicit in getattr(sharding.mesh, "axis_types", ()):
      return sharding.mesh
  return None


def _in_mesh(mesh: Any, fn: Callable) -> Callable:
  """``fn`` called under ``jax.set_mesh(mesh)`` unless a mesh is set already (``mesh`` None: ``fn`` itself).

  On inputs sharded over Explicit axes, jax >= 0.11 refuses to apply a
  gradient linearised by ``jax.linearize`` outside a mesh context (a
  ``ShardingTypeError``, "select cases must have the same shardings", from
  ``logsumexp``'s ``abs``; jax 0.10 accepted it). The operator's programs
  therefore run in the inputs' own mesh, as ``jax.set_mesh`` would.
  """
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def in_mesh(*args, **kwargs):
    if not jax.sharding.get_abstract_mesh().empty:
      return fn(*args, **kwargs)
    with jax.set_mesh(mesh):
      return fn(*args, **kwargs)

  return in_mesh


def hessian_operator(loss_fn: LossFn, params: Any, batches: Any, *, jit: bool = True,
                     linearize: Optional[bool] = None) -> HessianOperator:
  """``v -> H v`` on pytrees laid out like ``params``, H the Hessian of the batch-size-weighted mean loss.

  ``H v = sum_b (n_b / n) H_b v``, accumulated on the devices with one jitted
  call per batch (no host round trip between batches); the result has the
  params' shapes and shardings, in float32 (float64 under ``jax_enable_x64``).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar mean loss``.
    params: where the Hessian is taken (sharded params stay sharded).
    batches: a sequence of batches.
    jit: jit the products (default True; False for debugging).
    linearize: linearise each batch's gradient once (``jax.linearize``) and
      reuse it for every product — each HVP then costs only the tangent pass,
      at the memory of the residuals (activations) of all batches. ``None``
      (default): when those residuals fit in :data:`LINEARIZE_BUDGET_BYTES`.

  Example::

      >>> import jax.numpy as jnp
      >>> from sam_optax import analysis
      >>> loss_fn = lambda w, batch: 0.5 * jnp.sum(batch * w ** 2)   # H = diag(batch)
      >>> operator = analysis.hessian_operator(loss_fn, jnp.ones(2), [jnp.array([2.0, 3.0])])
      >>> operator.matvec(jnp.ones(2))
      Array([2., 3.], dtype=float32)
  """
  loss_fn, params, batches = _check_problem(loss_fn, params, batches, "hessian_operator", jit)
  if linearize is not None:
    linearize = _common.check_flag(linearize, "linearize", "hessian_operator")
  weights = np.array([batch_size(b) for b in batches], np.float64)
  weights = _scalars_beside(params, weights / weights.sum())
  num_params = int(sum(np.size(x) for x in jax.tree.leaves(params)))
  counter = [0]
  if not jit:
    linearize = False
  mesh = _explicit_mesh(params, batches)
  if linearize is None:
    residual_bytes = _in_mesh(mesh, lambda: sum(_residual_bytes(loss_fn, *_abstract((params, b))) for b in batches))()
    linearize = residual_bytes <= LINEARIZE_BUDGET_BYTES
  linears = _in_mesh(mesh, lambda: [_linearize(loss_fn, params, b) for b in batches])() if linearize else None
  hvp_into = _hvp_into if jit else _hvp_into_impl
  quad_into = _quad_into if jit else _quad_into_impl
  layouts = {False: _leaf_shardings(params, stacked=False), True: _leaf_shardings(params, stacked=True)}

  def apply(v, block):
    counter[0] += int(jax.tree.leaves(v)[0].shape[0]) if block else 1
    accumulator = None
    if linears is not None:
      for weight, linear in zip(weights, linears):
        accumulator = _linear_hvp_into(block, accumulator, weight, linear, params, v)
    else:
      for weight, batch in zip(weights, batches):
        accumulator = hvp_into(loss_fn, block, accumulator, weight, params, batch, v)
    return _relayout(accumulator, layouts[block])

  def quadratic_forms(v):
    counter[0] += int(jax.tree.leaves(v)[0].shape[0])
    accumulator = None
    for weight, batch in zip(weights, batches):
      accumulator = quad_into(loss_fn, accumulator, weight, params, batch, v)
    return accumulator

  def lanczos_step(v, beta, q_prev, beta_prev):
    counter[0] += 1
    fn, data = (None, linears) if linears is not None else (loss_fn, batches)
    scaling, last = beta is not None, len(weights) - 1
    q, accumulator = v, None
    for index, (weight, item) in enumerate(zip(weights, data)):
      scale_here = scaling and index == 0
      program = _lanczos_product_scaling if scale_here else _lanczos_product
      if index == last:
        q, w, coefficients, norm = program(fn, scale_here, True, accumulator, weight, params, item, q,
                                           beta if scale_here else None, q_prev, beta_prev)
      elif scale_here:
        q, accumulator = program(fn, True, False, accumulator, weight, params, item, q, beta, None, None)
      elif linears is not None:
        accumulator = _linear_hvp_into(False, accumulator, weight, item, params, q)
      else:
        accumulator = _hvp_into(loss_fn, False, accumulator, weight, params, item, q)
    return _relayout(q, layouts[False]), _relayout(w, layouts[False]), coefficients, norm

  def lanczos_loop(state, stop, full):
    fn, data = (None, tuple(linears)) if linears is not None else (loss_fn, tuple(batches))
    return _lanczos_loop(fn, full, state, tuple(weights), params, data, stop)

  apply, quadratic_forms, lanczos_step, lanczos_loop = (
      _in_mesh(mesh, fn) for fn in (apply, quadratic_forms, lanczos_step, lanczos_loop))
  return HessianOperator(lambda v: apply(v, False), lambda v: apply(v, True), quadratic_forms, params,
                         num_params, bool(linearize), counter, lanczos_step if jit else None,
                         lanczos_loop if jit else None, lambda: _uses_convolution(loss_fn, params, batches[0]))


# --------------------------------------------------------------------------
# Lanczos on pytrees.


class _Ops(NamedTuple):
  local_step: Callable
  project_out: Callable
  scale: Callable
  norm: Callable
  normalize: Callable
  normalize_in_place: Callable
  combine: Callable
  split: Callable


_JITTED = _Ops(_local_step, _project_out, _scale, _norm, _normalize, _normalize_in_place, _combine, _split)
_EAGER = _Ops(_local_step_impl, _project_out_impl, _scale_impl, _norm_impl, _normalize_impl, _normalize_impl,
              _combine_impl, _split_impl)


class LanczosResult(NamedTuple):
  """Lanczos tridiagonalisation ``Q^T H Q = T``.

  Attributes:
    ritz_values: eigenvalues of ``T``, ascending (float64, on the host).
    ritz_vectors: eigenvectors of ``T`` (columns; float64, on the host).
    basis: the Krylov basis ``Q``: a list of unit pytrees like the start
      vector, on its devices and with its shardings.
    residuals: ``|beta_m s_{m,i}|``, the residual norm of each Ritz pair.
    num_reorthogonalizations: iterations that orthogonalised against the
      basis (every one with ``reorthogonalize="full"``; with ``"partial"``,
      against the vectors it had lost orthogonality to).
  """

  ritz_values: np.ndarray
  ritz_vectors: np.ndarray
  basis: list
  residuals: np.ndarray
  num_reorthogonalizations: int = 0


def _tridiagonal_eigh(alphas: Sequence[float], betas: Sequence[float]):
  m = len(alphas)
  tridiagonal = np.diag(np.asarray(alphas, np.float64))
  if m > 1:
    off = np.asarray(betas[: m - 1], np.float64)
    tridiagonal += np.diag(off, 1) + np.diag(off, -1)
  return np.linalg.eigh(tridiagonal)


def _group_bounds(count: int) -> list:
  """Reorthogonalisation groups: 32 vectors, then the rest by powers of two (e.g. 45 = 32 + 8 + 4 + 1).

  Few dispatches per pass (at most ``count / 32 + 5``) and only six group
  sizes to compile: every size is one program per params structure, and for
  the small models of a study compiling them costs more than the extra
  dispatches. Every call reads and writes ``w`` once more, so on a large
  model fewer calls are faster: against 13 to 20 vectors of 11.6M
  parameters (XLA:CPU) powers of two took 13 % less time than groups of 8
  and single vectors. No padding: the inner products are separate
  reductions that each stream their vector, so a repeated vector costs as
  much as a new one (unlike :func:`_combine_bounds`).
  """
  bounds, start = [], 0
  for size in _GROUP_SIZES:
    while count - start >= size:
      bounds.append((start, start + size))
      start += size
  return bounds


def _orthogonalise(ops: _Ops, w: Any, basis: list, block: bool, factors: Optional[np.ndarray] = None):
  """Gram-Schmidt of ``w`` against ``basis`` by groups; ``factors``: one row per vector (its squared scale)."""
  norm = None
  for a, b in _group_bounds(len(basis)):
    w, norm = ops.project_out(w, tuple(basis[a:b]), block, None if factors is None else factors[a:b])
  return w, norm


def _check_reorthogonalize(reorthogonalize: str, name: str) -> None:
  if not isinstance(reorthogonalize, str) or reorthogonalize not in ("partial", "full"):
    raise ValueError(f"{name}: reorthogonalize must be 'partial' or 'full', got {reorthogonalize!r}.")


def _reorthogonalization_for(params: Any, requested: str) -> str:
  """``"full"`` when the params are less precise than the accumulation dtype (e.g. bfloat16).

  Simon's estimate assumes products exact to the accumulation dtype; an HVP
  evaluated in bfloat16 loses orthogonality faster than it predicts.
  """
  _check_reorthogonalize(requested, "lanczos")
  eps = _unit_roundoff()
  low = any(jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).eps > eps for x in jax.tree.leaves(params))
  return "full" if low else requested


def _to_host(x: Any) -> np.ndarray:
  """A scalar or per-probe device value as a float64 numpy array of at least one dimension."""
  return np.atleast_1d(np.asarray(jax.device_get(x), np.float64))


def _unit_roundoff() -> float:
  return float(np.finfo(np.dtype(_accumulation_dtype())).eps)


# The rounding term of Simon's recurrence, in units of the largest measured |<q_{j-1}, w>| so far (see
# _OrthogonalityEstimate). Measured without reorthogonalisation while the basis was still semi-orthogonal, the
# largest rounding term max_k |theta_{j,k}| was at most 0.58 of that on a SAM-trained CNN, 0.14 on an MLP.
_ROUNDING_SAFETY = 2.0


def _next_rounding_level(xp, level, norm_t, left, eps: float):
  """The rounding level after a step, for the host (``xp = numpy``) and the device loop (``jax.numpy``).

  ``level``: the level so far (0 before the first step); ``norm_t``: the
  bound on ``||T||``; ``left``: the step's measured ``<q_{j-1}, beta_j
  q_{j+1}>`` (0 at ``j = 0``; not finite: ignored). Returns ``(level,
  growth, eps1)``: the new level ``max(level, eps ||T||, safety |left|)``,
  the factor it grew by (for the estimates made at the old level) and
  ``level / ||T||``, at least ``eps``.
  """
  tiny = xp.finfo(xp.asarray(level).dtype).tiny
  measured = xp.where(xp.isfinite(left), _ROUNDING_SAFETY * xp.abs(left), 0.0)
  step_level = xp.maximum(eps * norm_t, measured)
  growth = xp.where(level > 0, xp.maximum(step_level / xp.maximum(level, tiny), 1.0), 1.0)
  level = xp.maximum(level, step_level)
  return level, growth, xp.maximum(level / xp.maximum(norm_t, tiny), eps)


class _OrthogonalityEstimate:
  """Simon's (1984) recurrence for ``omega_{j,k} ~ q_j^T q_k``, per probe, on the host.

  From the Lanczos relation ``beta_j q_{j+1} = H q_j - alpha_j q_j - beta_{j-1} q_{j-1}``
  and the symmetry of ``H``::

      beta_j omega_{j+1,k} = beta_k omega_{j,k+1} + (alpha_k - alpha_j) omega_{j,k}
                             + beta_{k-1} omega_{j,k-1} - beta_{j-1} omega_{j-1,k} + theta_{j,k},

  with ``omega_{k,k} = 1`` and ``theta_{j,k} = q_k^T f_j - q_j^T f_k`` the
  rounding errors ``f`` of the steps (products included) seen from the
  basis. ``|theta|`` is taken as a level ``r`` that is measured, not
  assumed: every step returns ``<q_{j-1}, beta_j q_{j+1}>``, which is
  ``theta_{j,j-1}`` plus terms of already-small ``omega``s, and ``r`` is
  :data:`_ROUNDING_SAFETY` times the largest of those so far, and at least
  ``eps ||T||`` (``||T||`` Gershgorin's bound of the tridiagonal so far,
  ``eps`` the unit roundoff of the accumulation dtype). ``r`` is added
  with the sign of the estimate (so the estimate errs towards losing
  orthogonality), as in Simon's PRO and Larsen's PROPACK. How far the
  rounding sits above ``eps ||T||`` depends on the product: measured on a
  53k-parameter CNN trained with SAM, ``max_k |theta_{j,k}|`` reached 50
  ``eps ||T||`` (a float32 product through a trained network), on an
  11.6M-parameter MLP at initialisation 0.1 ``eps ||T||``. A rule in ``n``
  alone has them the wrong way round: PROPACK's ``sqrt(n) eps / 2`` is 115
  ``eps`` for the CNN and 1700 for the MLP, which then reorthogonalises far
  more often than its rounding needs. The estimates below the
  diagonal are linear in ``r`` (the diagonal 1s cancel), so when ``r``
  grows they are scaled up with it, as if the final level had been used
  from the start. Costs O(j) scalars per iteration; nothing of size
  ``num_params``.

  :attr:`eps1` (``r / ||T||``, per probe) is the relative rounding level:
  the caller orthogonalises when an estimate exceeds ``sqrt(eps1)``, and
  against the vectors above ``eps1^(3/4)`` (PROPACK's thresholds).
  """

  def __init__(self, num: int, eps: float):
    self.eps = eps
    self.previous = np.zeros((0, num))  # omega_{j-1, 0..j-1}
    self.current = np.ones((1, num))  # omega_{j, 0..j}
    self.level = np.zeros(num)  # r: the rounding level the estimates so far are in units of
    self.eps1 = np.full(num, eps)  # r / ||T||

  def step(self, alphas: np.ndarray, betas: np.ndarray, beta: np.ndarray, norm_t: np.ndarray,
           left: np.ndarray) -> np.ndarray:
    """``omega_{j+1, 0..j}`` from ``alphas[0..j]``, ``betas[0..j-1]``, ``beta = beta_j``, Gershgorin's
    bound on ``||T||`` of those, ``norm_t = max |alpha| + 2 max beta``, and ``left = <q_{j-1}, beta_j
    q_{j+1}>`` measured by the three-term step (ignored when ``j = 0``), all per probe; returns its max |.|."""
    with np.errstate(over="ignore", invalid="ignore"):  # probes that broke down (beta = 0) are ignored
      return self._step(alphas, betas, beta, norm_t, left)

  def _step(self, alphas, betas, beta, norm_t, left):
    j = len(alphas) - 1
    alpha_j = alphas[j]
    safe = np.maximum(beta, np.finfo(np.float64).tiny)
    norm_t = np.maximum(norm_t, beta)  # ||H q_j|| >= beta_j
    current, previous = self.current, self.previous  # omega_{j, 0..j}, omega_{j-1, 0..j-1}
    # Below the diagonal the estimates are linear in the rounding level (the diagonal 1s cancel): when the
    # level grows, the earlier steps' rounding was that much larger than assumed.
    self.level, growth, self.eps1 = _next_rounding_level(np, self.level, norm_t, left if j else 0 * left,
                                                         self.eps)
    current[:-1] *= growth
    previous[:-1] *= growth
    new = np.empty((j + 1,) + beta.shape)
    if j:
      value = betas[:j] * current[1:] + (alphas[:j] - alpha_j) * current[:j] - betas[j - 1] * previous
      value[1:] += betas[:j - 1] * current[:j - 1]
      value = value / safe
      new[:j] = value + np.where(value >= 0, 1.0, -1.0) * self.level / safe
    new[j] = self.level / safe  # q_{j+1} against q_j, after the local step
    self.previous, self.current = self.current, np.concatenate([new, np.ones((1,) + beta.shape)])
    return np.max(np.abs(new), axis=0)

  def above(self, power: float, active: np.ndarray) -> np.ndarray:
    """Indices ``k`` with ``|omega_{j+1,k}| > eps1^power`` for an active probe."""
    level = self.eps1[active] ** power
    return np.flatnonzero(np.any(np.abs(self.current[:-1][:, active]) > level, axis=1))

  def reset(self, indices: np.ndarray):
    """After orthogonalising ``q_{j+1}`` against ``q_k``, ``k`` in ``indices``: orthogonal to working precision."""
    self.current[indices] = self.eps1


def _lanczos_run(ops: _Ops, matvec, start, max_iters: int, block: bool, converged=None, min_iters: int = 1,
                 reorthogonalize: str = "partial", own_start: bool = False, step=None, unit: bool = True):
  """Lanczos with full or partial reorthogonalisation; vectors on the devices, ``alpha``/``beta`` on the host.

  ``reorthogonalize="partial"`` (Simon 1984): :class:`_OrthogonalityEstimate`
  tracks ``max_k |q_{j+1}^T q_k|``; when it exceeds ``sqrt(eps1)``, this vector
  and the next are orthogonalised against the basis vectors with
  ``|omega| > eps1^(3/4)`` (PROPACK's choice; ``eps1`` the rounding level
  measured by the three-term steps), which keeps the basis semi-orthogonal —
  enough for ``T`` to be the projection of ``H`` onto the Krylov space to
  the products' rounding level, so Ritz values and residuals are those of
  full reorthogonalisation — at a fraction of its reads of the basis.
  ``"full"``: every vector, every iteration.

  ``own_start=True``: ``start`` is the caller's to give up; it is normalised
  in place (its memory becomes the first basis vector).

  ``unit=False`` (``matvec`` linear in floating point's range, e.g. an HVP in
  float32 or bfloat16): the basis keeps the unnormalised vectors ``w`` with
  host-side scales, ``q_j = w_j / beta_j``, and ``matvec`` gets ``w_j``; the
  scale enters the three-term step (:func:`_local_step_impl`) and the
  Gram-Schmidt coefficients, so no pass over memory writes ``q_j`` (on
  XLA:CPU, 8 of an iteration's ~30 ms beyond an 11.6M-parameter product).

  ``step`` (one vector, not a block): a :attr:`HessianOperator.lanczos_step`
  that does an iteration's product, three-term step and the normalisation
  of the previous ``w`` in the product's own programs; ``beta`` then stays on
  the devices between iterations (the host reads it, and never sends it back).

  Returns ``(alphas, betas, basis, lengths, reorthogonalised, scales)``:
  ``alphas``/``betas`` are (iterations, probes) float64 arrays, ``lengths[r]``
  the number of valid iterations of probe ``r`` (shorter after a breakdown,
  ``beta ~ 0``), ``reorthogonalised`` the number of iterations that
  orthogonalised against (part of) the basis, and ``scales`` (iterations,
  probes) the factors that make ``basis[j]`` unit (ones when ``unit``).
  """
  _check_reorthogonalize(reorthogonalize, "lanczos")
  layout = jax.tree.map(lambda x: x.sharding, start)
  dtype = _accumulation_dtype()
  fused = step is not None and not block
  unit = unit or fused
  num = int(jax.tree.leaves(start)[0].shape[0]) if block else 1
  if unit:
    q, start_norm = (ops.normalize_in_place if own_start else ops.normalize)(start, block)
    scale = np.ones(num)
  else:  # the start vector itself is the first basis vector
    q, start_norm = start, ops.norm(start, block)
    scale = 1.0 / np.reshape(_to_host(start_norm), num)
  q = _relayout(q, layout)
  basis, scales = [], []
  # alpha_j, beta_j (rows) of each probe (columns); Gershgorin's bound on ||T|| kept as running maxima
  alphas, betas = np.zeros((max_iters, num)), np.zeros((max_iters, num))
  max_alpha, max_beta = np.zeros(num), np.zeros(num)
  lengths = np.full(num, max_iters)
  done = np.zeros(num, bool)
  estimate = _OrthogonalityEstimate(num, _unit_roundoff()) if reorthogonalize == "partial" else None
  again = False  # PRO orthogonalises two consecutive vectors
  selected = np.zeros(0, int)
  reorthogonalised = 0
  per_probe = (lambda x: np.asarray(x, dtype)) if block else (lambda x: np.asarray(x[0], dtype))
  q_prev, coupling = q, per_probe(np.zeros(num))  # coupling: beta_j times the previous vector's scale
  prev_scale = scale  # q_prev's
  if fused:  # beta stays on the devices: a zero laid out like the later ones (one program, not two)
    coupling = start_norm * 0
  pending = None  # fused: (w, ||w||) of the last iteration, normalised inside the next product
  for j in range(max_iters):
    scales.append(scale)
    if fused:
      q, w, coefficients, norm_device = (step(q, None, q_prev, coupling) if pending is None
                                         else step(*pending, q_prev, coupling))
      basis.append(q)
      alpha, norm, left = np.split(_to_host(coefficients), 3)  # one transfer of one array
    else:
      basis.append(q)
      w = matvec(q)
      w, alpha, norm_device, left = ops.local_step(w, q, q_prev, coupling, block, None if unit else per_probe(scale))
      alpha, norm, left = map(_to_host, jax.device_get((alpha, norm_device, left)))  # one transfer
    alphas[j] = alpha
    max_alpha = np.maximum(max_alpha, np.abs(alpha))
    norm_t = max_alpha + 2 * max_beta  # Gershgorin's bound on ||T||: max |alpha| + 2 max beta
    if estimate is None:
      against = np.arange(len(basis))
    else:
      worst = estimate.step(alphas[:j + 1], betas[:j], norm, norm_t, left * prev_scale)
      if again or (len(basis) > 1 and np.any(worst[~done] > np.sqrt(estimate.eps1[~done]))):
        # Against the vectors it has lost orthogonality to (|omega| > eps1^(3/4)); the
        # next vector, against the same ones and its own (PROPACK's choice).
        selected = np.union1d(selected if again else np.zeros(0, int), estimate.above(0.75, ~done))
        against = selected
        again = not again
      else:
        against = np.zeros(0, int)
    iterations = j + 1
    if not block and converged is not None and min_iters <= iterations < max_iters:
      # Tested before any reorthogonalisation: with beta_j of the vector as the three-term step left it, the
      # residual ||H y - theta y|| = beta_j |s_j| is exact (orthogonalising would only move its components along
      # the basis into T's last column), and a converged run skips a pass over the basis it would not use.
      values, vectors = _tridiagonal_eigh(alphas[:iterations, 0], betas[:j, 0])
      if converged(values, np.abs(norm[0] * vectors[-1, :])):
        beta, lengths[0], betas[j] = norm, iterations, norm
        break
    if len(against):
      reorthogonalised += 1
      vectors = [basis[k] for k in against]
      factors = None if unit else np.stack([np.square(per_probe(scales[k])) for k in against])
      norm_local = norm
      w, norm_device = _orthogonalise(ops, w, vectors, block, factors)
      norm = _to_host(norm_device)
      if np.any(norm < _REORTH_AGAIN * norm_local):  # DGKS: cancellation, so once more
        w, norm_device = _orthogonalise(ops, w, vectors, block, factors)
        norm = _to_host(norm_device)
      if estimate is not None:
        estimate.reset(selected)
    beta = norm
    # Invariant Krylov space (beta ~ 0 relative to ||T||, bounded by Gershgorin): that probe is finished.
    finished = ~done & (beta <= 1e-10 * np.maximum(1.0, norm_t))
    done[finished], lengths[finished] = True, iterations
    if done.all() or iterations == max_iters:
      break
    betas[j] = beta
    max_beta = np.maximum(max_beta, beta)
    if fused:  # not done (a single vector that broke down has stopped): beta > 0
      q_prev, coupling, pending = q, norm_device, (w, norm_device)
      continue
    safe = np.where(done, 1.0, beta)
    q_prev, prev_scale = q, scale
    if unit:
      coupling = per_probe(safe)
      q = _relayout(ops.scale(w, per_probe(1.0 / safe), block), layout)
    else:
      coupling, scale = per_probe(safe * scale), 1.0 / safe
      q = _relayout(w, layout)
  lengths = np.minimum(lengths, iterations)
  betas[iterations - 1] = beta  # the last beta, also where the loop stopped before keeping it
  return alphas[:iterations], betas[:iterations], basis, lengths, reorthogonalised, np.stack(scales)


# --------------------------------------------------------------------------
# Lanczos iterations in a device loop.


class _LoopState(NamedTuple):
  """The state of :func:`_lanczos_loop_impl` between chunks: everything on the devices.

  ``basis`` leaves are ``(capacity, *leaf.shape)``: ``q_0 .. q_{j-1}`` in the
  first ``j`` rows. ``omega``/``omega_prev`` hold Simon's estimates
  ``omega_{j, 0..j}`` and ``omega_{j-1, 0..j-1}`` (see
  :class:`_OrthogonalityEstimate`), padded with zeros to ``capacity + 1``.
  """

  basis: Any
  q: Any  # q_j, the next vector to multiply (unit norm)
  q_prev: Any
  beta_prev: jax.Array
  alphas: jax.Array  # (capacity,)
  betas: jax.Array  # (capacity,)
  omega: jax.Array  # (capacity + 1,)
  omega_prev: jax.Array  # (capacity + 1,)
  selected: jax.Array  # (capacity,) bool: the vectors of the last reorthogonalisation
  again: jax.Array  # PRO orthogonalises two consecutive vectors
  max_alpha: jax.Array
  max_beta: jax.Array
  level: jax.Array  # the rounding level the omega estimates are in units of (see _OrthogonalityEstimate)
  j: jax.Array  # iterations done
  done: jax.Array  # the Krylov space is invariant (beta ~ 0)


def _stacked_project_out(w: Any, basis: Any, mask: jax.Array):
  """One classical Gram-Schmidt pass of ``w`` against the rows ``k`` of ``basis`` with ``mask[k]``."""
  dots = _dot(basis, jax.tree.map(lambda x: x[None], w), block=True)  # [<basis[k], w>]_k
  coefficients = jnp.where(mask, dots, 0.0)
  w = jax.tree.map(lambda x, b: x - jnp.tensordot(coefficients.astype(b.dtype), b, axes=1), w, basis)
  return w, jnp.sqrt(_dot(w, w))


def _loop_product(loss_fn, weights, params, data, q):
  """``H q = sum_b weight_b H_b q`` inside one program (``loss_fn`` None: ``data`` are linearised gradients)."""
  accumulator = None
  for weight, item in zip(weights, data):
    product = item(_tangent(params, q)) if loss_fn is None else hvp(loss_fn, params, item, q)
    accumulator = _accumulate(accumulator, weight, product)
  return accumulator


def _lanczos_loop_impl(loss_fn, full, state, weights, params, data, stop):
  """Lanczos iterations ``state.j .. stop - 1`` in one ``lax.while_loop``: products, three-term step,
  Simon's estimate and the reorthogonalisations all on the devices (the recurrences of :func:`_lanczos_run`).

  Stops early when the Krylov space is invariant. ``full``: orthogonalise
  every vector against the whole basis; else partial (PRO), decided on the
  devices from the same recurrence as :class:`_OrthogonalityEstimate`.
  """
  dtype = _accumulation_dtype()
  eps = _unit_roundoff()
  capacity = state.alphas.shape[0]
  rows = jnp.arange(capacity)
  index = jnp.arange(capacity + 1)
  pad = lambda x: jnp.concatenate([x, jnp.zeros((1,), x.dtype)])

  def body(s: _LoopState) -> _LoopState:
    j = s.j
    basis = jax.tree.map(lambda b, x: lax.dynamic_update_index_in_dim(b, x.astype(b.dtype), j, 0), s.basis, s.q)
    w, alpha, norm, left = _local_step_impl(_loop_product(loss_fn, weights, params, data, s.q), s.q, s.q_prev,
                                            s.beta_prev, False)
    alphas = s.alphas.at[j].set(alpha)
    max_alpha = jnp.maximum(s.max_alpha, jnp.abs(alpha))
    norm_t = max_alpha + 2 * s.max_beta  # Gershgorin's bound on ||T||
    valid = rows <= j
    level, eps1 = s.level, eps
    if full:
      mask, selected, again, omega, omega_prev = valid, s.selected, s.again, s.omega, s.omega_prev
    else:  # omega_{j+1, k} from omega_{j, .} and omega_{j-1, .} (Simon's recurrence, vectorised over k)
      safe = jnp.maximum(norm, jnp.finfo(dtype).tiny)
      step_bound = jnp.maximum(norm_t, norm)  # ||H q_j|| >= beta_j
      # The rounding level, measured (as in _OrthogonalityEstimate); the estimates below the diagonal scale with it.
      level, growth, eps1 = _next_rounding_level(jnp, s.level, step_bound, jnp.where(j >= 1, left, 0.0), eps)
      s = s._replace(omega=jnp.where(index < j, growth * s.omega, s.omega),
                     omega_prev=jnp.where(index < j - 1, growth * s.omega_prev, s.omega_prev))
      betas = pad(s.betas)
      shifted_down = lambda x: jnp.concatenate([jnp.zeros((1,), x.dtype), x[:-1]])  # x[k - 1]
      value = (betas * jnp.concatenate([s.omega[1:], jnp.zeros((1,), dtype)]) + (pad(alphas) - alpha) * s.omega
               + shifted_down(betas) * shifted_down(s.omega) - s.beta_prev * s.omega_prev) / safe
      bump = level / safe
      new = jnp.where(index < j, value + jnp.where(value >= 0, 1.0, -1.0) * bump, jnp.where(index == j, bump, 0.0))
      trigger = s.again | ((j >= 1) & (jnp.max(jnp.abs(new)) > jnp.sqrt(eps1)))
      above = valid & (jnp.abs(new[:capacity]) > eps1 ** 0.75)
      mask = trigger & ((s.again & s.selected) | above)
      selected = jnp.where(trigger, mask, s.selected)
      again = jnp.where(trigger, ~s.again, s.again)
      omega_prev, omega = s.omega, jnp.where(index == j + 1, 1.0, new)
    orthogonalise = jnp.any(mask)

    def reorthogonalise(pair):
      w, norm_local = pair
      pair = _stacked_project_out(w, basis, mask)
      return lax.cond(pair[1] < _REORTH_AGAIN * norm_local, lambda p: _stacked_project_out(p[0], basis, mask),
                      lambda p: p, pair)  # DGKS: cancellation, so once more
    w, norm = lax.cond(orthogonalise, reorthogonalise, lambda pair: pair, (w, norm))
    if not full:
      omega = jnp.where(pad(mask), eps1, omega)  # orthogonal to working precision now
    done = norm <= 1e-10 * jnp.maximum(1.0, norm_t)
    q = _scale_impl(w, 1.0 / jnp.where(done, 1.0, norm), False)
    return _LoopState(basis, q, s.q, norm, alphas, s.betas.at[j].set(norm), omega, omega_prev, selected, again,
                      max_alpha, jnp.maximum(s.max_beta, norm), level, j + 1, done)

  return lax.while_loop(lambda s: (s.j < stop) & ~s.done, body, state)


def _loop_state(q: Any, capacity: int) -> _LoopState:
  """The state before the first iteration, ``q`` the unit start vector; the basis has room for ``capacity``,
  laid out like ``q`` (an extra leading axis, unsharded)."""
  dtype = _accumulation_dtype()
  zeros = lambda *shape, kind=dtype: jnp.zeros(shape, kind)
  leaves, treedef = jax.tree.flatten(q)
  basis = treedef.unflatten([jnp.zeros((capacity,) + x.shape, dtype, device=_stacked_sharding(x.sharding))
                             for x in leaves])
  return _LoopState(basis, q, jax.tree.map(jnp.zeros_like, q), zeros(), zeros(capacity), zeros(capacity),
                    zeros(capacity + 1).at[0].set(1.0), zeros(capacity + 1), zeros(capacity, kind=bool),
                    zeros(kind=bool), zeros(), zeros(), zeros(), zeros(kind=jnp.int32), zeros(kind=bool))


def _grow_impl(state, extra):
  """``state`` with room for ``extra`` more iterations."""
  grow = lambda x: jnp.concatenate([x, jnp.zeros((extra,) + x.shape[1:], x.dtype)])
  return state._replace(basis=jax.tree.map(grow, state.basis), alphas=grow(state.alphas), betas=grow(state.betas),
                        omega=grow(state.omega), omega_prev=grow(state.omega_prev), selected=grow(state.selected))


def _stacked_combine_impl(basis, coefficients):
  """``[sum_j coefficients[j, k] basis[j]]_k`` as leaves ``(k, *shape)``: one read of the basis."""
  return jax.tree.map(lambda b: jnp.tensordot(coefficients.T.astype(b.dtype), b, axes=1), basis)


_lanczos_loop = jax.jit(_lanczos_loop_impl, static_argnums=(0, 1), donate_argnums=2)
_grow = jax.jit(_grow_impl, static_argnums=1)
_stacked_combine = jax.jit(_stacked_combine_impl)
_LOOP_CAPACITY = 32  # basis rows allocated at first; doubled (up to max_iters) when the run needs more


def _lanczos_in_loop(loop, start, max_iters: int, min_iters: int, worst: Callable, reorthogonalize: str):
  """Lanczos with the iterations in device loops (:func:`_lanczos_loop_impl`), the convergence test on the host.

  ``loop(state, stop)`` runs iterations up to ``stop``. ``worst(ritz_values,
  residuals)`` is the worst residual relative to its tolerance (<= 1:
  converged). The host reads ``alpha, beta`` once per chunk of iterations and
  tests every prefix of the chunk, so the result is the one of a test after
  every iteration (:func:`_lanczos_run`). The next chunk runs half of the
  iterations that the residuals' geometric decrease predicts are left, and
  at most a quarter of those done so far (Lanczos' residuals fall faster
  and faster, so the prediction is pessimistic): a chunk that runs past the
  first converged iteration wastes less than a quarter of the products
  (done and counted; their vectors are dropped).

  Returns ``(alphas, betas, state, m, performed)``: the
  first ``m`` of the ``performed`` iterations are the result, ``state.basis``
  rows ``0..m-1`` their vectors.
  """
  _check_reorthogonalize(reorthogonalize, "lanczos")
  max_iters = max(1, max_iters)
  q, _ = _normalize_in_place(start, False)
  capacity = min(max_iters, _LOOP_CAPACITY)
  state = _loop_state(q, capacity)
  layout = _leaf_shardings(q, stacked=True)
  stop, checked, history = min(max(min_iters, 1), max_iters), 0, []
  while True:
    if stop > capacity:
      extra = min(max_iters, max(2 * capacity, stop)) - capacity
      state, capacity = _grow(state, extra), capacity + extra
    state = loop(state, stop)
    state = state._replace(basis=_relayout(state.basis, layout))
    alphas, betas, j, done = jax.device_get((state.alphas, state.betas, state.j, state.done))
    alphas, betas, j = np.asarray(alphas, np.float64), np.asarray(betas, np.float64), int(j)
    for i in range(checked + 1, j + 1):  # i iterations: the test of _lanczos_run after iteration i
      if i < min_iters or (bool(done) and i == j) or i == max_iters:
        continue
      values, vectors = _tridiagonal_eigh(alphas[:i], betas[:i - 1])
      value = float(worst(values, np.abs(betas[i - 1] * vectors[-1, :])))
      if value <= 1.0:
        return alphas[:i], betas[:i], state, i, j
      history.append((i, math.log(max(value, 1e-300))))
    checked = j
    if bool(done) or j >= max_iters:
      return alphas[:j], betas[:j], state, j, j
    size = 1
    if len(history) >= 2:  # log(worst) falls about linearly in i, and faster as Ritz values converge
      (i0, v0), (i1, v1) = history[max(0, len(history) - 4)], history[-1]
      rate = (v1 - v0) / (i1 - i0)
      if rate < 0:  # half the predicted iterations, and at most a quarter of those done
        size = max(1, min(int(0.5 * v1 / -rate), j // 4))
    stop = min(max_iters, j + size)


def _ritz_vectors_stacked(basis: Any, count: int, coefficients: np.ndarray, like: Any) -> list:
  """:func:`_ritz_vectors` for a stacked basis (rows ``0..count-1``), each ``y_k`` laid out like ``like``."""
  capacity = jax.tree.leaves(basis)[0].shape[0]
  padded = np.zeros((capacity, coefficients.shape[1]), coefficients.dtype)
  padded[:count] = coefficients
  stacked = _stacked_combine(basis, jnp.asarray(padded, _accumulation_dtype()))
  interleave = (False,) * len(jax.tree.leaves(like))
  layout = _leaf_shardings(like, stacked=False)
  return [_relayout(vector, layout) for vector in _split(stacked, like, (), interleave)]


def _combine_bounds(count: int) -> list:
  """Groups of 32 basis vectors, then of 8, the last one padded up to 8 (e.g. 22 = 8 + 8 + 6|2).

  Padding repeats a vector with coefficient 0: inside one elementwise
  program the repeat is read from cache, so it costs next to nothing, while
  every extra call would read and write the whole accumulator again.
  """
  large, small = _COMBINE_SIZES
  bounds, start = [], 0
  while count - start >= large:
    bounds.append((start, start + large))
    start += large
  while start < count:
    bounds.append((start, start + small))
    start += small
  return bounds


def _ritz_vectors(ops: _Ops, basis: list, coefficients: np.ndarray, like: Any, consume: bool = False) -> list:
  """``y_k = sum_j coefficients[j, k] q_j`` for every column ``k``, normalised, cast like ``like``.

  All columns in one read of the basis; each ``y_k`` has the shardings of
  ``like``. ``consume=True``: the basis is not used afterwards, and the
  results are written into the memory of its first vectors (donated)
  instead of fresh memory.
  """
  dtype = _accumulation_dtype()
  count, k = coefficients.shape
  bounds = _combine_bounds(count)
  padded = np.zeros((bounds[-1][1], k), coefficients.dtype)
  padded[:count] = coefficients
  vectors = list(basis) + [basis[-1]] * (len(padded) - count)
  interleave = tuple(_interleaves(x) for x in jax.tree.leaves(basis[0]))
  accumulator = None
  for a, b in bounds:
    accumulator = ops.combine(accumulator, jnp.asarray(padded[a:b], dtype), tuple(vectors[a:b]), interleave)
  into = ()
  if consume and all(x.dtype == p.dtype for x, p in zip(jax.tree.leaves(basis[0]), jax.tree.leaves(like))):
    into = tuple(basis[:k])
  layout = _leaf_shardings(like, stacked=False)
  return [_relayout(vector, layout) for vector in ops.split(accumulator, like, into, interleave)]


def lanczos(
    matvec: Callable[[Any], Any],
    start: Any,
    max_iters: int,
    *,
    converged: Optional[Callable[[np.ndarray, np.ndarray], bool]] = None,
    min_iters: int = 1,
    jit: bool = True,
    reorthogonalize: str = "partial",
) -> LanczosResult:
  """Lanczos tridiagonalisation of a symmetric ``matvec``, reorthogonalised.

  ``start`` is any pytree of arrays (e.g. shaped and sharded like the params);
  every Krylov vector is a pytree like it and stays where it lives. For
  ``j = 0, 1, ...``: ``w = H q_j``, ``alpha_j = <q_j, w>``,
  ``w -= alpha_j q_j + beta_{j-1} q_{j-1}``, then, when needed, ``w`` is
  orthogonalised against the whole basis (block Gram-Schmidt, repeated when
  a pass cancels more than ``1 - 1/sqrt(2)`` of its norm), ``beta_j = ||w||``,
  ``q_{j+1} = w / beta_j``. Inner products accumulate in float32 (float64
  under ``jax_enable_x64``); only ``alpha_j, beta_j`` go to the host, where
  ``T`` is diagonalised in float64.

  ``reorthogonalize``: ``"partial"`` (default; Simon 1984) estimates the loss
  of orthogonality ``max_k |q_{j+1}^T q_k|`` from ``alpha, beta`` alone with
  Simon's recurrence and orthogonalises against the basis only when it
  exceeds ``sqrt(eps1)`` (then for two consecutive vectors), where ``eps1``
  is the rounding level of a step relative to ``||T||``, measured: each
  three-term step also returns ``<q_{j-1}, w>``, what rounding left of the
  previous vector, and ``eps1`` is twice the largest so far over
  ``||T||``, and at least the unit roundoff ``eps`` (a float32 product
  through a trained network rounds far above ``eps``, while on an
  11.6M-parameter MLP a rule in ``n`` alone, PROPACK's ``sqrt(n) eps / 2``,
  made Lanczos reorthogonalise far more often than its rounding needed).
  The basis stays semi-orthogonal
  (``|q_i^T q_k| <= sqrt(eps1)``), which makes ``T`` the projection of ``H``
  onto the Krylov space to the products' rounding level: the Ritz
  values, their residuals and the number of iterations are those of full
  reorthogonalisation, while the basis is read far less often (it is what
  costs, beyond the ``matvec``s, for a large model). ``"full"``: every
  iteration, for an orthonormal basis to working precision.

  Stops after ``max_iters`` (``>= 1``) iterations, when the Krylov space is
  invariant (``beta`` ~ 0), or when ``converged(ritz_values, residuals)``
  says so (asked from iteration ``min_iters`` on). ``start`` must be finite
  and nonzero; ``matvec`` may return its argument's own arrays (they are
  copied: the three-term step updates the product in place).

  Example::

      >>> import jax.numpy as jnp
      >>> from sam_optax import analysis
      >>> result = analysis.lanczos(lambda v: jnp.array([3.0, 1.0]) * v, jnp.ones(2), 5)
      >>> [round(float(x), 4) for x in result.ritz_values]
      [1.0, 3.0]
  """
  if not callable(matvec):
    raise TypeError(f"lanczos: matvec must be a callable v -> H v, got {type(matvec).__name__}.")
  if converged is not None and not callable(converged):
    raise TypeError(f"lanczos: converged must be None or a callable (ritz_values, residuals) -> bool, got "
                    f"{type(converged).__name__}.")
  max_iters = _common.check_static_int(max_iters, "max_iters", "lanczos")
  min_iters = _common.check_static_int(min_iters, "min_iters", "lanczos")
  _check_reorthogonalize(reorthogonalize, "lanczos")
  _common.check_flag(jit, "jit", "lanczos")
  start = jax.tree.map(lambda x: jnp.asarray(x, _accumulation_dtype()), start)
  if not jax.tree.leaves(start):
    raise ValueError("lanczos: start must be a pytree with at least one array leaf.")
  start_norm = float(_JITTED.norm(start, False))
  if not (math.isfinite(start_norm) and start_norm > 0):
    raise ValueError(f"lanczos: start must be a finite nonzero vector, got one of norm {start_norm}.")

  def fresh(v):  # the product goes into the three-term step in place: never one of the basis' own arrays
    inputs = {id(x) for x in jax.tree.leaves(v)}
    return jax.tree.map(lambda x: jnp.copy(x) if id(x) in inputs else x, matvec(v))

  max_iters = min(max_iters, int(sum(np.size(x) for x in jax.tree.leaves(start))))
  alphas, betas, basis, lengths, reorthogonalised, _ = _lanczos_run(_JITTED if jit else _EAGER, fresh, start,
                                                                    max_iters, False, converged, min_iters,
                                                                    reorthogonalize)
  m = int(lengths[0])
  values, vectors, residuals = _ritz_pairs(alphas[:m, 0], betas[:m, 0])
  return LanczosResult(values, vectors, basis[:m], residuals, reorthogonalised)


def _ritz_pairs(alphas: np.ndarray, betas: np.ndarray):
  """Ritz values (ascending), vectors of ``T`` and residual norms ``|beta_m s_{m,i}|`` from ``m`` iterations."""
  values, vectors = _tridiagonal_eigh(alphas, betas)
  return values, vectors, np.abs(betas[len(alphas) - 1] * vectors[-1, :])


def _wide_range(params: Any) -> bool:
  """Whether every floating leaf has float32's exponent range (bfloat16 does; float16 overflows at 65504).

  An HVP of an unnormalised Lanczos vector (``unit=False`` in
  :func:`_lanczos_run`) is ``||w||`` times larger than that of a unit one.
  """
  top = jnp.finfo(jnp.float32).maxexp
  return all(jnp.finfo(x.dtype).maxexp >= top for x in jax.tree.leaves(params)
             if jnp.issubdtype(x.dtype, jnp.floating))


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


def _on_cpu(params: Any) -> bool:
  """Whether the params live on XLA:CPU devices."""
  leaves = jax.tree.leaves(params)
  devices = leaves[0].devices() if leaves and hasattr(leaves[0], "devices") else set()
  return any(device.platform == "cpu" for device in devices)


def _loop_fits(params: Any) -> bool:
  """Whether device loops' basis fits: ``2 *`` :data:`_LOOP_CAPACITY` vectors (its first growth) in the
  accumulation dtype, per device, within half of each device's free memory.

  The host loop keeps only the vectors it uses (a list), so for a model
  whose basis nearly fills the accelerator it needs less. Devices that
  report no memory statistics (XLA:CPU) fit.
  """
  itemsize = np.dtype(_accumulation_dtype()).itemsize
  per_device = {}
  for leaf in jax.tree.leaves(params):
    for shard in getattr(leaf, "addressable_shards", ()):
      per_device[shard.device] = per_device.get(shard.device, 0) + int(np.prod(shard.data.shape)) * itemsize
  for device, vector_bytes in per_device.items():
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats and not _basis_fits(vector_bytes, stats["bytes_limit"],
                                                  stats.get("bytes_in_use", 0)):
      return False
  return True


def _basis_fits(vector_bytes: int, bytes_limit: int, bytes_in_use: int) -> bool:
  """``2 * _LOOP_CAPACITY`` vectors of ``vector_bytes`` within half of the free ``bytes_limit - bytes_in_use``."""
  return 2 * _LOOP_CAPACITY * vector_bytes <= 0.5 * (bytes_limit - bytes_in_use)


_LOOP_MAX_PARAMS_ON_CPU = 250_000  # XLA:CPU: device loops up to this size (see _iteration_design)


def _iteration_design(operator: HessianOperator) -> str:
  """How :func:`hessian_eigenvalues` and :func:`hessian_extremes` drive Lanczos: ``"loop"`` (device loops,
  :func:`_lanczos_in_loop`), ``"fused"`` (a host loop of :attr:`HessianOperator.lanczos_step`) or ``"host"``
  (a host loop of separate calls).

  Device loops remove the host round trip, the dispatches and (on XLA:CPU)
  the thread pool's wake-ups of every iteration, which is what costs when
  products are small. Measured on XLA:CPU (2 cores, top_k=5, MLPs on 2
  batches of 128 Fashion-MNIST images, 8 paired rounds), loop / host-loop
  time: 0.61x at 25k parameters, 0.78x at 102k, 0.90x at 218k, and 1.23x
  at 1.07M (5 rounds): inside a
  ``lax.while_loop`` XLA:CPU runs the iteration's vector work several times
  slower than as calls of its own, and any convolution ~5x slower
  (jax-ml/jax#12868). So on CPU: loops for convolution-free losses of at
  most :data:`_LOOP_MAX_PARAMS_ON_CPU` parameters. On an accelerator:
  loops, because the H100 profile put the cost beyond the products in the
  per-iteration round trips (``hessian_benchmark.py --sections 4`` times
  the loop against the fused host loop, in the same rounds), unless the
  preallocated basis would crowd the device's memory (:func:`_loop_fits`):
  then the fused host loop.

  ``"fused"`` is nobody's default: on an H100 it took 0.905x the time of
  separate calls (11.6M-parameter MLP), but device loops remove the round
  trips altogether; on XLA:CPU, whose cost is memory traffic, XLA's count of
  bytes accessed rose from 0.80 to 0.98 GB for the last batch's program once
  the three-term step was fused into it, and the call got slower (1.03x and
  1.09x in two runs).
  """
  if operator.lanczos_loop is None:
    return "host"
  if not _on_cpu(operator.params):
    return "loop" if _loop_fits(operator.params) else "fused"
  if operator.num_params <= _LOOP_MAX_PARAMS_ON_CPU and not operator.uses_convolution():
    return "loop"
  return "host"


def _operator_lanczos(operator: HessianOperator, key: jax.Array, max_iters: int, min_iters: int, worst: Callable,
                      reorthogonalize: str):
  """Lanczos on ``operator`` from a Gaussian start, driven as :func:`_iteration_design` says.

  ``worst(ritz_values, residuals)``: the worst residual relative to its
  tolerance (<= 1: converged). Returns ``(ritz_values, ritz_vectors,
  residuals, eigenvectors)``; ``eigenvectors(coefficients)`` forms
  ``y_k = sum_j coefficients[j, k] q_j``, unit-normalised and laid out like
  the params (the basis is dead afterwards).
  """
  reorthogonalize = _reorthogonalization_for(operator.params, reorthogonalize)
  start = _start_vector(operator, key)
  design = _iteration_design(operator)
  max_iters = min(max_iters, operator.num_params)  # both >= 1: checked by the callers and hessian_operator
  if design == "loop":
    full = reorthogonalize == "full"
    alphas, betas, state, m, performed = _lanczos_in_loop(
        lambda state, stop: operator.lanczos_loop(state, stop, full), start, max_iters, min_iters, worst,
        reorthogonalize)
    operator.counter[0] += performed
    return (*_ritz_pairs(alphas, betas), lambda c: _ritz_vectors_stacked(state.basis, m, c, operator.params))
  converged = lambda values, residuals: worst(values, residuals) <= 1.0
  alphas, betas, basis, lengths, _, scales = _lanczos_run(
      _JITTED, operator.matvec, start, max_iters, False, converged, min_iters,
      reorthogonalize, own_start=True, step=operator.lanczos_step if design == "fused" else None,
      unit=not _wide_range(operator.params))
  m = int(lengths[0])
  return (*_ritz_pairs(alphas[:m, 0], betas[:m, 0]),
          lambda c: _ritz_vectors(_JITTED, basis[:m], c * scales[:m], operator.params, consume=True))


def _start_vector(operator: HessianOperator, key: jax.Array) -> Any:
  return _random_like(operator.params, key, "normal")


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
    reorthogonalize: str = "partial",
) -> EigenResult:
  r"""The ``top_k`` Hessian eigenvalues of largest magnitude, and eigenvectors.

  Lanczos with partial reorthogonalisation from a Gaussian start vector (see
  :func:`lanczos`). It stops once every one of the ``top_k`` Ritz pairs has a
  residual ``||H y - theta y|| = |beta_m s_{m,i}| <= tol * |theta|``; since for
  a symmetric matrix some eigenvalue lies within the residual of every Ritz
  value, each returned eigenvalue is then within ``tol`` (relative) of an exact
  one — in practice far closer (the error decreases with the residual squared).
  PyHessian's power iteration stops on a relative *change* of 1e-3 between
  iterations, which often leaves it ~5e-3 from the exact value. Reaching
  ``max_iters`` first gives a ``RuntimeWarning`` with the worst residual
  relative to its tolerance (``.residuals`` has each one). A (near) zero
  eigenvalue is converged once its residual is at the products' rounding
  level, ``10 u max|theta|`` with ``u`` the accumulation dtype's epsilon.

  A start vector meets each eigenspace in one direction, so a repeated
  eigenvalue appears once in its Krylov space; when that space becomes
  invariant (``beta ~ 0``) before ``top_k`` values, Lanczos restarts from a
  new random vector projected out of everything found (fully
  reorthogonalised), so multiplicities are returned as PyHessian's deflated
  power iteration returns them: ``H = diag(5, 5, 2)`` gives ``[5, 5]`` for
  ``top_k=2``.

  The Krylov basis and the eigenvectors ``y_i = sum_j s_{j,i} q_j`` are
  pytrees shaped and sharded like ``params`` and never leave the devices;
  only the tridiagonal coefficients go to the host.

  Returns an :class:`EigenResult`: it unpacks as ``eigenvalues, eigenvectors =
  ...``, and ``.num_hvps`` / ``.residuals`` say what it cost and how exact it is.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar mean loss``.
    params: where the Hessian is taken.
    batches: a sequence of batches; the loss is their batch-size-weighted mean.
    top_k: how many eigenvalues (at most the number of parameters: a larger
      ``top_k`` returns them all). Default 1.
    key: the PRNG key of the start vector: ``jax.random.key(seed)``, or
      ``jax.random.PRNGKey(seed)`` (the same key, the same result).
    tol: relative residual tolerance, ``>= 0``; ``0`` runs ``max_iters``
      iterations (or until the Krylov space is invariant). Default 1e-4.
    max_iters: at most this many HVPs, ``>= top_k``. Default 100.
    jit: jit the HVP (default True; False for debugging).
    reorthogonalize: ``"partial"`` (default) or ``"full"``; see :func:`lanczos`.
      Params in a dtype less precise than the accumulation dtype (bfloat16)
      always get ``"full"``: Simon's estimate assumes exact-to-float32 products.

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
  top_k = _common.check_static_int(top_k, "top_k", "hessian_eigenvalues")
  max_iters = _common.check_static_int(max_iters, "max_iters", "hessian_eigenvalues")
  tol = _common.check_nonnegative(tol, "tol", "hessian_eigenvalues")
  key = _check_key(key, "hessian_eigenvalues")
  _check_reorthogonalize(reorthogonalize, "hessian_eigenvalues")
  loss_fn, params, batches = _check_problem(loss_fn, params, batches, "hessian_eigenvalues", jit)
  operator = hessian_operator(loss_fn, params, batches, jit=jit)
  top_k = min(top_k, operator.num_params)
  if max_iters < top_k:
    raise ValueError(f"hessian_eigenvalues: max_iters ({max_iters}) must be >= top_k ({top_k}): each iteration "
                     "adds one Ritz value.")

  def worst(values, residuals):
    order = np.argsort(-np.abs(values))[:top_k]
    if len(order) < top_k:
      return np.inf
    # Relative to |theta|, but never below the products' rounding level (10 u ||H||): a (near) zero
    # eigenvalue cannot have a residual tol * |theta|.
    scale = np.abs(values[order])
    if tol > 0:
      scale = np.maximum(scale, 10 * _unit_roundoff() / tol * np.max(np.abs(values)))
    return float(np.max(_relative_residuals(residuals[order], scale, tol)))

  values, vectors, residuals, eigenvectors = _operator_lanczos(operator, key, max_iters, top_k + 1, worst,
                                                               reorthogonalize)
  if len(values) < top_k and operator.counter[0] < max_iters:
    # The Krylov space of the start vector is invariant with fewer than top_k dimensions: H has repeated
    # eigenvalues (a start vector reaches each eigenspace in one direction only). Go on in its complement.
    values, residuals, found = _deflated_lanczos(operator, key, values, residuals, eigenvectors(vectors),
                                                 top_k, max_iters, worst)
    _warn_unless_converged("hessian_eigenvalues", worst(values, residuals), tol, max_iters, operator.counter[0])
    order = np.argsort(-np.abs(values))[:top_k]
    return EigenResult(values[order], [found[i] for i in order], operator.counter[0], residuals[order])
  _warn_unless_converged("hessian_eigenvalues", worst(values, residuals), tol, max_iters, operator.counter[0])
  order = np.argsort(-np.abs(values))[:top_k]
  return EigenResult(values[order], eigenvectors(vectors[:, order]), operator.counter[0], residuals[order])


def _deflated_lanczos(operator: HessianOperator, key: jax.Array, values: np.ndarray, residuals: np.ndarray,
                      found: list, top_k: int, max_iters: int, worst: Callable):
  """Lanczos restarted in the orthogonal complement of an invariant Krylov space, until ``top_k`` values.

  ``found``: the unit Ritz vectors spanning the invariant space (exact
  eigenvectors, residuals ~0). Each restart draws a new Gaussian start
  vector (``key`` folded with the restart's number), projects it and every
  product ``H q`` out of all vectors found so far (two Gram-Schmidt passes),
  and runs with full reorthogonalisation (the host loop: this path is for
  small or degenerate Hessians). Stops at ``top_k`` converged values,
  ``max_iters`` products in all, or when the complement is empty. Returns
  ``(values, residuals, vectors)`` of everything found, in matching order.
  """
  dtype = _accumulation_dtype()
  found = [jax.tree.map(lambda x: x.astype(dtype), y) for y in found]

  def project(w):
    for _ in range(2):  # DGKS: twice is enough
      w, norm = _orthogonalise(_JITTED, w, found, False)
    return w, norm

  restart = 0
  while len(values) < top_k and operator.counter[0] < max_iters and len(found) < operator.num_params:
    restart += 1
    start, norm = project(_start_vector(operator, jax.random.fold_in(key, restart)))
    if float(_to_host(norm)[0]) <= 1e-6:  # the start vector lay in the span of the found ones: nothing left
      break

    def matvec(q):  # counted by the operator
      return project(operator.matvec(q))[0]

    def converged(new_values, new_residuals):
      return worst(np.concatenate([values, new_values]), np.concatenate([residuals, new_residuals])) <= 1.0

    alphas, betas, basis, lengths, _, scales = _lanczos_run(
        _JITTED, matvec, start, max_iters - operator.counter[0], False, converged,
        min(top_k - len(values) + 1, max_iters - operator.counter[0]), "full", own_start=True)
    m = int(lengths[0])
    new_values, new_vectors, new_residuals = _ritz_pairs(alphas[:m, 0], betas[:m, 0])
    new_found = _ritz_vectors(_JITTED, basis[:m], new_vectors * scales[:m], operator.params, consume=True)
    values, residuals = np.concatenate([values, new_values]), np.concatenate([residuals, new_residuals])
    found += [jax.tree.map(lambda x: x.astype(dtype), y) for y in new_found]
  like = operator.params
  return values, residuals, [jax.tree.map(lambda x, p: x.astype(p.dtype), y, like) for y in found]


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

  One Lanczos run (on the devices, as in :func:`hessian_eigenvalues`) gives
  both ends of the spectrum; it stops when both extreme Ritz values have
  residual ``<= tol * max(|lambda_max|, |lambda_min|)`` (``tol >= 0``; ``key``
  and ``tol`` as in :func:`hessian_eigenvalues`), or after ``max_iters`` (with
  a ``RuntimeWarning`` when short of ``tol``).
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
  tol = _common.check_nonnegative(tol, "tol", "hessian_extremes")
  max_iters = _common.check_static_int(max_iters, "max_iters", "hessian_extremes")
  key = _check_key(key, "hessian_extremes")
  loss_fn, params, batches = _check_problem(loss_fn, params, batches, "hessian_extremes", jit)
  operator = hessian_operator(loss_fn, params, batches, jit=jit)

  def worst(values, residuals):
    scale = np.full(2, max(abs(values[0]), abs(values[-1])))
    return float(np.max(_relative_residuals(np.array([residuals[0], residuals[-1]]), scale, tol)))

  values, _, residuals, _ = _operator_lanczos(operator, key, max_iters, 3, worst, "partial")
  _warn_unless_converged("hessian_extremes", worst(values, residuals), tol, max_iters, operator.counter[0])
  return Extremes(float(values[-1]), float(values[0]), operator.counter[0])


@dataclasses.dataclass(frozen=True)
class TraceEstimate(_UnpacksAs):
  """Result of :func:`hessian_trace`; unpacks as ``(trace, stderr)``.

  Attributes:
    trace: the Hutchinson estimate of ``tr(H)``.
    stderr: its standard error (sample standard deviation / sqrt(num_samples)).
    num_hvps: Hessian-vector products used.
    samples: the ``num_samples`` quadratic forms ``v^T H v``.
  """

  _unpacks_as: ClassVar[tuple[str, ...]] = ("trace", "stderr")

  trace: float
  stderr: float
  num_hvps: int
  samples: Optional[np.ndarray] = None


def hessian_trace(
    loss_fn: LossFn,
    params: Any,
    batches: Any,
    num_samples: int = 64,
    *,
    key: jax.Array,
    jit: bool = True,
    block_size: int = 10,
) -> TraceEstimate:
  """Hutchinson's estimate of ``tr(H)`` with Rademacher probes, and its standard error.

  ``tr(H) = E[v^T H v]`` for ``v`` with independent +-1 entries; the estimate
  is the mean of ``num_samples`` quadratic forms and ``stderr`` the sample
  standard deviation over ``sqrt(num_samples)``. Returns
  :class:`TraceEstimate`, which unpacks as ``trace, stderr = ...``
  (``.num_hvps`` is the cost, ``.samples`` the quadratic forms).

  Probes are drawn on the devices, shaped and sharded like ``params`` (probe
  ``i`` from ``jax.random.split(key, num_samples)[i]``, so the result does not
  depend on ``block_size`` or the sharding), and at most ``block_size`` of
  them go through each call (``ceil(num_samples / block_size)`` calls of
  equal size). Each ``v^T H_b v = d^2/dt^2 L_b(params + t v)`` is a
  forward-over-forward second directional derivative (two nested
  ``jax.jvp``): only forward passes, no backward pass and no ``H v``; the
  block is unrolled inside one program, so XLA computes each batch's primal
  pass once for the block. Only the ``num_samples`` scalars reach the host.
  Memory: ``block_size`` probes and their tangents at a time. (Measured on
  the digits CNN of ``benchmarks/pyhessian_side_by_side.py``, XLA:CPU: 93 ms
  a probe, against 214 ms for ``v^T (H v)`` with a ``jax.vmap``-ed block of
  linearised HVPs and 113 ms for unblocked forward-over-forward probes.)

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
  num_samples = _common.check_static_int(num_samples, "num_samples", "hessian_trace", minimum=2)  # a stderr needs 2
  block_size = _common.check_static_int(block_size, "block_size", "hessian_trace")
  key = _check_key(key, "hessian_trace")
  loss_fn, params, batches = _check_problem(loss_fn, params, batches, "hessian_trace", jit)
  operator = hessian_operator(loss_fn, params, batches, jit=jit, linearize=False)  # forms need no HVP: no linearisation
  num_blocks = -(-num_samples // min(block_size, num_samples))
  block_size = -(-num_samples // num_blocks)  # as many calls, the least padding: 32 probes go as 4 x 8, not 4 x 10
  keys = jax.random.split(key, num_samples)
  # The last block is padded with repeats of the last probe (results dropped), so one program serves all blocks.
  keys = jnp.concatenate([keys, jnp.repeat(keys[-1:], num_blocks * block_size - num_samples, axis=0)])
  forms = []
  for start in range(0, num_blocks * block_size, block_size):
    probes = _random_like(operator.params, keys[start: start + block_size], "rademacher")
    forms.append(operator.quadratic_forms(probes))
  samples = np.concatenate([np.asarray(f, np.float64) for f in jax.device_get(forms)])[:num_samples]
  return TraceEstimate(float(samples.mean()), float(samples.std(ddof=1) / math.sqrt(num_samples)),
                       num_samples, samples)


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
    block_size: int = 4,
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

  Runs go ``block_size`` at a time through one Lanczos recurrence on the
  devices (``jax.vmap`` over the runs' HVPs; run ``r`` starts from the
  Rademacher vector of ``jax.random.split(key, num_runs)[r]``, so blocking
  does not change the result). Memory: ``block_size * num_iters`` Krylov
  vectors like the params.

  Arguments: ``num_iters >= 1`` (at most the number of parameters are
  done), ``num_runs >= 1``, ``num_bins >= 2``, ``sigma_squared > 0``,
  ``overhead >= 0``, ``block_size >= 1``; ``key`` as in
  :func:`hessian_eigenvalues`. Anything else fails before any work with a
  ``ValueError`` (``TypeError`` for a value of the wrong type) naming the
  argument.

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
  num_iters = _common.check_static_int(num_iters, "num_iters", "spectral_density")
  num_runs = _common.check_static_int(num_runs, "num_runs", "spectral_density")
  num_bins = _common.check_static_int(num_bins, "num_bins", "spectral_density", minimum=2)
  block_size = _common.check_static_int(block_size, "block_size", "spectral_density")
  sigma_squared = _check_positive(sigma_squared, "sigma_squared", "spectral_density")
  overhead = _common.check_nonnegative(overhead, "overhead", "spectral_density")
  key = _check_key(key, "spectral_density")
  loss_fn, params, batches = _check_problem(loss_fn, params, batches, "spectral_density", jit)
  operator = hessian_operator(loss_fn, params, batches, jit=jit)
  iterations = min(num_iters, operator.num_params)
  keys = jax.random.split(key, num_runs)
  all_nodes, all_weights = [], []
  for start in range(0, num_runs, block_size):
    block_keys = keys[start: start + block_size]
    probes = _random_like(operator.params, block_keys, "rademacher")
    alphas, betas, _, lengths, _, _ = _lanczos_run(
        _JITTED, operator.matvec_block, probes, iterations, True,
        reorthogonalize=_reorthogonalization_for(operator.params, "partial"), own_start=True,
        unit=not _wide_range(operator.params))
    for r in range(len(block_keys)):
      m = int(lengths[r])
      values, vectors = _tridiagonal_eigh(alphas[:m, r], betas[:m, r])
      all_nodes.append(values)
      all_weights.append(vectors[0, :] ** 2)
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
    trace_block_size: int = 10,
) -> SharpnessSummary:
  """lambda_max, lambda_min, |lambda_max/lambda_min| and the Hessian trace in one call.

  :func:`hessian_extremes` and :func:`hessian_trace` (``trace_samples``
  probes, at most ``trace_block_size`` per call) with keys split from
  ``key``; all work on the devices. A block of probes is one program whose
  compilation grows with its size: for a one-off summary of a small model
  ``trace_block_size=1`` is faster overall (WideResNet-10-1 on 128 digits:
  13 s with 1, 36 s with 8, compilation included), for many probes of a big
  model the default is.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar mean loss``.
    params: where the Hessian is taken.
    batches: a sequence of batches (``[batch]`` for one).
    key: a PRNG key, split between the two estimates.
    trace_samples: Hutchinson probes, default 32 (at least 2, for the
      standard error).
    tol: Lanczos tolerance of :func:`hessian_extremes`, default 1e-4.
    jit: jit the products, default True.
    trace_block_size: probes per call of :func:`hessian_trace`, default 10.

  Returns:
    :class:`SharpnessSummary` ``(lambda_max, lambda_min, lambda_ratio, trace,
    trace_stderr, num_hvps)``.

  Example::

      >>> import jax, jax.numpy as jnp
      >>> from sam_optax import analysis
      >>> loss_fn = lambda w, batch: 0.5 * jnp.sum(batch * w ** 2)   # H = diag(1, 2, 3)
      >>> summary = analysis.sharpness_summary(loss_fn, jnp.ones(3), [jnp.array([1.0, 2.0, 3.0])],
      ...                                      key=jax.random.key(0))
      >>> [round(x, 4) for x in summary[:5]]
      [3.0, 1.0, 3.0, 6.0, 0.0]

  Reference: the quantities of Table I of the SAM study in
  ``benchmarks/study.md``; Yao et al., "PyHessian", 2020.
  """
  trace_samples = _common.check_static_int(trace_samples, "trace_samples", "sharpness_summary", minimum=2)
  trace_block_size = _common.check_static_int(trace_block_size, "trace_block_size", "sharpness_summary")
  tol = _common.check_nonnegative(tol, "tol", "sharpness_summary")
  loss_fn, params, batches = _check_problem(loss_fn, params, batches, "sharpness_summary", jit)
  key_extremes, key_trace = jax.random.split(_check_key(key, "sharpness_summary"))
  extremes = hessian_extremes(loss_fn, params, batches, key=key_extremes, tol=tol, jit=jit)
  trace = hessian_trace(loss_fn, params, batches, trace_samples, key=key_trace, jit=jit, block_size=trace_block_size)
  return SharpnessSummary(extremes.lambda_max, extremes.lambda_min, extremes.ratio,
                          trace.trace, trace.stderr, extremes.num_hvps + trace.num_hvps)
