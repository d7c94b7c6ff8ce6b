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
from sam_optax.analysis.hessian import LossFn, _as_batch_list, _check_key, _check_shaped_like, batch_size


def filter_normalized_direction(params: Any, key: jax.Array, *, ignore: Optional[str] = "biasbn") -> Any:
  """A random direction with each filter rescaled to the norm of the matching filter.

  ``d ~ N(0, I)``; for every leaf with 2 or more dimensions, each *filter* —
  the slice along the output axis, which in Flax is the **last** axis of a
  kernel (``(..., in, out)``) — is rescaled so that
  ``||d[..., i]|| = ||w[..., i]||`` (Li et al. 2018, section 4). One-dimensional
  leaves (biases, normalization scales and offsets) are set to zero with the
  default ``ignore="biasbn"`` (loss-landscape's ``--xignore biasbn``); with
  ``ignore=None`` they are copied from ``params`` (as loss-landscape does).

  Args:
    params: the parameters (a pytree).
    key: a ``jax.random.PRNGKey``.
    ignore: ``"biasbn"`` (default) or ``None``.

  Returns:
    A pytree like ``params`` (same dtypes).

  Reference: Li, Xu, Taylor, Studer, Goldstein, "Visualizing the Loss
  Landscape of Neural Nets", NeurIPS 2018.
  """
  if ignore not in ("biasbn", None):
    raise ValueError(f"ignore must be 'biasbn' or None, got {ignore!r}")
  key = _check_key(key, "filter_normalized_direction")
  leaves, treedef = jax.tree.flatten(params)
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
  batches = _as_batch_list(batches)
  for argument, direction in directions.items():
    _check_shaped_like(params, direction, argument, name)
  vectors = list(directions.values())
  weights = np.array([batch_size(b) for b in batches], np.float64)
  weights /= weights.sum()

  @jax.jit
  def chunk_losses(params, directions, chunk, batch):
    def at(c):
      point = jax.tree.map(
          lambda w, *ds: (w + sum(ci * d for ci, d in zip(c, ds))).astype(w.dtype),
          params, *directions)
      return jnp.asarray(loss_fn(point, batch), jnp.float32)
    return jax.vmap(at)(chunk)

  coordinates = np.asarray(coordinates, np.float32)
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
  """``L(params + alpha * direction)`` for each ``alpha``: shape ``(len(alphas),)``.

  Grid points are evaluated ``chunk_size`` at a time with ``jax.vmap`` inside
  one jitted call per chunk and batch (lower ``chunk_size`` if memory is short:
  each point holds one copy of the parameters).
  """
  alphas = np.asarray(alphas, np.float32).reshape(-1, 1)
  return _surface(loss_fn, params, batches, {"direction": direction}, alphas, chunk_size, "loss_surface_1d")


def loss_surface_2d(loss_fn: LossFn, params: Any, batches: Any, dir_x: Any, dir_y: Any, xs: Any,
                    ys: Any, *, chunk_size: int = 16) -> np.ndarray:
  """``L(params + x * dir_x + y * dir_y)`` on a grid: ``out[i, j]`` is at ``(xs[i], ys[j])``.

  Shape ``(len(xs), len(ys))``; evaluated in vmapped chunks as
  :func:`loss_surface_1d`.
  """
  xs, ys = np.asarray(xs, np.float32), np.asarray(ys, np.float32)
  grid = np.stack(np.meshgrid(xs, ys, indexing="ij"), axis=-1).reshape(-1, 2)
  return _surface(loss_fn, params, batches, {"dir_x": dir_x, "dir_y": dir_y}, grid, chunk_size,
                  "loss_surface_2d").reshape(len(xs), len(ys))
