"""Filter-normalized loss landscapes (Li et al., 2018), batched with ``vmap``.

``loss_fn(params, batch) -> scalar mean loss``; over several ``batches`` the
loss is their mean weighted by batch size (see :mod:`sam_optax.analysis.hessian`).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sam_optax import _common
from sam_optax.analysis.hessian import LossFn, _check_key, _check_problem, _check_shaped_like, batch_size


def filter_normalized_direction(params: Any, key: jax.Array, *, ignore: Optional[str] = "biasbn") -> Any:
  """A random direction with each filter rescaled to the norm of the matching filter.

  ``d ~ N(0, I)``; for every leaf with 2 or more dimensions, each *filter* —
  the slice along the output axis, which in Flax is the **last** axis of a
  kernel (``(..., in, out)``) — is rescaled so that
  ``||d[..., i]|| = ||w[..., i]||`` (Li et al. 2018, section 4). One-dimensional
  leaves (biases, normalization scales and offsets) are set to zero with the
  default ``ignore="biasbn"`` (loss-landscape's ``--xignore biasbn``); with
  ``ignore=None`` they are copied from ``params`` (as loss-landscape does).
  Params with only 0- and 1-D leaves and ``ignore="biasbn"`` raise
  ``ValueError`` (the direction would be zero).

  Args:
    params: the parameters (a pytree).
    key: a ``jax.random.PRNGKey``.
    ignore: ``"biasbn"`` (default) or ``None``.

  Returns:
    A pytree like ``params`` (same dtypes).

  Example::

      >>> import jax, jax.numpy as jnp
      >>> from sam_optax import analysis
      >>> params = {"kernel": jnp.array([[3.0, 0.0], [4.0, 1.0]]), "bias": jnp.ones(2)}
      >>> d = analysis.filter_normalized_direction(params, jax.random.key(0))
      >>> [round(float(x), 4) for x in jnp.linalg.norm(d["kernel"], axis=0)]   # ||w[:, i]|| = 5, 1
      [5.0, 1.0]
      >>> d["bias"]                                                          # ignore="biasbn"
      Array([0., 0.], dtype=float32)

  Reference: Li, Xu, Taylor, Studer, Goldstein, "Visualizing the Loss
  Landscape of Neural Nets", NeurIPS 2018.
  """
  if ignore not in ("biasbn", None):
    raise ValueError(f"filter_normalized_direction: ignore must be 'biasbn' or None, got {ignore!r}.")
  key = _check_key(key, "filter_normalized_direction")
  leaves, treedef = jax.tree.flatten(params)
  if ignore == "biasbn" and leaves and all(jnp.ndim(leaf) <= 1 for leaf in leaves):
    raise ValueError(
        "filter_normalized_direction: every leaf of params is 0- or 1-D, so ignore='biasbn' "
        "(which zeroes 1-D leaves: biases, normalization) would return a zero direction and "
        "a flat landscape; pass ignore=None to use the params themselves as the direction "
        "of their 1-D leaves, or a direction of your own.")
  keys = jax.random.split(key, max(len(leaves), 1))
  directions = []
  for leaf, leaf_key in zip(leaves, keys):
    leaf = jnp.asarray(leaf)
    if leaf.ndim <= 1:
      directions.append(jnp.zeros_like(leaf) if ignore == "biasbn" else leaf)
      continue
    work = leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32))
    d = jax.random.normal(leaf_key, leaf.shape, work.dtype)
    axes = tuple(range(leaf.ndim - 1))
    d_norm = jnp.sqrt(jnp.sum(d * d, axis=axes, keepdims=True))
    w_norm = jnp.sqrt(jnp.sum(work * work, axis=axes, keepdims=True))
    directions.append((d * (w_norm / jnp.where(d_norm > 0, d_norm, 1.0))).astype(leaf.dtype))
  return jax.tree.unflatten(treedef, directions)


def _surface(loss_fn: LossFn, params: Any, batches: Any, directions: dict[str, Any],
             coordinates: np.ndarray, chunk_size: int, name: str) -> np.ndarray:
  """Loss at ``params + sum_k c[k] * directions[k]`` for each row c of ``coordinates`` (``directions`` by
  argument name, for the errors of ``name``)."""
  chunk_size = _common.check_static_int(chunk_size, "chunk_size", name)
  loss_fn, params, batches = _check_problem(loss_fn, params, batches, name)
  for argument, direction in directions.items():
    _check_shaped_like(params, direction, argument, name)
  vectors = list(directions.values())
  weights = np.array([batch_size(b) for b in batches], np.float64)
  weights /= weights.sum()
  # float64 coordinates and losses for float64 params (x64): alpha = 0.1 is not 0.100000001.
  wide = any(jnp.result_type(leaf) == jnp.float64 for leaf in jax.tree.leaves(params))
  work_dtype = np.float64 if wide else np.float32

  @jax.jit
  def chunk_losses(params, directions, chunk, batch):
    def at(c):
      point = jax.tree.map(
          lambda w, *ds: (w + sum(ci * d for ci, d in zip(c, ds))).astype(w.dtype),
          params, *directions)
      return jnp.asarray(loss_fn(point, batch)).astype(work_dtype)
    return jax.vmap(at)(chunk)

  coordinates = np.asarray(coordinates, work_dtype)
  total = np.zeros(len(coordinates), np.float64)
  for start in range(0, len(coordinates), chunk_size):
    chunk = coordinates[start:start + chunk_size]
    size = len(chunk)
    if size < chunk_size:  # pad to one compiled shape
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], chunk_size - size, axis=0)])
    for weight, batch in zip(weights, batches):
      total[start:start + size] += weight * np.asarray(chunk_losses(params, vectors, chunk, batch))[:size]
  return total


def loss_surface_1d(loss_fn: LossFn, params: Any, batches: Any, direction: Any, alphas: Any,
                    *, chunk_size: int = 16) -> np.ndarray:
  """``f(alpha) = L(params + alpha * direction)`` for each ``alpha``: shape ``(len(alphas),)``.

  ``L = sum_b (n_b / N) L_b`` is the batch-size-weighted mean of
  ``loss_fn(point, batch)`` over ``batches``, accumulated in float64 on the
  host (one float32 scalar per point and batch; float64 coordinates and losses
  when ``params`` has float64 leaves under x64). With ``direction`` from
  :func:`filter_normalized_direction` this is the 1D filter-normalized plot of
  Li et al. (2018); with ``direction = params_b - params`` and
  ``alphas = linspace(0, 1)`` it is the linear interpolation of Goodfellow et
  al. (2015). Grid points are evaluated ``chunk_size`` at a time with
  ``jax.vmap`` inside one jitted call per chunk and batch (lower
  ``chunk_size`` if memory is short: each point holds one copy of the
  parameters). The last chunk is padded to ``chunk_size`` so one program serves
  every chunk.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss over the batch.
    params: the centre point (a pytree of floating-point arrays).
    batches: a sequence (or iterable) of batches, ``[batch]`` for one; a
      batch is a pytree whose leaves carry its examples on axis 0.
    direction: a pytree shaped like ``params``.
    alphas: the step sizes, any array-like (flattened).
    chunk_size: grid points per call, default 16.

  Returns:
    A float64 ``numpy`` array, ``out[i] = f(alphas[i])``.

  Example::

      >>> import jax.numpy as jnp
      >>> from sam_optax import analysis
      >>> loss_fn = lambda w, batch: 0.5 * jnp.mean(batch * w ** 2)
      >>> analysis.loss_surface_1d(loss_fn, jnp.ones(2), [jnp.array([2.0, 4.0])], jnp.ones(2), [-1.0, 0.0, 1.0])
      array([0. , 1.5, 6. ])

  References: Li, Xu, Taylor, Studer, Goldstein, "Visualizing the Loss
  Landscape of Neural Nets", NeurIPS 2018; Goodfellow, Vinyals, Saxe,
  "Qualitatively characterizing neural network optimization problems",
  ICLR 2015.
  """
  alphas = np.asarray(alphas, np.float64).reshape(-1, 1)
  return _surface(loss_fn, params, batches, {"direction": direction}, alphas, chunk_size, "loss_surface_1d")


def loss_surface_2d(loss_fn: LossFn, params: Any, batches: Any, dir_x: Any, dir_y: Any, xs: Any,
                    ys: Any, *, chunk_size: int = 16) -> np.ndarray:
  """``f(x, y) = L(params + x * dir_x + y * dir_y)`` on a grid: ``out[i, j] = f(xs[i], ys[j])``.

  Shape ``(len(xs), len(ys))``; ``L`` and the vmapped chunks as in
  :func:`loss_surface_1d`. Two independent draws of
  :func:`filter_normalized_direction` give the 2D contour plots of Li et al.
  (2018) (:func:`sam_optax.analysis.plotting.plot_loss_contour` draws
  ``(xs, ys, out)``).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss over the batch.
    params: the centre point (a pytree of floating-point arrays).
    batches: a sequence (or iterable) of batches, ``[batch]`` for one.
    dir_x: a pytree shaped like ``params``, the first axis.
    dir_y: a pytree shaped like ``params``, the second axis.
    xs: the coordinates along ``dir_x`` (array-like, flattened).
    ys: the coordinates along ``dir_y`` (array-like, flattened).
    chunk_size: grid points per call, default 16.

  Returns:
    A float64 ``numpy`` array of shape ``(len(xs), len(ys))``.

  Example::

      >>> import jax.numpy as jnp
      >>> from sam_optax import analysis
      >>> loss_fn = lambda w, batch: 0.5 * jnp.sum(batch * w ** 2)     # w = (x, y)
      >>> analysis.loss_surface_2d(loss_fn, jnp.zeros(2), [jnp.array([1.0, 2.0])],
      ...                          jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]), [0.0, 2.0], [0.0, 1.0])
      array([[0., 1.],
             [2., 3.]])

  Reference: Li, Xu, Taylor, Studer, Goldstein, "Visualizing the Loss
  Landscape of Neural Nets", NeurIPS 2018.
  """
  xs, ys = np.ravel(np.asarray(xs, np.float64)), np.ravel(np.asarray(ys, np.float64))
  grid = np.stack(np.meshgrid(xs, ys, indexing="ij"), axis=-1).reshape(-1, 2)
  return _surface(loss_fn, params, batches, {"dir_x": dir_x, "dir_y": dir_y}, grid, chunk_size,
                  "loss_surface_2d").reshape(len(xs), len(ys))
