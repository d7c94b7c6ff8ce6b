"""Gradient accumulation that is still SAM: a ``grad_fn`` evaluated micro-batch by micro-batch."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from sam_optax import _batch, _common


def microbatched(
    grad_fn: Callable[..., Any],
    num_microbatches: int,
    *,
    batch_argnames: Sequence[str] = ("batch",),
) -> Callable[..., Any]:
  r"""``grad_fn`` on a whole batch, computed one micro-batch at a time.

  The returned function has ``grad_fn``'s signature and returns its result on
  the whole batch, as the mean over ``n = num_microbatches`` equal
  micro-batches::

      out(w, batch) = (1/n) sum_k grad_fn(w, batch_k)

  which equals ``grad_fn(w, batch)`` for a loss that is a mean over examples.
  The micro-batches run in a ``lax.scan``, so activation memory is one
  micro-batch's. Use the *same* wrapped function for both passes: pass 1 in
  your step, pass 2 inside the transformation, so SAM's ``eps`` comes from the
  whole batch's gradient and the update is the whole batch's gradient at
  ``w + eps`` — SAM on the accumulated batch, unlike
  ``optax.MultiSteps`` around a SAM chain (which applies the last
  micro-batch's gradient at a perturbation of the running mean).

  ``grad_fn`` may be a gradient function (``jax.grad``) or a value-and-grad
  function (``jax.value_and_grad``): every floating output leaf is averaged
  (the loss too), accumulated in float32 (float64 under x64) and cast back.
  Micro-batch ``k`` holds the examples ``k, k + n, k + 2n, ...`` of every
  batch argument (a strided split keeps a batch that is sharded over devices
  sharded within each micro-batch); the other arguments (a dropout key,
  BatchNorm statistics) are passed whole to every micro-batch.

  With ``group_size`` on a ``*_perturb`` transformation (m-sharpness), a
  ``microbatched`` ``grad_fn`` makes the grouped second pass work through the
  groups one micro-batch at a time: ``group_size`` must divide the
  micro-batch.

  Args:
    grad_fn: ``grad_fn(params, ..., batch=..., ...)``.
    num_microbatches: ``n >= 1``; must divide the batch size (checked at trace
      time).
    batch_argnames: the arguments whose array leaves carry the examples on
      axis 0. Default ``("batch",)``.

  Returns:
    A function with ``grad_fn``'s signature.

  Example::

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w, batch: jnp.mean((batch['x'] @ w - batch['y']) ** 2)
      >>> grad_fn = sam_optax.microbatched(jax.grad(loss_fn), 4)
      >>> batch = {'x': jnp.ones((8, 3)), 'y': jnp.zeros(8)}
      >>> tx = optax.chain(sam_optax.sam_perturb(grad_fn, rho=0.05), optax.sgd(0.1))
      >>> w = jnp.ones(3)
      >>> updates, state = tx.update(grad_fn(w, batch), tx.init(w), w, batch=batch)
  """
  name = "microbatched"
  _common.check_callable(grad_fn, name)
  num_microbatches = _common.check_static_int(num_microbatches, "num_microbatches", name)
  batch_argnames = _batch.check_batch_argnames(batch_argnames, name)
  try:
    signature = inspect.signature(grad_fn)
  except (TypeError, ValueError):
    signature = None
  var_keyword = None
  named_parameters = frozenset()
  if signature is not None:
    var_keyword = next((n for n, q in signature.parameters.items()
                        if q.kind is q.VAR_KEYWORD), None)
    named_parameters = frozenset(n for n in signature.parameters if n != var_keyword)

  @functools.wraps(grad_fn)
  def accumulated(*args, **kwargs):
    if signature is None:  # a callable without a signature: keyword batch arguments only
      arguments = dict(kwargs)
      rebuild = lambda a: (args, a)
    else:
      # ``**kwargs`` entries are flattened so a batch passed through them is
      # found by name like a named parameter, and put back for the call.
      bound = signature.bind(*args, **kwargs)
      arguments = {k: v for k, v in bound.arguments.items() if k != var_keyword}
      arguments.update(bound.arguments.get(var_keyword, {}) if var_keyword else {})

      def rebuild(a):
        named = {k: v for k, v in a.items() if k in named_parameters}
        extra = {k: v for k, v in a.items() if k not in named_parameters}
        if extra:
          named[var_keyword] = extra
        rebound = inspect.BoundArguments(signature, named)
        return rebound.args, rebound.kwargs

    batched, _ = _batch.partition(arguments, batch_argnames, name)
    size = _batch.batch_size(batched, name)
    if size % num_microbatches:
      raise ValueError(
          f"{name}: num_microbatches={num_microbatches} must divide the batch size, "
          f"got a batch of {size}."
      )

    def one(chunk):
      call_args, call_kwargs = rebuild({**arguments, **chunk})
      return grad_fn(*call_args, **call_kwargs)

    if num_microbatches == 1:
      return one(batched)
    chunks = _batch.strided_chunks(batched, num_microbatches)

    out_shape = jax.eval_shape(one, jax.tree.map(lambda x: x[0], chunks))
    accumulate_dtype = jax.tree.map(
        lambda s: _common.compute_dtype(s.dtype)
        if jnp.issubdtype(s.dtype, jnp.inexact) else None, out_shape)
    for path, dtype in jax.tree_util.tree_leaves_with_path(
        accumulate_dtype, is_leaf=lambda x: x is None):
      if dtype is None:
        raise TypeError(
            f"{name}: grad_fn returned a non-floating leaf at {jax.tree_util.keystr(path)}; "
            f"only floating outputs (gradients, losses) can be averaged over micro-batches."
        )

    def body(total, chunk):
      out = one(chunk)
      return jax.tree.map(lambda t, o: t + o.astype(t.dtype), total, out), None

    zeros = jax.tree.map(lambda s, d: jnp.zeros(s.shape, d), out_shape, accumulate_dtype)
    total, _ = jax.lax.scan(body, zeros, chunks)
    return jax.tree.map(lambda t, s: (t / num_microbatches).astype(s.dtype), total, out_shape)

  accumulated.num_microbatches = num_microbatches
  accumulated.unbatched_fn = grad_fn
  return accumulated
