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

With ``config`` (a JSON-serialisable dict of everything that determines the
training), the checkpoint records it and :meth:`Checkpointer.restore` refuses,
with :class:`ConfigMismatchError`, to resume a run made with another one.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class ConfigMismatchError(ValueError):
  """A checkpoint made by a run with another configuration (or with none recorded).

  ``differences`` lists ``(option, saved value, current value)``; empty when
  the checkpoint records no configuration at all.
  """

  def __init__(self, message: str, differences: Optional[list] = None):
    super().__init__(message)
    self.differences = list(differences or [])


class Checkpointer:
  """Saves and restores ``(state, epoch, history)`` under ``directory``.

  Args:
    directory: where checkpoints go (one sub-directory per saved epoch).
    max_to_keep: how many of the latest checkpoints are kept. Default 2.
    config: the run's configuration (a JSON-serialisable dict: dataset, model,
      optimizer settings, epochs, seed, ...). Saved with every checkpoint;
      :meth:`restore` raises :class:`ConfigMismatchError` instead of resuming
      a checkpoint saved with a different (or no) configuration. ``None``:
      nothing is recorded or checked.

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

  A checkpoint remembers the configuration it was made with::

      >>> directory = tempfile.mkdtemp()
      >>> first = Checkpointer(directory, config={'lr': 0.1, 'epochs': 3})
      >>> first.save(state, epoch=1)
      >>> first.close()
      >>> Checkpointer(directory, config={'lr': 0.2, 'epochs': 3}).restore(state)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      sam_optax.experiments.checkpoint.ConfigMismatchError: ... was saved by a run with a different configuration: lr 0.1 (now 0.2)
  """

  def __init__(self, directory: str, max_to_keep: int = 2, config: Optional[dict] = None):
    self.directory = os.path.abspath(directory)
    # Stored as it comes back from JSON (tuples as lists), so comparisons are like for like.
    self.config = None if config is None else json.loads(json.dumps(config))
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    )

  def save(self, state: Any, epoch: int, history: Optional[list] = None) -> None:
    """Saves ``state`` as epoch ``epoch`` (blocks until it is on disk), with the configuration if given."""
    meta = {"epoch": int(epoch), "history": history or []}
    if self.config is not None:
      meta["config"] = self.config
    self._manager.save(
        epoch,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(meta),
        ),
    )
    self._manager.wait_until_finished()

  def latest_epoch(self) -> Optional[int]:
    return self._manager.latest_step()

  def saved_config(self, epoch: Optional[int] = None) -> Optional[dict]:
    """The configuration recorded with the checkpoint of ``epoch`` (default: the latest), or None."""
    epoch = self._manager.latest_step() if epoch is None else epoch
    if epoch is None:
      return None
    meta = self._manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    return meta.get("config")

  def check_config(self, epoch: Optional[int] = None) -> None:
    """Raises :class:`ConfigMismatchError` if the checkpoint of ``epoch`` (default: the latest) was
    saved with a configuration other than ``config``; nothing to check without ``config`` or a checkpoint."""
    epoch = self._manager.latest_step() if epoch is None else epoch
    if self.config is None or epoch is None:
      return
    saved = self.saved_config(epoch)
    if saved is None:
      raise ConfigMismatchError(f"the checkpoint in {self.directory} records no configuration (saved by an "
                                f"older version), so it cannot be checked against this run")
    differences = [(key, saved.get(key), self.config.get(key)) for key in sorted(set(saved) | set(self.config))
                   if saved.get(key) != self.config.get(key)]
    if differences:
      listed = ", ".join(f"{key} {old!r} (now {new!r})" for key, old, new in differences)
      raise ConfigMismatchError(f"the checkpoint in {self.directory} was saved by a run with a different "
                                f"configuration: {listed}", differences)

  def restore(self, like: Any, epoch: Optional[int] = None) -> Optional[tuple[Any, int, list]]:
    """The state saved at ``epoch`` (default: the latest), shaped like ``like``.

    Returns ``(state, epoch, history)``, or ``None`` when nothing was saved.

    Raises:
      ConfigMismatchError: the checkpoint was saved with a configuration other
        than this checkpointer's ``config``.
    """
    epoch = self._manager.latest_step() if epoch is None else epoch
    if epoch is None:
      return None
    self.check_config(epoch)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = self._manager.restore(
        epoch,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
    )
    return restored.state, int(restored.meta["epoch"]), list(restored.meta["history"])

  def close(self) -> None:
    self._manager.close()
