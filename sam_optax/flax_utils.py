"""Flax integration for the perturbation transformations (needs ``flax``).

The core of ``sam_optax`` does not import this module. Two things get in the
way of a one-line SAM change in Flax, and this module removes both:

* Linen: ``flax.training.train_state.TrainState.apply_gradients`` does not
  forward extra keyword arguments to ``tx.update``, so ``grad_fn`` would never
  see the batch. :class:`SAMTrainState` does, and carries ``batch_stats``.
  :func:`make_linen_grad_fn` and :func:`make_linen_train_step` build the
  second-pass gradient so that the *first* pass's BatchNorm statistics are the
  ones kept and the perturbed pass uses the *same* dropout rng.
* NNX: ``nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads, **kw)``
  forwards ``kw`` but hands params over as an ``nnx.State``, and the rest of
  the model (BatchNorm statistics, dropout rng counts) lives in mutable
  ``nnx.Variable`` objects that the first pass advances. :func:`make_nnx_grad_fn`
  turns an NNX loss ``loss_fn(model, batch)`` into a ``grad_fn(params, batch,
  model_state)``, and :func:`make_nnx_train_step` owns the whole step: it takes
  a *pure* snapshot of the non-parameter state before pass 1
  (:func:`nnx_state_snapshot`), so pass 2 sees exactly pass 1's dropout mask
  and BatchNorm statistics, and only pass 1's statistics update is kept.

For every builder, ``value_and_grad=True`` makes ``grad_fn`` return ``(loss,
gradient)`` like ``jax.value_and_grad``: use it with
``sam_perturb(grad_fn, value_and_grad=True)`` to log the SAM loss L(w + eps).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import flax
import jax
import optax
from flax import nnx
from flax.training import train_state

from sam_optax import _common

if not hasattr(nnx, "as_pure"):  # flax < 0.12.7
  raise ImportError(f"sam_optax.flax_utils needs flax>=0.12.7 (nnx.as_pure), found flax {flax.__version__}: "
                    "pip install -U 'flax>=0.12.7'.")


class SAMTrainState(train_state.TrainState):
  """A Linen ``TrainState`` whose ``apply_gradients`` forwards extra arguments.

  Attributes:
    batch_stats: BatchNorm statistics (``None`` for models without them).

  ``state.apply_gradients(grads=g, extra_args={'batch': batch}, batch_stats=s)``
  calls ``tx.update(g, opt_state, params, batch=batch)`` and replaces the
  other given fields (here ``batch_stats``), as ``TrainState`` does.

  Example (a model without BatchNorm or dropout; :func:`make_linen_train_step`
  shows one with both)::

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> import flax.linen as nn
      >>> model = nn.Dense(1)
      >>> batch = {'x': jnp.ones((4, 3)), 'y': jnp.zeros((4, 1))}
      >>> def loss(params, batch):
      ...   return jnp.mean((model.apply({'params': params}, batch['x']) - batch['y']) ** 2)
      >>> tx = optax.chain(sam_optax.sam_perturb(jax.grad(loss), rho=0.05), optax.sgd(0.1))
      >>> state = SAMTrainState.create(apply_fn=model.apply, tx=tx,
      ...                              params=model.init(jax.random.key(0), batch['x'])['params'])
      >>> state = state.apply_gradients(grads=jax.grad(loss)(state.params, batch), extra_args={'batch': batch})
      >>> int(state.step), state.batch_stats is None
      (1, True)
  """

  batch_stats: Any = None

  def apply_gradients(self, *, grads, extra_args: Optional[dict] = None, **kwargs):
    updates, new_opt_state = self.tx.update(
        grads, self.opt_state, self.params, **(extra_args or {})
    )
    new_params = optax.apply_updates(self.params, updates)
    return self.replace(
        step=self.step + 1, params=new_params, opt_state=new_opt_state, **kwargs
    )


LinenLoss = Callable[[Any, Any, Any, Any], "tuple[jax.Array, Any]"]


def make_linen_grad_fn(loss_fn: LinenLoss, *, value_and_grad: bool = False) -> Callable[..., Any]:
  """The second-pass ``grad_fn`` for a Linen model with BatchNorm/dropout.

  Args:
    loss_fn: ``loss_fn(params, batch, batch_stats, dropout_rng) -> (loss,
      new_batch_stats)``, the training-mode loss (``mutable=['batch_stats']``,
      ``rngs={'dropout': dropout_rng}``).
    value_and_grad: if True, ``grad_fn`` returns ``(loss, gradient)`` (the loss
      at the point it is called at, without the statistics), as
      ``*_perturb(..., value_and_grad=True)`` expects. Default False.

  Returns:
    ``grad_fn(params, batch, batch_stats=None, dropout_rng=None)``: the
    gradient of ``loss_fn`` at ``params``. The batch statistics that the
    perturbed forward pass computes are discarded, so the ones kept are those
    of the first pass; pass the same ``dropout_rng`` as the first pass so both
    passes see the same dropout mask (:func:`make_linen_train_step` does).

  Example::

      >>> import jax, jax.numpy as jnp, sam_optax
      >>> import flax.linen as nn
      >>> model = nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=False), nn.Dense(1)])
      >>> batch = {'x': jnp.arange(12.0).reshape(4, 3), 'y': jnp.zeros((4, 1))}
      >>> variables = model.init(jax.random.key(0), batch['x'])
      >>> def loss_fn(params, batch, batch_stats, dropout_rng):
      ...   out, updates = model.apply({'params': params, 'batch_stats': batch_stats}, batch['x'],
      ...                              mutable=['batch_stats'])
      ...   return jnp.mean((out - batch['y']) ** 2), updates['batch_stats']
      >>> grad_fn = make_linen_grad_fn(loss_fn, value_and_grad=True)
      >>> loss, gradient = grad_fn(variables['params'], batch, variables['batch_stats'])
      >>> by_hand = jax.grad(lambda p: loss_fn(p, batch, variables['batch_stats'], None)[0])(variables['params'])
      >>> jax.tree.all(jax.tree.map(jnp.allclose, gradient, by_hand))
      True
      >>> perturb = sam_optax.sam_perturb(grad_fn, rho=0.05, value_and_grad=True)  # logs L(w + eps)
  """
  _check_callable(loss_fn, "make_linen_grad_fn")
  value_and_grad = _common.check_flag(value_and_grad, "value_and_grad", "make_linen_grad_fn")

  def grad_fn(params, batch, batch_stats=None, dropout_rng=None):
    loss, gradient = jax.value_and_grad(lambda p: loss_fn(p, batch, batch_stats, dropout_rng)[0])(params)
    return (loss, gradient) if value_and_grad else gradient

  return grad_fn


def make_linen_train_step(loss_fn: LinenLoss) -> Callable[..., Any]:
  """A complete (jittable) SAM train step for :class:`SAMTrainState`.

  The optimizer of the state must have been built with
  ``make_linen_grad_fn(loss_fn)`` as its ``grad_fn``. Returns
  ``train_step(state, batch, dropout_rng) -> (new_state, loss)``::

      pass 1:  (loss, stats_1), g = value_and_grad(loss_fn)(w, batch, stats_0, rng)
      pass 2:  g_sam = grad(loss_fn)(w + eps(g), batch, stats_0, rng)   (inside tx.update)
      new state: params from the chain applied to g, batch_stats = stats_1

  so both passes see the same dropout mask and normalise with the same batch,
  and pass 2's statistics are discarded. ``loss`` is L(w) of pass 1.

  Example::

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> import flax.linen as nn
      >>> class Net(nn.Module):
      ...   @nn.compact
      ...   def __call__(self, x, train):
      ...     x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
      ...     return nn.Dense(2)(nn.Dropout(0.5, deterministic=not train)(nn.relu(x)))
      >>> model = Net()
      >>> variables = model.init(jax.random.key(0), jnp.ones((4, 3)), train=False)
      >>> def loss_fn(params, batch, batch_stats, dropout_rng):
      ...   logits, updates = model.apply(
      ...       {'params': params, 'batch_stats': batch_stats}, batch['x'], train=True,
      ...       rngs={'dropout': dropout_rng}, mutable=['batch_stats'])
      ...   loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['y']).mean()
      ...   return loss, updates['batch_stats']
      >>> tx = optax.chain(sam_optax.sam_perturb(make_linen_grad_fn(loss_fn), rho=0.05),
      ...                  optax.sgd(0.1, momentum=0.9))
      >>> state = SAMTrainState.create(apply_fn=model.apply, params=variables['params'],
      ...                              batch_stats=variables['batch_stats'], tx=tx)
      >>> train_step = jax.jit(make_linen_train_step(loss_fn))
      >>> batch = {'x': jnp.arange(12.0).reshape(4, 3), 'y': jnp.array([0, 1, 0, 1])}
      >>> state, loss = train_step(state, batch, jax.random.key(1))
      >>> int(state.step), loss.shape
      (1, ())
  """
  _check_callable(loss_fn, "make_linen_train_step")

  def train_step(state: SAMTrainState, batch, dropout_rng=None):
    (loss, new_batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, state.batch_stats, dropout_rng
    )
    extra_args = dict(batch=batch, batch_stats=state.batch_stats, dropout_rng=dropout_rng)
    new_state = state.apply_gradients(
        grads=grads, extra_args=extra_args, batch_stats=new_batch_stats
    )
    return new_state, loss

  return train_step


class NNXStateSnapshot(NamedTuple):
  """A copy of an NNX model's non-optimized state, taken before pass 1.

  Made by :func:`nnx_state_snapshot`; the ``model_state`` that
  :func:`make_nnx_grad_fn`'s ``grad_fn`` accepts.

  Attributes:
    state: the ``nnx.State`` of the non-optimized variables (BatchNorm
      statistics, dropout rng keys and counts) as plain arrays.
  """

  state: Any


def nnx_state_snapshot(model_or_state: Any, wrt: Any = nnx.Param) -> NNXStateSnapshot:
  """A copy of the model's non-optimized state: the ``model_state`` to pass.

  ``nnx.state(model, nnx.Not(nnx.Param))`` holds the model's live
  ``nnx.Variable`` objects: running the model afterwards (pass 1) advances
  them (the dropout rng count, the BatchNorm statistics), so they no longer
  describe the model *before* pass 1 — and ``nnx.Optimizer.update`` copies its
  keyword arguments only when it runs, after pass 1. Take this snapshot before
  pass 1 instead.

  Args:
    model_or_state: an NNX model, or (in a functional ``nnx.split`` loop) the
      ``nnx.State`` of its non-optimized variables.
    wrt: the filter of the optimized variables (``nnx.Optimizer``'s ``wrt``),
      used when a model is given. Default ``nnx.Param``.

  Returns:
    ``NNXStateSnapshot(nnx.as_pure(nnx.state(model, nnx.Not(wrt))))``, plain
    arrays that later runs of the model do not change.

  Example::

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> class Net(nnx.Module):
      ...   def __init__(self, rngs):
      ...     self.linear = nnx.Linear(3, 2, rngs=rngs)
      ...     self.dropout = nnx.Dropout(0.5, rngs=rngs)
      ...   def __call__(self, x):
      ...     return self.dropout(self.linear(x))
      >>> model = Net(nnx.Rngs(0))
      >>> snapshot = nnx_state_snapshot(model)
      >>> live = nnx.state(model, nnx.Not(nnx.Param))
      >>> _ = model(jnp.ones((2, 3)))            # pass 1 draws a dropout mask
      >>> int(live['dropout']['rngs']['count'][...]), int(snapshot.state['dropout']['rngs']['count'])
      (1, 0)
  """
  if isinstance(model_or_state, NNXStateSnapshot):
    return model_or_state
  if isinstance(model_or_state, nnx.Module):
    model_or_state = nnx.state(model_or_state, nnx.Not(wrt))
  elif not isinstance(model_or_state, (nnx.State, dict)):
    raise TypeError("nnx_state_snapshot: model_or_state must be an nnx.Module or an nnx.State, "
                    f"got {type(model_or_state).__name__}.")
  return NNXStateSnapshot(nnx.as_pure(model_or_state))


def make_nnx_grad_fn(
    loss_fn: Callable[[nnx.Module, Any], jax.Array],
    graphdef: Any,
    *,
    value_and_grad: bool = False,
) -> Callable[..., Any]:
  """The second-pass ``grad_fn`` for an NNX model.

  Args:
    loss_fn: ``loss_fn(model, batch) -> scalar``, as given to ``nnx.grad``.
    graphdef: the model's graph definition, ``nnx.graphdef(model)``.
    value_and_grad: if True, ``grad_fn`` returns ``(loss, gradient)``, as
      ``*_perturb(..., value_and_grad=True)`` expects. Default False.

  Returns:
    ``grad_fn(params, batch, model_state=None)``: the gradient of
    ``loss_fn(nnx.merge(graphdef, params, model_state.state), batch)`` with
    respect to ``params``, the ``nnx.State`` of the optimized variables (what
    ``nnx.Optimizer.update`` hands to the transformation). ``model_state`` is
    the rest of the model (BatchNorm statistics, dropout rng counts) as it was
    *before* pass 1: an :class:`NNXStateSnapshot` from
    :func:`nnx_state_snapshot`. The perturbed pass then sees pass 1's dropout
    mask and statistics; its own state changes are discarded.

  Raises (when the step is traced):
    TypeError: ``model_state`` is not an :class:`NNXStateSnapshot` (for
      example ``nnx.state(model, nnx.Not(nnx.Param))``, the live state that
      pass 1 advances: pass 2 would draw another dropout mask).
    ValueError: ``model_state`` is missing and the model has such state.

  :func:`make_nnx_train_step` writes the step that calls it correctly (with
  ``nnx.Optimizer``). Used directly, in a functional ``nnx.split`` loop: keep
  the params and the rest as plain arrays (``nnx.merge`` reuses the
  ``Variable`` objects it is given), merge inside the loss, and pass the rest
  as it was before pass 1.

  Example::

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> from flax import nnx
      >>> class Net(nnx.Module):
      ...   def __init__(self, rngs):
      ...     self.linear, self.dropout = nnx.Linear(3, 1, rngs=rngs), nnx.Dropout(0.5, rngs=rngs)
      ...   def __call__(self, x):
      ...     return self.dropout(self.linear(x))
      >>> def loss_fn(model, batch):
      ...   return jnp.mean((model(batch['x']) - batch['y']) ** 2)
      >>> graphdef, params, rest = nnx.split(Net(nnx.Rngs(0)), nnx.Param, ...)
      >>> params, rest = nnx.as_pure((params, rest))
      >>> tx = optax.chain(sam_optax.sam_perturb(make_nnx_grad_fn(loss_fn, graphdef), rho=0.05),
      ...                  optax.sgd(0.1))
      >>> opt_state = tx.init(params)
      >>> @jax.jit
      ... def step(params, rest, opt_state, batch):
      ...   def loss_and_rest(p):
      ...     model = nnx.merge(graphdef, p, rest)
      ...     return loss_fn(model, batch), nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param)))
      ...   (loss, new_rest), grads = jax.value_and_grad(loss_and_rest, has_aux=True)(params)
      ...   updates, opt_state = tx.update(grads, opt_state, params, batch=batch,
      ...                                  model_state=nnx_state_snapshot(rest))  # before pass 1
      ...   return optax.apply_updates(params, updates), new_rest, opt_state, loss
      >>> batch = {'x': jnp.ones((8, 3)), 'y': jnp.zeros((8, 1))}
      >>> params, rest, opt_state, loss = step(params, rest, opt_state, batch)
      >>> int(rest['dropout']['rngs']['count'])  # pass 1 drew one mask; pass 2 reused it
      1
  """
  _check_callable(loss_fn, "make_nnx_grad_fn")
  value_and_grad = _common.check_flag(value_and_grad, "value_and_grad", "make_nnx_grad_fn")
  if isinstance(graphdef, nnx.Module):
    raise TypeError("make_nnx_grad_fn: graphdef must be the model's graph definition, "
                    "nnx.graphdef(model), not the model itself.")

  def grad_fn(params, batch, model_state=None):
    if model_state is not None and not isinstance(model_state, NNXStateSnapshot):
      raise TypeError(
          "make_nnx_grad_fn: model_state must be a snapshot of the model's non-parameter state "
          "taken before pass 1, model_state=nnx_state_snapshot(model), got "
          f"{type(model_state).__name__}. nnx.state(model, nnx.Not(nnx.Param)) holds the live "
          "Variables, which pass 1 advances (dropout rng count, BatchNorm statistics), so the "
          "perturbed pass would draw another dropout mask. make_nnx_train_step(loss_fn) writes "
          "the whole step; in an nnx.split loop pass nnx_state_snapshot(rest).")

    def loss_of_params(p):
      return loss_fn(_merge(graphdef, p, model_state), batch)

    loss, gradient = jax.value_and_grad(loss_of_params)(params)
    return (loss, gradient) if value_and_grad else gradient

  return grad_fn


def _merge(graphdef, params, model_state):
  if model_state is not None:
    return nnx.merge(graphdef, params, model_state.state)
  try:
    return nnx.merge(graphdef, params)
  except ValueError as error:
    raise ValueError(
        "make_nnx_grad_fn: grad_fn was called without model_state, but the model has state "
        "besides the optimized parameters (BatchNorm statistics, dropout rng counts, ...). Pass "
        "model_state=nnx_state_snapshot(model), taken before pass 1, to optimizer.update "
        "(optimizer.update(model, grads, batch=batch, model_state=snapshot)), or use "
        f"make_nnx_train_step, which does. ({error})") from error


def make_nnx_train_step(loss_fn: Callable[[nnx.Module, Any], jax.Array]) -> Callable[..., Any]:
  """A complete SAM train step for an NNX model and ``nnx.Optimizer``.

  The optimizer's transformation must have been built with
  ``make_nnx_grad_fn(loss_fn, nnx.graphdef(model))`` as its ``grad_fn``.
  Returns ``train_step(model, optimizer, batch) -> loss`` (wrap it in
  ``nnx.jit``)::

      s_0 = nnx_state_snapshot(model, optimizer.wrt)        # a copy, before pass 1
      pass 1:  loss, g = nnx.value_and_grad(loss_fn)(model, batch)   # model's state -> s_1
      pass 2:  g_sam = grad of loss_fn at (w + eps(g), s_0)          # inside optimizer.update
      optimizer.update(model, g, batch=batch, model_state=s_0)

  Pass 2 uses pass 1's dropout mask (same rng count) and normalises with the
  same batch; the model keeps pass 1's statistics and rng count ``s_1``
  (pass 2's changes are discarded). ``loss`` is L(w) of pass 1.

  Example::

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> from flax import nnx
      >>> class Net(nnx.Module):
      ...   def __init__(self, rngs):
      ...     self.dense, self.norm = nnx.Linear(4, 8, rngs=rngs), nnx.BatchNorm(8, rngs=rngs)
      ...     self.dropout, self.head = nnx.Dropout(0.5, rngs=rngs), nnx.Linear(8, 1, rngs=rngs)
      ...   def __call__(self, x):
      ...     return self.head(self.dropout(nnx.relu(self.norm(self.dense(x)))))
      >>> def loss_fn(model, batch):
      ...   return jnp.mean((model(batch['x']) - batch['y']) ** 2)
      >>> model = Net(nnx.Rngs(0))
      >>> grad_fn = make_nnx_grad_fn(loss_fn, nnx.graphdef(model))
      >>> optimizer = nnx.Optimizer(
      ...     model, optax.chain(sam_optax.sam_perturb(grad_fn, rho=0.05), optax.sgd(0.1)),
      ...     wrt=nnx.Param)
      >>> train_step = nnx.jit(make_nnx_train_step(loss_fn))
      >>> batch = {'x': jnp.ones((8, 4)), 'y': jnp.zeros((8, 1))}
      >>> loss = train_step(model, optimizer, batch)
      >>> int(model.dropout.rngs.count[...])  # pass 1 drew one mask; pass 2 reused it
      1
  """
  _check_callable(loss_fn, "make_nnx_train_step")

  def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch):
    if not isinstance(optimizer, nnx.Optimizer):
      raise TypeError(f"make_nnx_train_step: optimizer must be an nnx.Optimizer, got {type(optimizer)}.")
    snapshot = nnx_state_snapshot(model, optimizer.wrt)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, optimizer.wrt))(model, batch)
    optimizer.update(model, grads, batch=batch, model_state=snapshot)
    return loss

  return train_step


def _check_callable(fn, name: str) -> None:
  if not callable(fn):
    raise TypeError(f"{name}: loss_fn must be callable, got {fn!r}.")
