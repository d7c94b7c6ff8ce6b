"""The second pass every perturbation transformation shares.

``eps = perturbation(direction)``; ``g_p = grad_fn(w + eps, **accepted_args)``;
``g_p`` averaged over ``axis_name`` — with the validation of the arguments
that define it, done once at construction time.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax

from sam_optax import _common
from sam_optax.perturbation import perturbation


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
) -> Callable[[Any, Any, jax.Array, Mapping[str, Any]], Any]:
  """Validates the arguments and returns ``second_pass(direction, params, count, extra_args)``.

  ``second_pass`` perturbs ``params`` along ``direction`` with radius
  ``rho(count)`` and returns the axis-averaged gradient there.
  """
  _common.check_rho(rho, name)
  _common.dual_exponent(p, name)
  _common.check_nonnegative(eps, "eps", name)
  call_grad_fn = _common.make_grad_caller(grad_fn, name)

  def second_pass(direction, params, count, extra_args):
    if params is None:
      raise ValueError(f"{name}: update needs params: tx.update(grads, state, params, ...).")
    weight_perturbation = perturbation(
        direction,
        _common.evaluate_rho(rho, count),
        p,
        params=params,
        adaptive=adaptive,
        eps=eps,
        mask=mask,
    )
    perturbed_gradient = call_grad_fn(_common.tree_add(params, weight_perturbation), extra_args)
    return _common.axis_mean(perturbed_gradient, axis_name)

  return second_pass
