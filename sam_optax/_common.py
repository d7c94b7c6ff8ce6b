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
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

ScalarOrSchedule = Union[float, optax.Schedule]
AxisName = Optional[Union[str, Sequence[str]]]

# Keyword arguments that the transformations themselves consume from
# ``tx.update(..., **extra_args)``; they are never forwarded to ``grad_fn``.
RESERVED_EXTRA_ARGS = frozenset({"full_step"})


def is_traced(value: Any) -> bool:
  """True for a tracer (inside ``jit``/``vmap``/``inject_hyperparams``' update)."""
  return isinstance(value, jax.core.Tracer)


def _bare(argument: str) -> str:
  """``"k (the full-step period)"`` -> ``"k"``: an argument described in a message, named bare in ``got k=0``."""
  return argument.split(" (")[0]


def check_flag(value: Any, argument: str, name: str) -> bool:
  """A Python (or numpy) bool: a string such as ``"false"`` or ``None`` would otherwise pass as its truth value."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name}: {argument} must be True or False, got {value!r}.")
  return bool(value)


def as_number(value: Any, argument: str, name: str, expected: str) -> float:
  """``float(value)`` for a real number (not a bool or a string, which ``float`` would also take)."""
  if isinstance(value, (bool, np.bool_, str, bytes)):
    raise TypeError(f"{name}: {argument} must be {expected}, got {value!r}.")
  try:
    return float(value)
  except (TypeError, ValueError) as error:
    raise TypeError(f"{name}: {argument} must be {expected}, got {value!r}.") from error


def check_not_complex(tree: Any, argument: str, name: str) -> None:
  """Refuses complex leaves: for them ``jax.grad`` returns the conjugate of the ascent direction and a
  p-norm over complex entries has more than one meaning, so SAM's formulas would silently be wrong."""
  dtypes = sorted({str(jnp.result_type(leaf)) for leaf in jax.tree.leaves(tree)
                   if jnp.issubdtype(jnp.result_type(leaf), jnp.complexfloating)})
  if dtypes:
    raise TypeError(
        f"{name}: {argument} has complex leaves ({', '.join(dtypes)}); sharpness-aware perturbations are "
        f"defined here for real parameters only. Keep the real and imaginary parts as two real "
        f"parameters (z = re + 1j * im inside the model).")


def check_rho(rho: ScalarOrSchedule, name: str) -> None:
  """Rejects a negative or non-finite ``rho`` (a schedule is checked at 0).

  A traced ``rho`` (``optax.inject_hyperparams``, ``jax.vmap`` over radii)
  cannot be inspected and is accepted as it is.
  """
  if is_traced(rho):
    return
  if callable(rho):
    try:
      value = rho(0)
      value = float(value)
    except Exception:  # pylint: disable=broad-except  # traced-only schedules
      return
  elif (isinstance(rho, numbers.Real) and not isinstance(rho, (bool, np.bool_))) or (
      hasattr(rho, "shape") and getattr(rho, "shape", None) == ()
      and not jnp.issubdtype(getattr(rho, "dtype", float), jnp.bool_)
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


def check_nonnegative(value: Any, argument: str, name: str) -> Any:
  """``float(value)`` after checking it is finite and >= 0; a traced value passes as is."""
  if is_traced(value):
    return value
  value = as_number(value, argument, name, "a number")
  if not math.isfinite(value) or value < 0:
    raise ValueError(f"{name}: {argument} must be finite and >= 0, got {_bare(argument)}={value!r}.")
  return value


def dual_exponent(p: Any, name: str = "dual_vector") -> float:
  """Returns q with 1/p + 1/q = 1, validating that p is in (1, inf]."""
  if is_traced(p):
    raise TypeError(
        f"{name}: p selects the formula of the perturbation and must be a concrete "
        f"number, got a traced value. With optax.inject_hyperparams, list it in "
        f"static_args, e.g. inject_hyperparams({name}, static_args=('grad_fn', 'p'))."
    )
  if isinstance(p, (bool, np.bool_)):
    raise TypeError(f"{name}: p must be a number in (1, inf], got p={p!r}.")
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


def check_static_int(value: Any, argument: str, name: str, *, minimum: int = 1,
                     allow_traced: bool = False) -> Any:
  """An int >= ``minimum`` (concrete integer arrays accepted), or a tracer if allowed."""
  if is_traced(value):
    if allow_traced:
      return value
    raise TypeError(
        f"{name}: {argument} sets array shapes and must be a Python int, got a traced "
        f"value. With optax.inject_hyperparams, list '{argument}' in static_args."
    )
  if isinstance(value, bool) or not (
      isinstance(value, (int, np.integer))
      or (hasattr(value, "dtype") and jnp.issubdtype(value.dtype, jnp.integer)
          and jnp.ndim(value) == 0)
  ):
    raise ValueError(f"{name}: {argument} must be an int >= {minimum}, got {value!r}.")
  if int(value) < minimum:
    raise ValueError(f"{name}: {argument} must be an int >= {minimum}, got {_bare(argument)}={int(value)!r}.")
  return int(value)


def check_unit_interval(value: Any, argument: str, name: str) -> Any:
  """``float(value)`` in [0, 1); a traced value passes as is."""
  if is_traced(value):
    return value
  value = as_number(value, argument, name, "a number in [0, 1)")
  if not 0.0 <= value < 1.0:
    raise ValueError(f"{name}: {argument} must be in [0, 1), got {_bare(argument)}={value!r}.")
  return value


def evaluate_rho(rho: ScalarOrSchedule, count: jax.Array) -> jax.Array:
  return jnp.asarray(rho(count) if callable(rho) else rho)


def check_not_masked(tree: Any, name: str) -> None:
  """Rejects ``optax.masked``/``multi_transform`` placeholders with a pointer to ``mask=``."""
  nodes = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  if any(isinstance(node, optax.MaskedNode) for node in nodes):
    raise TypeError(
        f"{name}: got optax.MaskedNode leaves: the perturbation is inside optax.masked "
        f"or optax.multi_transform, which hide the masked-out params from grad_fn. The "
        f"second pass needs every parameter: keep {name} first in the chain, outside "
        f"any mask, and select the perturbed leaves with its own mask= argument "
        f"(wrap only the optimizer that follows in optax.masked)."
    )


def axis_mean(tree: Any, axis_name: AxisName) -> Any:
  """``lax.pmean`` over ``axis_name``; the identity when it is ``None``."""
  if axis_name is None:
    return tree
  return jax.lax.pmean(tree, axis_name)


def _is_bool_leaf(leaf: Any) -> bool:
  return isinstance(leaf, (bool, np.bool_)) or (
      hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.bool_))


def check_mask(mask: Any, name: str) -> None:
  """``None``, a callable of params, or a pytree whose leaves are all booleans."""
  if mask is None or callable(mask):
    return
  for path, leaf in jax.tree_util.tree_leaves_with_path(mask):
    if not _is_bool_leaf(leaf):
      raise TypeError(
          f"{name}: mask must be None, a callable of params, or a pytree of booleans "
          f"like params; got {leaf!r} at mask{jax.tree_util.keystr(path)}.")


def check_axis_name(axis_name: Any, name: str) -> None:
  """``None`` or a hashable axis name (a tuple for several axes)."""
  try:
    hash(axis_name)
  except TypeError as error:
    raise TypeError(
        f"{name}: axis_name must be None, an axis name such as 'batch', or a tuple of "
        f"names; got the unhashable {axis_name!r}.") from error
  if isinstance(axis_name, (bool, np.bool_)):
    raise TypeError(
        f"{name}: axis_name must be None, an axis name such as 'batch', or a tuple of "
        f"names; got {axis_name!r}.")


def check_floating(tree: Any, argument: str, name: str) -> None:
  """Refuses integer/boolean leaves: there is no gradient (float0) to perturb them along."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
          f"{name}: {argument} has a leaf of dtype {dtype} at {jax.tree_util.keystr(path)}; only "
          f"floating parameters can be perturbed. Keep integer values (counters, "
          f"indices) out of the params the optimizer sees, e.g. in a separate collection.")


def resolve_mask(mask: Any, params: Any) -> Any:
  """Returns a pytree of booleans (or ``None``) from a mask or a mask function."""
  if mask is None:
    return None
  mask_tree = mask(params) if callable(mask) else mask
  check_mask(mask_tree, "perturbation")
  return mask_tree


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

  def __init__(self, grad_fn: Callable[..., Any], name: str = "grad_fn"):
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
      if (parameter.kind == inspect.Parameter.POSITIONAL_ONLY
          and parameter.default is inspect.Parameter.empty):
        raise TypeError(
            f"{name}: grad_fn's parameter {parameter.name!r} is positional-only, but "
            f"tx.update passes the batch arguments to grad_fn by keyword; drop the '/' "
            f"or wrap it, e.g. lambda params, {parameter.name}: "
            f"grad_fn(params, {parameter.name}).")
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


class GradCaller(NamedTuple):
  """How a transformation calls the user's ``grad_fn``.

  ``select(extra_args)`` picks the keyword arguments ``grad_fn`` accepts (and
  raises ``TypeError`` naming a required one that is missing);
  ``call(params, kwargs)`` returns ``(value, gradient)``, with ``value`` the
  loss when ``grad_fn`` is a value-and-grad function and ``None`` otherwise.
  """

  select: Callable[[Mapping[str, Any]], dict]
  call: Callable[[Any, Mapping[str, Any]], "tuple[Any, Any]"]


def make_grad_caller(
    grad_fn: Callable[..., Any], name: str, value_and_grad: bool = False
) -> GradCaller:
  """Wraps ``grad_fn`` so it is called with the extra arguments it accepts.

  ``optax.chain`` passes every extra keyword argument of ``tx.update`` to
  every member, so the wrapper forwards to ``grad_fn`` only the keywords its
  signature names (all of them if it takes ``**kwargs``), raises a
  ``TypeError`` naming any required argument that was not passed, and checks
  that the returned gradient has the tree structure and shapes of ``params``
  (and, with ``value_and_grad``, that a scalar loss comes first).
  """
  check_callable(grad_fn, name)
  value_and_grad = check_flag(value_and_grad, "value_and_grad", name)
  signature = _GradFnSignature(grad_fn, name)

  def select(extra_args: Mapping[str, Any]) -> dict:
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
    return kwargs

  def call(params: Any, kwargs: Mapping[str, Any]) -> "tuple[Any, Any]":
    out = grad_fn(params, **kwargs)
    if not value_and_grad:
      check_same_tree(params, out, name)
      return None, out
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
      raise TypeError(
          f"{name}: value_and_grad=True, so grad_fn must return (loss, gradient) like "
          f"jax.value_and_grad(loss_fn); got {type(out).__name__}."
      )
    value, gradient = out
    if jnp.shape(value) != ():
      raise TypeError(
          f"{name}: value_and_grad=True, so grad_fn must return (loss, gradient) with a "
          f"scalar loss first; got a first element of shape {jnp.shape(value)}. For "
          f"jax.value_and_grad(loss_fn, has_aux=True) drop the aux output in a wrapper."
      )
    check_same_tree(params, gradient, name)
    return value, gradient

  return GradCaller(select, call)


def check_same_tree(params: Any, gradient: Any, name: str, source: str = "grad_fn") -> None:
  """``gradient`` has the tree structure and leaf shapes of ``params``.

  ``source`` names where ``gradient`` came from: ``"grad_fn"`` (its output) or
  ``"updates"`` (the incoming updates, ``tx.update``'s first argument).
  """
  if source == "updates":
    what, got = "the incoming updates (tx.update's first argument) must have", "updates:"
  else:
    what, got = "grad_fn must return a gradient with", "grad_fn returned:"
  params_structure = jax.tree.structure(params)
  gradient_structure = jax.tree.structure(gradient)
  if params_structure != gradient_structure:
    raise TypeError(
        f"{name}: {what} the same tree structure as params.\n"
        f"  params: {params_structure}\n  {got} {gradient_structure}"
    )
  for path_and_leaf, g in zip(
      jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(gradient)
  ):
    path, w = path_and_leaf
    if jnp.shape(w) != jnp.shape(g):
      raise TypeError(
          f"{name}: {'the incoming updates have' if source == 'updates' else 'grad_fn returned'} "
          f"a leaf of shape {jnp.shape(g)} at "
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


def tree_all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def tree_any_nonzero(tree: Any) -> jax.Array:
  leaves = [jnp.any(x != 0) for x in jax.tree.leaves(tree)]
  return jnp.any(jnp.stack(leaves)) if leaves else jnp.asarray(False)


def keep_if_finite(new: Any, old: Any, checked: Any) -> Any:
  """``new`` where every leaf of ``checked`` is finite, else ``old`` (state buffers).

  A NaN gradient must not poison a running statistic for ever: with
  ``optax.apply_if_finite`` after the perturbation the step is skipped, and
  the perturbation's own state must be left as it was too.
  """
  finite = tree_all_finite(checked)
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
