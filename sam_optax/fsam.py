"""Friendly-SAM (F-SAM) as the first member of an ``optax.chain``."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from sam_optax import _common
from sam_optax._second_pass import make_second_pass


class FSAMState(NamedTuple):
  """State of :func:`fsam_perturb`.

  Attributes:
    count: number of steps taken.
    gradient_ema: the exponential moving average ``m`` of past gradients, an
      estimate of the full-batch gradient (float32 for low-precision params).
      A step whose gradient is not finite leaves it unchanged.
    perturbed_loss: ``L(w + eps)`` of the last step (float32 scalar) with
      ``value_and_grad=True``; 0 otherwise.
  """

  count: jax.Array
  gradient_ema: Any
  perturbed_loss: jax.Array


def fsam_perturb(
    grad_fn: Callable[..., Any],
    rho: _common.ScalarOrSchedule = 0.05,
    sigma: float = 1.0,
    lmbda: float = 0.9,
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
  r"""Friendly Sharpness-Aware Minimization (F-SAM).

  F-SAM perturbs along the stochastic-gradient *noise* rather than the full
  gradient: it removes an exponential moving average of past gradients (an
  estimate of the full gradient) from the minibatch gradient before taking the
  SAM perturbation. Computed exactly as the official implementation
  (nblt/F-SAM, ``FriendlySAM.first_step``)::

      step 0:   d_0 = g_0,                      m_0 = g_0
      step t:   d_t = g_t - sigma * m_{t-1},    m_t = lmbda * m_{t-1} + (1 - lmbda) * g_t
      eps_t  = rho * dual(d_t)                 (ASAM: rho * |w| dual(|w| d_t))
      out_t  = grad_fn(w_t + eps_t, **batch_args)

  where ``dual`` is the p-norm dual vector of :func:`sam_optax.dual_vector`.
  Note the perturbation uses the EMA *before* this step's update. "Step 0"
  is the first step that records a gradient: a non-finite step leaves the EMA
  as it was, and while it is still all zeros the next finite gradient starts
  it (``m = g``), as the reference's lazily created momentum buffer does
  when mixed precision skips the first steps.

  Multi-device: with ``axis_name``, ``d_t`` uses the device-local gradient
  (m-sharpness; the axis-averaged one with ``sync_perturbation=True``), the EMA
  is updated with the axis-averaged gradient so the state is identical on every
  device, and the perturbed gradient is averaged before it goes down the chain.

  Args:
    grad_fn: ``grad_fn(params, **batch_args) -> gradient`` (tree of params).
    rho: the neighbourhood radius, float >= 0 or an optax schedule. Default 0.05.
    sigma: how much of the EMA to remove, >= 0. Default 1.0 (the paper's).
    lmbda: the EMA decay, in [0, 1). Default 0.9 (the paper's CIFAR setting;
      the authors use 0.6-0.95 depending on the task).
    p: the neighbourhood norm, in (1, inf]. Default 2.
    adaptive: ASAM-style scale-invariant neighbourhood. Default False.
    eps: added to the norm. Default 1e-12.
    axis_name: the device axis name under ``pmap``/``shard_map``, or None.
    sync_perturbation: use the axis-averaged gradient for ``d_t``.
    mask: optional pytree of booleans like ``params`` (or a callable of params):
      only selected leaves are perturbed; the norm is over them only.
    value_and_grad, group_size, batch_argnames: as in
      :func:`sam_optax.sam_perturb`. With ``group_size``, group ``i`` uses
      ``d_i = g_i - sigma * m_{t-1}`` and the EMA takes the mean of the ``g_i``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is
    :class:`FSAMState`; its ``update`` requires ``params``.

  Example::

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda params, batch: jnp.sum((params['w'] - batch) ** 2)
      >>> grad_fn = jax.grad(loss_fn)
      >>> tx = optax.chain(sam_optax.fsam_perturb(grad_fn, rho=0.1), optax.sgd(0.1))
      >>> params = {'w': jnp.ones(2)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update(grad_fn(params, jnp.zeros(2)), state, params,
      ...                            batch=jnp.zeros(2))

  Reference:
    Li, Zhou, He, Cheng, Huang, "Friendly Sharpness-Aware Minimization",
    CVPR 2024.
  """
  name = "fsam_perturb"
  second_pass = make_second_pass(
      grad_fn, name, rho=rho, p=p, adaptive=adaptive, eps=eps, mask=mask,
      axis_name=axis_name, sync_perturbation=sync_perturbation,
      value_and_grad=value_and_grad, group_size=group_size, batch_argnames=batch_argnames)
  sigma = _common.check_nonnegative(sigma, "sigma", name)
  lmbda = _common.check_unit_interval(lmbda, "lmbda (the EMA decay)", name)

  def init_fn(params):
    return FSAMState(count=jnp.zeros([], jnp.int32),
                     gradient_ema=_common.zeros_in_compute_dtype(params),
                     perturbed_loss=jnp.zeros([], jnp.float32))

  def update_fn(updates, state, params=None, **extra_args):
    # The EMA starts at zero, so d_0 = g_0 - sigma * 0 = g_0 as in the reference.
    def direction_fn(gradient):
      return jax.tree.map(lambda g, m: g.astype(m.dtype) - sigma * m, gradient,
                          state.gradient_ema)

    result = second_pass(updates, params, state.count, extra_args, direction_fn)
    # m = g on the first step that records one (the EMA is still all zeros:
    # the first step, or every earlier step was non-finite and left it
    # alone), then the EMA with decay lmbda.
    recorded = _common.tree_any_nonzero(state.gradient_ema)
    decay = jnp.where(recorded, lmbda, 0.0).astype(jnp.float32)
    gradient_ema = jax.tree.map(
        lambda m, g: (decay * m + (1.0 - decay) * g.astype(m.dtype)).astype(m.dtype),
        state.gradient_ema,
        result.gradient_at_w,
    )
    gradient_ema = _common.keep_if_finite(gradient_ema, state.gradient_ema, result.gradient_at_w)
    perturbed_loss = state.perturbed_loss if result.loss is None else result.loss
    new_state = FSAMState(optax.safe_increment(state.count), gradient_ema, perturbed_loss)
    return result.gradient, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
