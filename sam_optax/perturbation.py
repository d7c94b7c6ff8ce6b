"""The adversarial weight perturbation of SAM and ASAM, as pure functions.

SAM (Foret et al., 2021) approximates the inner maximisation
``max_{||eps||_p <= rho} L(w + eps)`` by its first-order Taylor expansion, whose
solution is the dual-norm vector of the gradient ``g``::

    eps(w) = rho * sign(g) * |g|^(q-1) / ||g||_q^(q-1),      1/p + 1/q = 1.

For ``p = 2`` this is ``rho * g / ||g||_2``; for ``p = inf`` it is
``rho * sign(g)``. The norm is taken over the whole pytree.

ASAM (Kwon et al., 2021) makes the neighbourhood scale-invariant with the
normalisation operator ``T_w = |w|``::

    eps(w) = rho * T_w * dual(T_w * g),   for p = 2:  rho * w^2 * g / ||w * g||_2.

All norms are computed in float32 whatever the leaves' dtype (in float64 when
x64 is enabled and a leaf is float64), with
the gradient first divided by its largest magnitude so that huge gradients do
not overflow; a zero gradient gives a zero perturbation, never NaN.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sam_optax import _common


def _widest_dtype(leaves: list[jax.Array]) -> Any:
  """The widest of the leaves' compute dtypes: float32, or float64 under x64."""
  dtype = jnp.dtype(jnp.float32)
  for leaf in leaves:
    dtype = jnp.promote_types(dtype, _common.compute_dtype(leaf.dtype))
  return dtype


def _tree_max_abs(leaves: list[jax.Array], dtype: Any) -> jax.Array:
  maxima = [jnp.max(jnp.abs(leaf)).astype(dtype) for leaf in leaves if leaf.size > 0]
  if not maxima:
    return jnp.zeros([], dtype)
  return jnp.max(jnp.stack(maxima))


# Exact powers of two by their IEEE bits (``exp2`` rounds; ``jnp.frexp``/``ldexp``
# give operands jax 0.12 cannot place on an Explicit-sharded mesh under vmap).
def _binary_exponent(x: jax.Array) -> jax.Array:
  """``e`` with ``x = m 2^e``, ``0.5 <= m < 1``, for a normal ``x > 0`` (int32; -126 / -1022 for 0)."""
  info = jnp.finfo(x.dtype)
  unsigned = jnp.uint64 if info.bits == 64 else jnp.uint32
  bits = jax.lax.bitcast_convert_type(x, unsigned)
  biased = (bits >> info.nmant) & ((1 << info.nexp) - 1)
  return biased.astype(jnp.int32) - (info.maxexp - 2)


def _power_of_two(k: jax.Array, dtype: Any) -> jax.Array:
  """``2.0 ** k`` exactly, in ``dtype``, for an integer ``k`` in its normal range."""
  info = jnp.finfo(dtype)
  unsigned = jnp.uint64 if info.bits == 64 else jnp.uint32
  biased = (k + (info.maxexp - 1)).astype(unsigned)
  return jax.lax.bitcast_convert_type(biased << info.nmant, dtype)


def dual_vector(gradient: Any, p: float = 2, *, eps: float = 1e-12) -> Any:
  """The unit dual-norm direction of a gradient pytree.

  Computes, over the whole pytree, the vector that maximises ``<g, v>`` on the
  unit ``p``-norm ball::

      dual(g) = sign(g) * |g|^(q-1) / (||g||_q^(q-1) + eps),   1/p + 1/q = 1,

  and ``sign(g)`` for ``p = inf``. ``eps`` is added to the norm as in the
  reference PyTorch implementations (``rho / (grad_norm + 1e-12)``), so a zero
  gradient gives zeros.

  Args:
    gradient: a pytree of arrays.
    p: the norm of the neighbourhood, a number in (1, inf]. Default 2.
    eps: added to ``||g||_q^(q-1)``. Default 1e-12.

  Returns:
    A pytree like ``gradient`` (same dtypes). The math is done in float32 for
    low-precision leaves and cast back; norms are float64 when any leaf is
    float64 (``jax_enable_x64``).

  Example::

      >>> import jax.numpy as jnp, sam_optax
      >>> sam_optax.dual_vector({'w': jnp.array([3.0, 4.0])})['w']
      Array([0.6, 0.8], dtype=float32)
  """
  q = _common.dual_exponent(p, "dual_vector")
  _common.check_nonnegative(eps, "eps", "dual_vector")  # a traced eps (inject_hyperparams) passes unchecked
  _common.check_not_complex(gradient, "gradient", "dual_vector")
  leaves, treedef = jax.tree.flatten(gradient)
  leaves = [jnp.asarray(leaf) for leaf in leaves]
  work = [leaf.astype(_common.compute_dtype(leaf.dtype)) for leaf in leaves]
  if q == 1.0:  # p = inf: sign(g), no norm involved.
    directions = [jnp.sign(leaf) for leaf in work]
  else:
    # Scale by a = 2^e, the power of two just above the largest magnitude:
    # dual(g) = dual(g / a), and the squares of g / a cannot overflow even for
    # |g| ~ 1e38. Two exact multiplications by powers of two (a division by
    # a ~ 1e38 goes through its reciprocal, a flushed denormal, in eager
    # XLA:CPU; jnp.ldexp fails on Explicit-sharded operands in jax 0.12).
    norm_dtype = _widest_dtype(work)
    exponent = _binary_exponent(_tree_max_abs(work, norm_dtype))
    half = exponent // 2
    # In norm_dtype: 2^-half can be outside a float32 leaf's range when a float64
    # leaf sets the scale (x64 trees that mix dtypes).
    first, second = _power_of_two(-half, norm_dtype), _power_of_two(half - exponent, norm_dtype)
    unit = [leaf.astype(norm_dtype) * first * second for leaf in work]
    if q == 2.0:
      norm_power = jnp.sqrt(sum(jnp.sum(jnp.square(u), dtype=norm_dtype) for u in unit))
      numerators = unit
    else:
      norm = sum(jnp.sum(jnp.abs(u) ** q, dtype=norm_dtype) for u in unit) ** (1.0 / q)
      norm_power = norm ** (q - 1.0)
      numerators = [jnp.sign(u) * jnp.abs(u) ** (q - 1.0) for u in unit]
    # ||g||^(q-1) + eps  ==  a^(q-1) * (||g/a||^(q-1) + eps / a^(q-1)).
    eps_term = jnp.exp2(-(q - 1.0) * exponent.astype(norm_dtype))  # a^-(q-1); inf for tiny g
    denominator = norm_power + jnp.where(eps == 0, 0.0, eps * eps_term)
    denominator = jnp.where(denominator > 0, denominator, 1.0)
    directions = [n / denominator.astype(n.dtype) for n in numerators]
  directions = [d.astype(leaf.dtype) for d, leaf in zip(directions, leaves)]
  return jax.tree.unflatten(treedef, directions)


def perturbation(
    gradient: Any,
    rho: float | jax.Array = 0.05,
    p: float = 2,
    *,
    params: Any = None,
    adaptive: bool = False,
    eps: float = 1e-12,
    mask: Any = None,
) -> Any:
  """SAM's (or ASAM's) adversarial weight perturbation ``eps`` for a gradient.

  SAM::      eps = rho * dual(g)                       = rho * g / (||g||_2 + eps)     (p=2)
  ASAM::     eps = rho * |w| * dual(|w| * g)           = rho * w^2 g / (||w g||_2 + eps) (p=2)

  Args:
    gradient: the gradient ``g`` at ``w`` (a pytree).
    rho: the neighbourhood radius (in units of the parameters for SAM; relative
      to ``|w|`` for ASAM). Default 0.05.
    p: the neighbourhood norm, in (1, inf]. Default 2.
    params: the parameters ``w``; required when ``adaptive=True``. The result
      is cast to each parameter's dtype when given.
    adaptive: ASAM's scale-invariant neighbourhood. Default False.
    eps: numerical safety added to the norm. Default 1e-12.
    mask: optional pytree of booleans like ``gradient`` (or a callable of
      ``params`` returning one): only selected leaves are perturbed and the norm
      is taken over them only (partial perturbation, e.g. SAM-ON).

  Returns:
    The perturbation pytree, with the structure of ``gradient``.

  Example::

      >>> import jax.numpy as jnp, sam_optax
      >>> g = {'w': jnp.array([3.0, 4.0])}
      >>> sam_optax.perturbation(g, rho=0.5)['w']
      Array([0.3, 0.4], dtype=float32)
  """
  adaptive = _common.check_flag(adaptive, "adaptive", "perturbation")
  # Concrete values only: inside the transformations' jitted update rho and eps are traced and were checked at
  # construction.
  _common.check_nonnegative(rho, "rho", "perturbation")
  _common.check_nonnegative(eps, "eps", "perturbation")
  _common.dual_exponent(p, "perturbation")
  _common.check_not_complex((gradient, params), "gradient or params", "perturbation")
  if adaptive and params is None:
    raise ValueError("perturbation: adaptive=True (ASAM) needs params.")
  rho = jnp.asarray(rho)
  mask_tree = _common.resolve_mask(mask, params if params is not None else gradient)
  gradient = _common.apply_mask(gradient, mask_tree, "perturbation")
  if adaptive:
    scale = jax.tree.map(
        lambda w: jnp.abs(jnp.asarray(w)).astype(_common.compute_dtype(jnp.asarray(w).dtype)),
        params,
    )
    scaled_gradient = jax.tree.map(
        lambda s, g: s * jnp.asarray(g).astype(s.dtype), scale, gradient
    )
    direction = jax.tree.map(
        lambda s, d: s * d, scale, dual_vector(scaled_gradient, p, eps=eps)
    )
  else:
    direction = jax.tree.map(
        lambda g: jnp.asarray(g).astype(_common.compute_dtype(jnp.asarray(g).dtype)),
        gradient,
    )
    direction = dual_vector(direction, p, eps=eps)
  reference = params if params is not None else gradient
  return jax.tree.map(
      lambda d, ref: (rho.astype(d.dtype) * d).astype(jnp.asarray(ref).dtype),
      direction,
      reference,
  )

