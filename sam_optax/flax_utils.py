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
  forwards ``kw`` but hands params over as an ``nnx.State``.
  :func:`make_nnx_grad_fn` turns an NNX loss ``loss_fn(model, batch)`` into a
  ``grad_fn(params, batch, model_state)`` working on that state.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import optax
from flax import nnx
from flax.training import train_state


class SAMTrainState(train_state.TrainState):
  """A Linen ``TrainState`` whose ``apply_gradients`` forwards extra arguments.

  Attributes:
    batch_stats: BatchNorm statistics (``None`` for models without them).

  ``state.apply_gradients(grads=g, extra_args={'batch': batch}, batch_stats=s)``
  calls ``tx.update(g, opt_state, params, batch=batch)`` and replaces the
  other given fields (here ``batch_stats``), as ``TrainState`` does.
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


def make_linen_grad_fn(loss_fn: LinenLoss) -> Callable[..., Any]:
  """The second-pass ``grad_fn`` for a Linen model with BatchNorm/dropout.

  Args:
    loss_fn: ``loss_fn(params, batch, batch_stats, dropout_rng) -> (loss,
      new_batch_stats)``, the training-mode loss (``mutable=['batch_stats']``,
      ``rngs={'dropout': dropout_rng}``).

  Returns:
    ``grad_fn(params, batch, batch_stats=None, dropout_rng=None)``: the
    gradient of ``loss_fn`` at ``params``. The batch statistics that the
    perturbed forward pass computes are discarded, so the ones kept are those
    of the first pass; pass the same ``dropout_rng`` as the first pass so both
    passes see the same dropout mask.
  """

  def grad_fn(params, batch, batch_stats=None, dropout_rng=None):
    return jax.grad(lambda p: loss_fn(p, batch, batch_stats, dropout_rng)[0])(params)

  return grad_fn


def make_linen_train_step(loss_fn: LinenLoss) -> Callable[..., Any]:
  """A complete (jittable) SAM train step for :class:`SAMTrainState`.

  The optimizer of the state must have been built with
  ``make_linen_grad_fn(loss_fn)`` as its ``grad_fn``. Returns
  ``train_step(state, batch, dropout_rng) -> (new_state, loss)``: pass 1 at
  ``w`` (its new batch statistics are kept), pass 2 at ``w + eps`` inside
  ``tx.update`` with the same batch, statistics and dropout rng.

  Example::

      def loss_fn(params, batch, batch_stats, dropout_rng):
        logits, updates = model.apply(
            {'params': params, 'batch_stats': batch_stats}, batch['x'], train=True,
            rngs={'dropout': dropout_rng}, mutable=['batch_stats'])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['y']).mean()
        return loss, updates['batch_stats']

      tx = optax.chain(sam_optax.sam_perturb(make_linen_grad_fn(loss_fn), rho=0.05),
                       optax.sgd(0.1, momentum=0.9))
      state = SAMTrainState.create(apply_fn=model.apply, params=variables['params'],
                                   batch_stats=variables['batch_stats'], tx=tx)
      train_step = jax.jit(make_linen_train_step(loss_fn))
      state, loss = train_step(state, batch, jax.random.key(0))
  """

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


def make_nnx_grad_fn(
    loss_fn: Callable[[nnx.Module, Any], jax.Array],
    graphdef: Any,
) -> Callable[..., Any]:
  """The second-pass ``grad_fn`` for an NNX model used with ``nnx.Optimizer``.

  Args:
    loss_fn: ``loss_fn(model, batch) -> scalar``, as given to ``nnx.grad``.
    graphdef: the model's graph definition, ``nnx.graphdef(model)``.

  Returns:
    ``grad_fn(params, batch, model_state)`` where ``params`` is the
    ``nnx.State`` of the optimized (``wrt``) variables (what ``nnx.Optimizer.update`` hands
    to the transformation) and ``model_state`` is ``nnx.state(model,
    nnx.Not(nnx.Param))``: the rest of the model (BatchNorm statistics, dropout rng
    counters) taken *before* the first pass, so the perturbed pass sees the
    same statistics and dropout mask. Its own state changes are discarded.

  Example::

      graphdef = nnx.graphdef(model)
      grad_fn = make_nnx_grad_fn(loss_fn, graphdef)
      optimizer = nnx.Optimizer(model, optax.chain(sam_optax.sam_perturb(grad_fn), optax.adam(1e-3)),
                                wrt=nnx.Param)

      @nnx.jit
      def train_step(model, optimizer, batch):
        model_state = nnx.state(model, nnx.Not(nnx.Param))   # before pass 1
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        optimizer.update(model, grads, batch=batch, model_state=model_state)
        return loss
  """

  def grad_fn(params, batch, model_state=None):
    states = (params,) if model_state is None else (params, model_state)

    def loss_of_params(p):
      model = nnx.merge(graphdef, p, *states[1:])
      return loss_fn(model, batch)

    return jax.grad(loss_of_params)(params)

  return grad_fn
