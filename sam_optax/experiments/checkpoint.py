"""Orbax checkpoints of a whole training state (params, BatchNorm stats, optax state).

The optax state is saved in full — including F-SAM's gradient EMA, LookSAM's
orthogonal gradient and every step counter — and restored into the structure
of a freshly initialised state (NamedTuples included), so a resumed run
continues bit-for-bit on the trajectory of an uninterrupted one.

Example::

    checkpointer = Checkpointer("/tmp/run1")
    restored = checkpointer.restore(fresh_state)      # None when there is nothing yet
    ...
    checkpointer.save(state, epoch, history)          # after every epoch
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores ``(state, epoch, history)`` under ``directory``.

  Args:
    directory: where checkpoints go (one sub-directory per saved epoch).
    max_to_keep: how many of the latest checkpoints are kept. Default 2.

  Example (an F-SAM chain's state: NamedTuples and the gradient EMA come back)::

      >>> import tempfile, jax, jax.numpy as jnp, optax, sam_optax
      >>> params = {'w': jnp.arange(3.0)}
      >>> tx = optax.chain(sam_optax.fsam_perturb(jax.grad(lambda p: jnp.sum(p['w'] ** 2))), optax.sgd(0.1))
      >>> state = (params, tx.init(params))
      >>> checkpointer = Checkpointer(tempfile.mkdtemp())
      >>> checkpointer.restore(state) is None  # nothing saved yet
      True
      >>> checkpointer.save(state, epoch=3, history=[{'epoch': 3, 'test_acc': 0.9}])
      >>> restored, epoch, history = checkpointer.restore(state)
      >>> epoch, history, type(restored[1][0]).__name__
      (3, [{'epoch': 3, 'test_acc': 0.9}], 'FSAMState')
      >>> checkpointer.close()
  """

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    )

  def save(self, state: Any, epoch: int, history: Optional[list] = None) -> None:
    """Saves ``state`` as epoch ``epoch`` (blocks until it is on disk)."""
    self._manager.save(
        epoch,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave({"epoch": int(epoch), "history": history or []}),
        ),
    )
    self._manager.wait_until_finished()

  def latest_epoch(self) -> Optional[int]:
    return self._manager.latest_step()

  def restore(self, like: Any, epoch: Optional[int] = None) -> Optional[tuple[Any, int, list]]:
    """The state saved at ``epoch`` (default: the latest), shaped like ``like``.

    Returns ``(state, epoch, history)``, or ``None`` when nothing was saved.
    """
    epoch = self._manager.latest_step() if epoch is None else epoch
    if epoch is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = self._manager.restore(
        epoch,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
    )
    return restored.state, int(restored.meta["epoch"]), list(restored.meta["history"])

  def close(self) -> None:
    self._manager.close()
