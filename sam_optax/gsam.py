"""Surrogate-gap guided SAM (GSAM) as the first member of an ``optax.chain``."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from sam_optax import _common
from sam_optax._second_pass import make_second_pass
from sam_optax.sam import SAMState


def gsam_perturb(
    grad_fn: Callable[..., Any],
    rho: _common.ScalarOrSchedule = 0.05,
    alpha: float = 0.1,
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
  r"""Surrogate Gap Guided Sharpness-Aware Minimization (GSAM).

  GSAM minimises the perturbed loss ``f_p(w) = f(w + eps)`` as SAM does and,
  at the same time, the surrogate gap ``h(w) = f_p(w) - f(w)``, without
  increasing ``f_p``: it removes from the update a multiple of the part of the
  plain gradient ``g`` that is orthogonal to the perturbed gradient ``g_p``::

      eps     = rho * dual(g)                      (as in sam_perturb)
      g_p     = grad_fn(w + eps)
      g_par   = (<g, g_p> / ||g_p||^2) g_p,    g_perp = g - g_par
      out     = g_p - alpha * g_perp

  The paper ties ``rho`` to the learning rate,
  ``rho_t = rho_min + (rho_max - rho_min) (lr_t - lr_min) / (lr_max - lr_min)``;
  build such a schedule with :func:`sam_optax.rho_schedule_from_learning_rate`
  and pass it as ``rho``.

  Multi-device (``axis_name``): ``eps`` from the device-local gradient
  (m-sharpness; global with ``sync_perturbation=True``); ``g`` and ``g_p`` are
  averaged over the axis before the decomposition, so every device returns the
  same update.

  Args:
    grad_fn: ``grad_fn(params, **batch_args) -> gradient`` (tree of params).
    rho: radius, float >= 0 or an optax schedule of the step count. Default 0.05.
    alpha: weight of the surrogate-gap descent, >= 0. Default 0.1 (the paper
      uses 0.01-0.3 on ImageNet; ``alpha=0`` is SAM).
    p, adaptive, eps, axis_name, sync_perturbation, mask, value_and_grad,
      group_size, batch_argnames: as in
      :func:`sam_optax.sam_perturb`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (state :class:`SAMState`).

  Example::

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> lr = optax.cosine_decay_schedule(0.1, 1000)
      >>> rho = sam_optax.rho_schedule_from_learning_rate(lr, rho_max=0.1, rho_min=0.01,
      ...                                                 lr_max=0.1, lr_min=0.0)
      >>> grad_fn = jax.grad(lambda params, batch: jnp.sum((params - batch) ** 2))
      >>> tx = optax.chain(sam_optax.gsam_perturb(grad_fn, rho=rho, alpha=0.1), optax.sgd(lr))

  Reference:
    Zhuang et al., "Surrogate Gap Minimization Improves Sharpness-Aware
    Training", ICLR 2022 (the method is named Surrogate Gap Guided
    Sharpness-Aware Minimization, GSAM).
  """
  name = "gsam_perturb"
  second_pass = make_second_pass(
      grad_fn, name, rho=rho, p=p, adaptive=adaptive, eps=eps, mask=mask,
      axis_name=axis_name, sync_perturbation=sync_perturbation,
      value_and_grad=value_and_grad, group_size=group_size, batch_argnames=batch_argnames)
  alpha = _common.check_nonnegative(alpha, "alpha", name)

  def init_fn(params):
    del params
    return SAMState(count=jnp.zeros([], jnp.int32), perturbed_loss=jnp.zeros([], jnp.float32))

  def update_fn(updates, state, params=None, **extra_args):
    result = second_pass(updates, params, state.count, extra_args, lambda g: g)
    orthogonal = _common.orthogonal_component(result.gradient_at_w, result.gradient)
    out = jax.tree.map(
        lambda gp, g_perp: (gp.astype(g_perp.dtype) - alpha * g_perp).astype(gp.dtype),
        result.gradient,
        orthogonal,
    )
    perturbed_loss = state.perturbed_loss if result.loss is None else result.loss
    return out, SAMState(optax.safe_increment(state.count), perturbed_loss)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _finite(value: Any, argument: str) -> float:
  value = _common.as_number(value, argument, "rho_schedule_from_learning_rate", "a number")
  if not math.isfinite(value):
    raise ValueError(f"rho_schedule_from_learning_rate: {argument} must be finite, got {value!r}.")
  return value


def rho_schedule_from_learning_rate(
    learning_rate: optax.ScalarOrSchedule,
    rho_max: float,
    rho_min: float = 0.0,
    *,
    lr_max: float | None = None,
    lr_min: float | None = None,
) -> optax.Schedule:
  r"""GSAM's radius schedule, proportional to the learning rate.

  ``rho_t = rho_min + (rho_max - rho_min) * (lr_t - lr_min) / (lr_max - lr_min)``

  Args:
    learning_rate: the optimizer's learning-rate schedule (or a constant).
    rho_max: the radius at ``lr_max``.
    rho_min: the radius at ``lr_min``. Default 0.
    lr_max: the largest learning rate; default ``learning_rate(0)``.
    lr_min: the smallest learning rate; default 0.

  Returns:
    An optax schedule of the step count, to pass as ``rho=`` to any
    ``*_perturb`` transformation.

  Example::

      >>> import optax, sam_optax
      >>> lr = optax.linear_schedule(0.1, 0.0, transition_steps=100)
      >>> rho = sam_optax.rho_schedule_from_learning_rate(lr, rho_max=0.05, rho_min=0.01)
      >>> [round(float(rho(t)), 4) for t in (0, 50, 100)]
      [0.05, 0.03, 0.01]

  Reference: Zhuang et al., "Surrogate Gap Minimization Improves
  Sharpness-Aware Training", ICLR 2022 (GSAM), whose experiments schedule
  rho this way.
  """
  name = "rho_schedule_from_learning_rate"
  rho_max = _common.check_nonnegative(rho_max, "rho_max", name)
  rho_min = _common.check_nonnegative(rho_min, "rho_min", name)
  if rho_max < rho_min:
    raise ValueError(
        f"rho_schedule_from_learning_rate: need 0 <= rho_min <= rho_max, got "
        f"rho_min={rho_min!r}, rho_max={rho_max!r}."
    )
  schedule = learning_rate if callable(learning_rate) else (lambda count: learning_rate)
  lr_max = _finite(schedule(0) if lr_max is None else lr_max, "lr_max" if lr_max is not None else
                   "learning_rate(0) (the default lr_max)")
  lr_min = _finite(0.0 if lr_min is None else lr_min, "lr_min")
  if lr_max <= lr_min:
    raise ValueError(
        f"rho_schedule_from_learning_rate: need lr_max > lr_min, got lr_max={lr_max!r}, "
        f"lr_min={lr_min!r}."
    )

  def rho_schedule(count):
    lr = jnp.asarray(schedule(count))
    lr = lr.astype(jnp.promote_types(lr.dtype, jnp.float32))  # float64 stays float64 under x64
    fraction = (lr - lr_min) / (lr_max - lr_min)
    return rho_min + (rho_max - rho_min) * jnp.clip(fraction, 0.0, 1.0)

  return rho_schedule
