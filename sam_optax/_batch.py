"""Splitting the batch arguments of a ``grad_fn`` call along their leading axis.

Shared by :func:`sam_optax.microbatched` (gradient accumulation) and the
grouped (m-sharpness) second pass. A *batch argument* is a keyword argument
named in ``batch_argnames``; each of its array leaves carries the examples on
axis 0. Every other argument (a dropout key, BatchNorm statistics) is passed
whole to every piece.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp


def check_batch_argnames(batch_argnames: Any, name: str) -> tuple[str, ...]:
  if isinstance(batch_argnames, str):
    batch_argnames = (batch_argnames,)
  try:
    names = tuple(batch_argnames)
  except TypeError as error:
    raise TypeError(
        f"{name}: batch_argnames must be a sequence of argument names, got {batch_argnames!r}."
    ) from error
  if not names or not all(isinstance(n, str) for n in names):
    raise TypeError(
        f"{name}: batch_argnames must be a non-empty sequence of argument names, "
        f"got {batch_argnames!r}."
    )
  return names


def _is_batched_leaf(leaf: Any) -> bool:
  return hasattr(leaf, "shape") and hasattr(leaf, "dtype")


def partition(
    kwargs: Mapping[str, Any], batch_argnames: Sequence[str], name: str
) -> tuple[dict, dict]:
  """Splits ``kwargs`` into (batch arguments, other arguments)."""
  batched = {k: v for k, v in kwargs.items() if k in batch_argnames}
  if not batched:
    raise TypeError(
        f"{name}: none of batch_argnames={tuple(batch_argnames)} is among the arguments "
        f"passed to grad_fn ({sorted(kwargs) or 'none'}); name the arguments that carry "
        f"the examples on axis 0, e.g. batch_argnames=('batch',)."
    )
  others = {k: v for k, v in kwargs.items() if k not in batch_argnames}
  return batched, others


def batch_size(batched: Mapping[str, Any], name: str) -> int:
  """The common leading-axis size of every array leaf of the batch arguments."""
  sizes = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(batched):
    if not _is_batched_leaf(leaf) or jnp.ndim(leaf) == 0:
      raise ValueError(
          f"{name}: the batch argument leaf {jax.tree_util.keystr(path)} is a scalar; every "
          f"leaf of the batch_argnames arguments must be an array with the examples on "
          f"axis 0 (pass other values as separate arguments)."
      )
    sizes[jax.tree_util.keystr(path)] = leaf.shape[0]
  if not sizes:
    raise ValueError(f"{name}: the batch arguments {sorted(batched)} hold no arrays to split.")
  if len(set(sizes.values())) > 1:
    raise ValueError(
        f"{name}: the batch arguments disagree on the batch size (axis 0): {sizes}."
    )
  return next(iter(sizes.values()))


def split(batched: Any, shape: Sequence[int]) -> Any:
  """Leaves ``(B, ...)`` become ``(*shape, ...)`` (row-major, B = prod(shape))."""
  return jax.tree.map(lambda x: x.reshape(*shape, *x.shape[1:]), batched)


def strided_chunks(batched: Any, num_chunks: int) -> Any:
  """Array leaves ``(B, ...)`` become ``(num_chunks, B / num_chunks, ...)``, strided.

  Chunk ``k`` holds the rows ``k, k + n, k + 2n, ...``: the major axis of the
  reshape stays the one a batch sharded over devices is split along, so every
  chunk is spread over all the devices that hold the batch.
  """

  def chunk(x):
    return jnp.moveaxis(x.reshape(x.shape[0] // num_chunks, num_chunks, *x.shape[1:]), 1, 0)

  return jax.tree.map(chunk, batched)
