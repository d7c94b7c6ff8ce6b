"""The experiment training loop: determinism and bit-for-bit checkpoint resume."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits

from sam_optax.experiments.checkpoint import Checkpointer
from sam_optax.experiments.train import TrainConfig, evaluate, train


class SmallNet(nn.Module):
  """Dense -> BatchNorm -> ReLU -> Dropout -> Dense: exercises batch_stats and dropout."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(32)(x)))
    x = nn.Dropout(0.2, deterministic=not train)(x)
    return nn.Dense(10)(x)


@pytest.fixture(scope="module")
def digits():
  data = load_digits()
  x = (data.data / 16.0).astype(np.float32)
  y = data.target.astype(np.int32)
  return x[:640], y[:640], x[1400:], y[1400:]


def leaves(tree):
  return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


@pytest.mark.parametrize("optimizer", ["sgd", "sam", "fsam", "looksam"])
def test_training_reduces_loss_and_is_deterministic(digits, optimizer):
  x, y, x_test, y_test = digits
  config = TrainConfig(optimizer=optimizer, epochs=3, batch_size=64, seed=3)
  first = train(SmallNet(), x, y, config, progress=False)
  second = train(SmallNet(), x, y, config, progress=False)
  for a, b in zip(leaves(first.state), leaves(second.state)):
    np.testing.assert_array_equal(a, b)
  losses = [h["train_batch_loss"] for h in first.history]
  assert losses[-1] < 0.7 * losses[0]
  _, accuracy = evaluate(SmallNet(), first.state.params, first.state.batch_stats, x_test, y_test)
  assert accuracy > 0.6
  assert first.step_seconds > 0 and first.seconds > 0


class Interrupt(Exception):
  pass


class InterruptingCheckpointer(Checkpointer):
  """Saves like Checkpointer, then stops the run after epoch ``stop_after``."""

  def __init__(self, directory, stop_after):
    super().__init__(directory)
    self.stop_after = stop_after

  def save(self, state, epoch, history=None):
    super().save(state, epoch, history)
    if epoch == self.stop_after:
      raise Interrupt()


@pytest.mark.parametrize("optimizer", ["fsam", "looksam", "adam"])
def test_resume_from_checkpoint_is_bit_for_bit(digits, tmp_path, optimizer):
  x, y, _, _ = digits
  config = TrainConfig(optimizer=optimizer, base="sgd", epochs=4, batch_size=64, seed=1)
  uninterrupted = train(SmallNet(), x, y, config, progress=False)
  with pytest.raises(Interrupt):
    train(SmallNet(), x, y, config, progress=False,
          checkpointer=InterruptingCheckpointer(str(tmp_path / "run"), stop_after=2))
  checkpointer = Checkpointer(str(tmp_path / "run"))
  assert checkpointer.latest_epoch() == 2
  resumed = train(SmallNet(), x, y, config, progress=False, checkpointer=checkpointer)
  assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
  # params, BatchNorm statistics and the full optax state (F-SAM's EMA, counts).
  a, b = leaves(uninterrupted.state), leaves(resumed.state)
  assert len(a) == len(b)
  for u, r in zip(a, b):
    np.testing.assert_array_equal(u, r)
  assert int(resumed.state.step) == 4 * (len(x) // 64)
