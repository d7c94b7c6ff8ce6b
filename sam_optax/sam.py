"""SAM and ASAM as the first member of an ``optax.chain``."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from sam_optax import _common
from sam_optax._second_pass import make_second_pass


class SAMState(NamedTuple):
  """State of :func:`sam_perturb` (and :func:`gsam_perturb`).

  Attributes:
    count: the step count (drives a ``rho`` schedule).
    perturbed_loss: ``L(w + eps)`` of the last step (float32 scalar), with
      ``value_and_grad=True``; 0 otherwise. Read it with
      ``optax.tree_utils.tree_get(opt_state, "perturbed_loss")``.
  """

  count: jax.Array
  perturbed_loss: jax.Array


def sam_perturb(
    grad_fn: Callable[..., Any],
    rho: _common.ScalarOrSchedule = 0.05,
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
  r"""Sharpness-Aware Minimization (SAM) and its adaptive form (ASAM).

  Put it first in an ``optax.chain``. Its ``update`` receives the gradient
  ``g = grad L(w)`` at the current weights, computes the adversarial
  perturbation, evaluates ``grad_fn`` at the perturbed weights and hands that
  gradient to the rest of the chain::

      eps   = rho * sign(g) |g|^(q-1) / (||g||_q^(q-1) + eps),  1/p + 1/q = 1
      (ASAM: eps = rho * |w| dual(|w| g), i.e. rho * w^2 g / (||w g||_2 + eps) for p=2)
      out   = grad_fn(w + eps, **batch_args)

  so ``optax.chain(sam_perturb(...), optax.sgd(lr))`` performs
  ``w <- w - lr * grad L(w + eps(w))`` (Foret et al., 2021, Algorithm 1).
  There is exactly one ``update`` call per training step, and both passes live
  in the caller's ``jax.jit``.

  Extra keyword arguments of ``tx.update(grads, state, params, **extra_args)``
  are forwarded to ``grad_fn`` when its signature names them (all of them if
  it takes ``**kwargs``); a required one that is missing raises ``TypeError``.

  Multi-device (inside ``jax.pmap`` / ``jax.shard_map``): with ``axis_name``
  set, ``eps`` is computed from the device-local gradient (m-sharpness, with m
  the per-device batch size; Foret et al. section 4.1) and the perturbed
  gradient is averaged over the axis with ``lax.pmean`` so that every device
  applies the same update. ``sync_perturbation=True`` averages the incoming
  gradient first (one global ``eps``). Under plain ``jax.jit`` with sharded
  arrays leave ``axis_name=None``: the computation is global.

  Args:
    grad_fn: ``grad_fn(params, **batch_args) -> gradient`` with the tree
      structure of ``params``; typically ``jax.grad(loss_fn)``.
    rho: the neighbourhood radius, a float >= 0 or an optax schedule of the
      step count. Default 0.05 (SAM paper, CIFAR-10); ASAM uses ~10x larger.
    p: the neighbourhood norm, in (1, inf]. Default 2.
    adaptive: ASAM (Kwon et al., 2021). Default False.
    eps: added to the gradient norm. Default 1e-12.
    axis_name: the device axis name under ``pmap``/``shard_map``, or None.
    sync_perturbation: average the gradient over ``axis_name`` before
      computing ``eps``. Default False (m-sharpness).
    mask: optional pytree of booleans like ``params`` or a callable of
      ``params`` returning one; only the selected leaves are perturbed and the
      norm is taken over them only.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` requires
    ``params``.

  Example::

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> def loss_fn(params, batch):
      ...   return jnp.mean((batch['x'] @ params['w'] - batch['y']) ** 2)
      >>> grad_fn = jax.grad(loss_fn)
      >>> tx = optax.chain(sam_optax.sam_perturb(grad_fn, rho=0.05), optax.sgd(0.1))
      >>> params = {'w': jnp.zeros(3)}
      >>> batch = {'x': jnp.eye(3), 'y': jnp.ones(3)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update(grad_fn(params, batch), state, params, batch=batch)

  References:
    Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
    Generalization", ICLR 2021. Kwon et al., "ASAM: Adaptive Sharpness-Aware
    Minimization for Scale-Invariant Learning of Deep Neural Networks", ICML 2021.
  """
  second_pass = make_second_pass(
      grad_fn, "sam_perturb", rho=rho, p=p, adaptive=adaptive, eps=eps, mask=mask,
      axis_name=axis_name, sync_perturbation=sync_perturbation,
      value_and_grad=value_and_grad, group_size=group_size, batch_argnames=batch_argnames)

  def init_fn(params):
    del params
    return SAMState(count=jnp.zeros([], jnp.int32), perturbed_loss=jnp.zeros([], jnp.float32))

  def update_fn(updates, state, params=None, **extra_args):
    result = second_pass(updates, params, state.count, extra_args, lambda g: g)
    perturbed_loss = state.perturbed_loss if result.loss is None else result.loss
    return result.gradient, SAMState(optax.safe_increment(state.count), perturbed_loss)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
