"""Private helpers shared by the perturbation transformations.

Everything here is plumbing that every ``*_perturb`` transformation needs in
exactly the same way: argument validation with messages that name the
argument, forwarding of ``optax.chain``'s extra keyword arguments to the
user's ``grad_fn``, checking what ``grad_fn`` returns, evaluating ``rho`` (a
float or an optax schedule) and averaging over a device axis.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

ScalarOrSchedule = Union[float, optax.Schedule]
AxisName = Optional[Union[str, Sequence[str]]]

# Keyword arguments that the transformations themselves consume from
# ``tx.update(..., **extra_args)``; they are never forwarded to ``grad_fn``.
RESERVED_EXTRA_ARGS = frozenset({"full_step"})


def check_rho(rho: ScalarOrSchedule, name: str) -> None:
  """Rejects a negative or non-finite ``rho`` (a schedule is checked at 0)."""
  if callable(rho):
    try:
      value = rho(0)
      value = float(value)
    except Exception:  # pylint: disable=broad-except  # traced-only schedules
      return
  elif isinstance(rho, numbers.Real) or (
      hasattr(rho, "shape") and getattr(rho, "shape", None) == ()
  ):
    value = float(rho)
  else:
    raise TypeError(
        f"{name}: rho must be a non-negative float or an optax schedule "
        f"(a callable of the step count), got {type(rho).__name__}."
    )
  if not math.isfinite(value) or value < 0:
    raise ValueError(
        f"{name}: rho must be a finite non-negative number, got rho={value!r}"
        + (" (schedule evaluated at step 0)." if callable(rho) else ".")
    )


def check_nonnegative(value: Any, argument: str, name: str) -> float:
  try:
    value = float(value)
  except (TypeError, ValueError) as error:
    raise TypeError(f"{name}: {argument} must be a number, got {value!r}.") from error
  if not math.isfinite(value) or value < 0:
    raise ValueError(f"{name}: {argument} must be finite and >= 0, got {argument}={value!r}.")
  return value


def dual_exponent(p: Any, name: str = "dual_vector") -> float:
  """Returns q with 1/p + 1/q = 1, validating that p is in (1, inf]."""
  if isinstance(p, str):
    if p.lower() in ("inf", "infinity"):
      p = math.inf
    else:
      raise ValueError(f"{name}: p must be a number in (1, inf], got p={p!r}.")
  try:
    p = float(p)
  except (TypeError, ValueError) as error:
    raise TypeError(f"{name}: p must be a number in (1, inf], got p={p!r}.") from error
  if math.isnan(p) or p <= 1:
    raise ValueError(
        f"{name}: p must be in (1, inf] (the dual norm exponent q = p/(p-1) "
        f"must be finite), got p={p!r}."
    )
  return 1.0 if math.isinf(p) else p / (p - 1.0)


def evaluate_rho(rho: ScalarOrSchedule, count: jax.Array) -> jax.Array:
  return rho(count) if callable(rho) else jnp.asarray(rho, jnp.float32)


def axis_mean(tree: Any, axis_name: AxisName) -> Any:
  """``lax.pmean`` over ``axis_name``; the identity when it is ``None``."""
  if axis_name is None:
    return tree
  return jax.lax.pmean(tree, axis_name)


def resolve_mask(mask: Any, params: Any) -> Any:
  """Returns a pytree of booleans (or ``None``) from a mask or a mask function."""
  if mask is None:
    return None
  return mask(params) if callable(mask) else mask


def apply_mask(tree: Any, mask_tree: Any, name: str) -> Any:
  """Zeroes the leaves of ``tree`` whose mask entry is False."""
  if mask_tree is None:
    return tree
  tree_structure = jax.tree.structure(tree)
  mask_structure = jax.tree.structure(mask_tree)
  if tree_structure != mask_structure:
    raise ValueError(
        f"{name}: mask must have the same tree structure as params.\n"
        f"  params: {tree_structure}\n  mask:   {mask_structure}"
    )
  return jax.tree.map(
      lambda leaf, keep: jnp.where(keep, leaf, jnp.zeros_like(leaf)), tree, mask_tree
  )


def tree_add(params: Any, perturbation: Any) -> Any:
  """``params + perturbation`` leaf-wise, keeping each parameter's dtype."""
  return jax.tree.map(
      lambda w, e: (w + e.astype(w.dtype)).astype(w.dtype) if hasattr(w, "dtype") else w + e,
      params,
      perturbation,
  )


def check_callable(fn: Any, name: str) -> None:
  if not callable(fn):
    raise TypeError(
        f"{name}: grad_fn must be a callable grad_fn(params, **batch_args) -> "
        f"gradient pytree, got {type(fn).__name__}: {fn!r}."
    )


class _GradFnSignature:
  """What ``grad_fn`` accepts besides its first (params) argument."""

  def __init__(self, grad_fn: Callable[..., Any]):
    self.accepts_all = False
    self.accepted: frozenset[str] = frozenset()
    self.required: tuple[str, ...] = ()
    try:
      signature = inspect.signature(grad_fn)
    except (TypeError, ValueError):  # builtins, some C callables: forward all
      self.accepts_all = True
      return
    parameters = list(signature.parameters.values())
    positional_kinds = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )
    # The first positional parameter receives the (perturbed) params.
    if parameters and parameters[0].kind in positional_kinds:
      parameters = parameters[1:]
    accepted, required = [], []
    for parameter in parameters:
      if parameter.kind == inspect.Parameter.VAR_KEYWORD:
        self.accepts_all = True
      elif parameter.kind in (
          inspect.Parameter.POSITIONAL_OR_KEYWORD,
          inspect.Parameter.KEYWORD_ONLY,
      ):
        accepted.append(parameter.name)
        if parameter.default is inspect.Parameter.empty:
          required.append(parameter.name)
    self.accepted = frozenset(accepted)
    self.required = tuple(required)


def make_grad_caller(
    grad_fn: Callable[..., Any], name: str
) -> Callable[[Any, Mapping[str, Any]], Any]:
  """Wraps ``grad_fn`` so it is called with the extra arguments it accepts.

  ``optax.chain`` passes every extra keyword argument of ``tx.update`` to
  every member, so the wrapper forwards to ``grad_fn`` only the keywords its
  signature names (all of them if it takes ``**kwargs``), raises a
  ``TypeError`` naming any required argument that was not passed, and checks
  that the returned gradient has the tree structure and shapes of ``params``.
  """
  check_callable(grad_fn, name)
  signature = _GradFnSignature(grad_fn)

  def call(params: Any, extra_args: Mapping[str, Any]) -> Any:
    extra_args = {k: v for k, v in extra_args.items() if k not in RESERVED_EXTRA_ARGS}
    if signature.accepts_all:
      kwargs = dict(extra_args)
    else:
      kwargs = {k: v for k, v in extra_args.items() if k in signature.accepted}
    missing = [arg for arg in signature.required if arg not in kwargs]
    if missing:
      given = sorted(extra_args) or "none"
      raise TypeError(
          f"{name}: grad_fn requires the argument(s) {missing} but tx.update(...) "
          f"was not given them (extra arguments given: {given}). Pass them as "
          f"keywords, e.g. tx.update(grads, opt_state, params, {missing[0]}=...)."
      )
    gradient = grad_fn(params, **kwargs)
    check_same_tree(params, gradient, name)
    return gradient

  return call


def check_same_tree(params: Any, gradient: Any, name: str) -> None:
  params_structure = jax.tree.structure(params)
  gradient_structure = jax.tree.structure(gradient)
  if params_structure != gradient_structure:
    raise TypeError(
        f"{name}: grad_fn must return a gradient with the same tree structure "
        f"as params.\n  params:          {params_structure}\n"
        f"  grad_fn returned: {gradient_structure}"
    )
  for path_and_leaf, g in zip(
      jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(gradient)
  ):
    path, w = path_and_leaf
    if jnp.shape(w) != jnp.shape(g):
      raise TypeError(
          f"{name}: grad_fn returned a leaf of shape {jnp.shape(g)} at "
          f"{jax.tree_util.keystr(path)}, where params has shape {jnp.shape(w)}."
      )


def compute_dtype(dtype: Any) -> Any:
  """float32 for low-precision floats, the dtype itself for wider ones."""
  return jnp.promote_types(dtype, jnp.float32)


def zeros_in_compute_dtype(params: Any) -> Any:
  """Zeros like ``params``, float32 for low-precision leaves (optimizer-state buffers)."""
  return jax.tree.map(lambda w: jnp.zeros(jnp.shape(w), compute_dtype(jnp.asarray(w).dtype)), params)


def tree_vdot(a: Any, b: Any) -> jax.Array:
  """<a, b> over whole pytrees, accumulated in float32 (or wider)."""
  products = [
      jnp.vdot(
          x.astype(compute_dtype(x.dtype)).ravel(), y.astype(compute_dtype(y.dtype)).ravel()
      )
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  ]
  return sum(products) if products else jnp.zeros([], jnp.float32)


def safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """numerator / denominator, and 0 where the denominator is 0."""
  safe = jnp.where(denominator == 0, 1.0, denominator)
  return jnp.where(denominator == 0, 0.0, numerator / safe)


def orthogonal_component(vector: Any, reference: Any) -> Any:
  """``vector - (<vector, reference> / ||reference||^2) reference`` (float32 math).

  The part of ``vector`` orthogonal to ``reference``; ``vector`` itself when
  ``reference`` is zero.
  """
  coefficient = safe_divide(tree_vdot(vector, reference), tree_vdot(reference, reference))
  return jax.tree.map(
      lambda v, r: v.astype(compute_dtype(v.dtype))
      - coefficient * r.astype(compute_dtype(r.dtype)),
      vector,
      reference,
  )


def cast_like(tree: Any, reference: Any) -> Any:
  return jax.tree.map(lambda x, r: x.astype(jnp.asarray(r).dtype), tree, reference)
