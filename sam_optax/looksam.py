"""LookSAM: SAM's second pass only every k-th step, as the first chain member."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax import _common
from sam_optax._second_pass import make_second_pass


class LookSAMState(NamedTuple):
  """State of :func:`looksam_perturb`.

  Attributes:
    count: number of steps taken.
    orthogonal_gradient: ``g_v``, the part of the last SAM gradient orthogonal
      to the plain gradient (float32 for low-precision params). A full step
      whose gradients are not finite leaves it unchanged.
    perturbed_loss: ``L(w + eps)`` of the last *full* step (float32 scalar)
      with ``value_and_grad=True`` (cheap steps keep it); 0 otherwise.
  """

  count: jax.Array
  orthogonal_gradient: Any
  perturbed_loss: jax.Array


# g_v below this many units of roundoff of ||g_s|| is rounding noise, not a direction.
_ROUNDING_UNITS = 4


def _drop_rounding_noise(orthogonal: Any, perturbed_gradient: Any, radius: jax.Array) -> Any:
  """Zero ``g_v`` when it is rounding noise: at ``rho == 0`` or below roundoff of ``||g_s||``.

  The cheap steps rescale ``g_v`` to ``alpha ||g||``, so an orthogonal part
  that is only the rounding error of ``g_s - c g`` (``g_s == g`` at
  ``rho == 0``) would become a step of 0.7 ||g|| in a random direction.
  """
  resolution = max((float(jnp.finfo(x.dtype).eps) for x in jax.tree.leaves(perturbed_gradient)
                    if jnp.issubdtype(x.dtype, jnp.inexact)), default=0.0)
  orthogonal_norm = jnp.sqrt(_common.tree_vdot(orthogonal, orthogonal))
  gradient_norm = jnp.sqrt(_common.tree_vdot(perturbed_gradient, perturbed_gradient))
  negligible = (radius == 0) | (orthogonal_norm <= _ROUNDING_UNITS * resolution * gradient_norm)
  return jax.tree.map(lambda v: jnp.where(negligible, jnp.zeros_like(v), v), orthogonal)


def looksam_perturb(
    grad_fn: Callable[..., Any],
    rho: _common.ScalarOrSchedule = 0.05,
    k: int = 5,
    alpha: float = 0.7,
    p: float = 2,
    *,
    adaptive: bool = False,
    eps: float = 1e-12,
    axis_name: _common.AxisName = None,
    sync_perturbation: bool = False,
    mask: Any = None,
    value_and_grad: bool = False,
    group_size: Optional[int] = None,
    batch_argnames: Sequence[str] = ("batch",),
) -> optax.GradientTransformationExtraArgs:
  r"""LookSAM: SAM at a fraction of its cost (under 2x the base step).

  Every ``k``-th step (a *full* step) computes the SAM gradient and keeps its
  component orthogonal to the plain gradient; the other steps reuse it and do
  not call ``grad_fn`` at all::

      full step (t % k == 0):  eps = rho * dual(g),  g_s = grad_fn(w + eps)
                               g_v = g_s - (<g_s, g> / ||g||^2) g           (kept)
                               out = g_s
      other steps:             out = g + alpha * (||g|| / ||g_v||) * g_v

  ``g_v`` is kept as zero (the cheap steps are then plain ``g``) when ``rho``
  is 0 or ``||g_v||`` is within 4 units of roundoff of ``||g_s||``: there it
  is rounding noise, which the rescaling would blow up to ``alpha ||g||``.

  Which kind of step runs is chosen in one of two ways:

  * **static, host-side** (fast everywhere, recommended on CPU): pass
    ``full_step=True/False`` (a Python bool) to ``tx.update`` and make it a
    static argument of your jitted step, e.g.
    ``jax.jit(train_step, static_argnames='full_step')`` called with
    ``full_step=(step % k == 0)``. The full and the cheap step compile to two
    programs; the cheap one contains no second pass at all.
  * **traced** (one program): omit ``full_step`` (or pass a traced boolean);
    the phase is ``count % k == 0`` and a ``lax.cond`` picks the branch at run
    time, so the second pass really runs only every k-th step. XLA:CPU runs
    convolutions inside control flow much slower (jax-ml/jax#12868), so
    prefer the static phase on CPU; on GPU/TPU the traced phase is fine.

  ``full_step`` is consumed here and never forwarded to ``grad_fn``.

  Multi-device (``axis_name``): ``eps`` from the device-local gradient
  (m-sharpness); ``g`` and ``g_s`` are averaged over the axis before ``g_v`` is
  formed, so the state and the update are identical on every device.

  Args:
    grad_fn: ``grad_fn(params, **batch_args) -> gradient`` (tree of params).
    rho: radius, float >= 0 or an optax schedule. Default 0.05.
    k: a full SAM step every ``k`` steps, an int >= 1. Default 5 (paper).
    alpha: weight of the reused direction, >= 0. Default 0.7 (paper).
    p, adaptive, eps, axis_name, sync_perturbation, mask, value_and_grad,
      group_size, batch_argnames: as in
      :func:`sam_optax.sam_perturb`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (state :class:`LookSAMState`).

  Example::

      >>> import functools, jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda params, batch: jnp.sum((params - batch) ** 2)
      >>> grad_fn = jax.grad(loss_fn)
      >>> tx = optax.chain(sam_optax.looksam_perturb(grad_fn, k=5), optax.sgd(0.1))
      >>> @functools.partial(jax.jit, static_argnames='full_step')
      ... def train_step(params, opt_state, batch, full_step):
      ...   updates, opt_state = tx.update(grad_fn(params, batch), opt_state, params,
      ...                                  batch=batch, full_step=full_step)
      ...   return optax.apply_updates(params, updates), opt_state
      >>> params, opt_state = jnp.ones(3), tx.init(jnp.ones(3))
      >>> for step in range(10):
      ...   params, opt_state = train_step(params, opt_state, jnp.zeros(3), full_step=step % 5 == 0)

  Reference:
    Liu, Mai, Chen, Hsieh, You, "Towards Efficient and Scalable
    Sharpness-Aware Minimization", CVPR 2022 (Algorithm 2).
  """
  name = "looksam_perturb"
  second_pass = make_second_pass(
      grad_fn, name, rho=rho, p=p, adaptive=adaptive, eps=eps, mask=mask,
      axis_name=axis_name, sync_perturbation=sync_perturbation,
      value_and_grad=value_and_grad, group_size=group_size, batch_argnames=batch_argnames)
  alpha = _common.check_nonnegative(alpha, "alpha", name)
  k = _common.check_static_int(k, "k (the full-step period)", name, allow_traced=True)

  def init_fn(params):
    return LookSAMState(count=jnp.zeros([], jnp.int32),
                        orthogonal_gradient=_common.zeros_in_compute_dtype(params),
                        perturbed_loss=jnp.zeros([], jnp.float32))

  def full_step_fn(updates, state, params, extra_args):
    result = second_pass(updates, params, state.count, extra_args, lambda g: g)
    orthogonal = _common.orthogonal_component(result.gradient, result.gradient_at_w)
    orthogonal = _drop_rounding_noise(
        orthogonal, result.gradient, _common.evaluate_rho(rho, state.count))
    orthogonal = _common.cast_like(orthogonal, state.orthogonal_gradient)
    orthogonal = _common.keep_if_finite(
        orthogonal, state.orthogonal_gradient, (result.gradient, result.gradient_at_w))
    loss = state.perturbed_loss if result.loss is None else result.loss
    return _common.cast_like(result.gradient, updates), orthogonal, loss

  def cheap_step_fn(updates, state):
    averaged_gradient = _common.axis_mean(updates, axis_name)
    orthogonal = state.orthogonal_gradient
    gradient_norm = jnp.sqrt(_common.tree_vdot(averaged_gradient, averaged_gradient))
    orthogonal_norm = jnp.sqrt(_common.tree_vdot(orthogonal, orthogonal))
    scale = alpha * _common.safe_divide(gradient_norm, orthogonal_norm)
    out = jax.tree.map(
        lambda g, v: (g.astype(v.dtype) + scale.astype(v.dtype) * v).astype(g.dtype),
        averaged_gradient,
        orthogonal,
    )
    return _common.cast_like(out, updates), orthogonal, state.perturbed_loss

  def update_fn(updates, state, params=None, full_step=None, **extra_args):
    if params is None:
      raise ValueError(f"{name}: update needs params: tx.update(grads, state, params, ...).")
    _common.check_not_masked((updates, params), name)
    _common.check_same_tree(params, updates, name, source="updates")
    _common.check_floating(params, "params", name)
    if full_step is None:
      full_step = state.count % k == 0
    if isinstance(full_step, (bool, np.bool_)):
      if full_step:
        out, orthogonal, loss = full_step_fn(updates, state, params, extra_args)
      else:
        out, orthogonal, loss = cheap_step_fn(updates, state)
    else:
      out, orthogonal, loss = jax.lax.cond(
          jnp.asarray(full_step, bool),
          lambda: full_step_fn(updates, state, params, extra_args),
          lambda: cheap_step_fn(updates, state),
      )
    new_state = LookSAMState(optax.safe_increment(state.count), orthogonal, loss)
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
