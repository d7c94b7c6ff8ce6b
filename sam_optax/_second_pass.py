"""The second pass every perturbation transformation shares.

Global (``group_size=None``)::

    eps = perturbation(direction(g))             g: the incoming gradient
    out = mean over axis_name of grad_fn(w + eps, **accepted_args)

Grouped (m-sharpness, ``group_size=m``): the batch arguments are split into
``G = B / m`` groups of ``m`` consecutive examples and, for each group ``i``::

    g_i   = grad_fn(w, group_i)
    eps_i = perturbation(direction(g_i))
    out   = mean_i grad_fn(w + eps_i, group_i)        (then the axis mean)

The groups of a micro-batch run under ``jax.vmap``; with a
:func:`sam_optax.microbatched` ``grad_fn`` the micro-batches run one after
the other in a ``lax.scan``. All arguments are validated once, at
construction time.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from sam_optax import _batch, _common
from sam_optax.perturbation import perturbation


class SecondPass(NamedTuple):
  """What the second pass hands back to a transformation.

  Attributes:
    gradient: ``grad L(w + eps)``, averaged over groups and ``axis_name``.
    loss: ``L(w + eps)`` likewise averaged (float32 scalar), or ``None``
      without ``value_and_grad``.
    gradient_at_w: the gradient at ``w`` the decompositions (F-SAM's EMA,
      GSAM, LookSAM) use: the axis mean of the incoming gradient, or in
      grouped mode the mean of the groups' gradients.
  """

  gradient: Any
  loss: Optional[jax.Array]
  gradient_at_w: Any


def make_second_pass(
    grad_fn: Callable[..., Any],
    name: str,
    *,
    rho: _common.ScalarOrSchedule,
    p: float,
    adaptive: bool,
    eps: float,
    mask: Any,
    axis_name: _common.AxisName,
    sync_perturbation: bool,
    value_and_grad: bool,
    group_size: Optional[int],
    batch_argnames: Sequence[str],
) -> Callable[..., SecondPass]:
  """Validates the arguments; returns ``second_pass(updates, params, count, extra_args, direction_fn)``.

  ``direction_fn`` maps a gradient at ``w`` (the device-local one, the
  axis-averaged one with ``sync_perturbation``, or a group's) to the vector
  the perturbation follows (the identity for SAM; ``g - sigma m`` for F-SAM).
  """
  _common.check_rho(rho, name)
  _common.dual_exponent(p, name)
  _common.check_nonnegative(eps, "eps", name)
  adaptive = _common.check_flag(adaptive, "adaptive", name)
  sync_perturbation = _common.check_flag(sync_perturbation, "sync_perturbation", name)
  batch_argnames = _batch.check_batch_argnames(batch_argnames, name)
  _common.check_mask(mask, name)
  _common.check_axis_name(axis_name, name)
  if group_size is not None:
    group_size = _common.check_static_int(group_size, "group_size", name)
    if sync_perturbation:
      raise ValueError(
          f"{name}: group_size and sync_perturbation=True contradict each other: groups "
          f"take one eps per group of group_size examples, sync_perturbation one global eps."
      )
  # A grouped pass works through a microbatched grad_fn's micro-batches itself.
  num_chunks = getattr(grad_fn, "num_microbatches", 1) if group_size is not None else 1
  inner_fn = getattr(grad_fn, "unbatched_fn", grad_fn) if group_size is not None else grad_fn
  caller = _common.make_grad_caller(inner_fn, name, value_and_grad)
  _common.make_grad_caller(grad_fn, name, value_and_grad)  # validates the outer one too

  def perturb(direction, params, radius):
    return perturbation(direction, radius, p, params=params, adaptive=adaptive, eps=eps, mask=mask)

  def as_loss(value):
    return None if value is None else jnp.asarray(value, jnp.float32)

  def global_pass(updates, params, radius, kwargs, direction_fn):
    gradient_at_w = _common.axis_mean(updates, axis_name)
    local = gradient_at_w if sync_perturbation else updates
    weight_perturbation = perturb(direction_fn(local), params, radius)
    loss, gradient = caller.call(_common.tree_add(params, weight_perturbation), kwargs)
    return SecondPass(
        _common.axis_mean(gradient, axis_name),
        _common.axis_mean(as_loss(loss), axis_name),
        gradient_at_w,
    )

  def grouped_pass(params, radius, kwargs, direction_fn):
    batched, others = _batch.partition(kwargs, batch_argnames, name)
    size = _batch.batch_size(batched, name)
    if size % group_size:
      raise ValueError(
          f"{name}: group_size={group_size} must divide the batch size, got a batch of {size}."
      )
    num_groups = size // group_size
    if num_groups % num_chunks:
      raise ValueError(
          f"{name}: group_size={group_size} must divide the micro-batch of the microbatched "
          f"grad_fn (batch {size} / num_microbatches {num_chunks})."
      )

    def one_group(group):
      group_kwargs = {**others, **group}
      _, gradient = caller.call(params, group_kwargs)
      weight_perturbation = perturb(direction_fn(gradient), params, radius)
      loss, perturbed = caller.call(_common.tree_add(params, weight_perturbation), group_kwargs)
      loss = jnp.zeros([], jnp.float32) if loss is None else as_loss(loss)
      return gradient, perturbed, loss

    def chunk_sum(chunk):
      outputs = jax.vmap(one_group)(chunk)
      return jax.tree.map(
          lambda x: jnp.sum(x.astype(_common.compute_dtype(x.dtype)), axis=0), outputs)

    # (B, ...) -> (G, m, ...) -> (chunks, G / chunks, m, ...), strided over chunks.
    groups = _batch.split(batched, (num_groups, group_size))
    if num_chunks == 1:
      total = chunk_sum(groups)
    else:
      chunks = _batch.strided_chunks(groups, num_chunks)
      zeros = jax.tree.map(
          lambda s: jnp.zeros(s.shape, s.dtype),
          jax.eval_shape(chunk_sum, jax.tree.map(lambda x: x[0], chunks)))
      total, _ = jax.lax.scan(
          lambda acc, chunk: (jax.tree.map(jnp.add, acc, chunk_sum(chunk)), None), zeros, chunks)
    gradient_at_w, gradient, loss = jax.tree.map(lambda t: t / num_groups, total)
    gradient_at_w = _common.cast_like(gradient_at_w, params)
    gradient = _common.cast_like(gradient, params)
    return SecondPass(
        _common.axis_mean(gradient, axis_name),
        _common.axis_mean(loss, axis_name) if value_and_grad else None,
        _common.axis_mean(gradient_at_w, axis_name),
    )

  def second_pass(updates, params, count, extra_args, direction_fn):
    if params is None:
      raise ValueError(f"{name}: update needs params: tx.update(grads, state, params, ...).")
    _common.check_not_masked((updates, params), name)
    _common.check_same_tree(params, updates, name, source="updates")
    _common.check_not_complex(params, "params", name)
    _common.check_floating(params, "params", name)
    radius = _common.evaluate_rho(rho, count)
    kwargs = caller.select(extra_args)
    if group_size is None:
      return global_pass(updates, params, radius, kwargs, direction_fn)
    return grouped_pass(params, radius, kwargs, direction_fn)

  return second_pass
