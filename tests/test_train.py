"""The experiment training loop: determinism and bit-for-bit checkpoint resume."""

import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from sam_optax.experiments.checkpoint import Checkpointer, ConfigMismatchError
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


def test_checkpoint_resumes_only_its_own_configuration(digits, tmp_path):
  x, y = digits[0][:256], digits[1][:256]
  config = TrainConfig(optimizer="sam", epochs=2, batch_size=64, seed=0)
  directory = str(tmp_path / "run")
  first = train(SmallNet(), x, y, config, progress=False, checkpointer=Checkpointer(directory, config={"lr": 0.05}))
  # Restored whole (nothing left to train): the step time is the one the saved history recorded, not NaN.
  again = train(SmallNet(), x, y, config, progress=False, checkpointer=Checkpointer(directory, config={"lr": 0.05}))
  assert again.history == first.history
  assert again.step_seconds == pytest.approx(first.step_seconds, rel=1e-9)
  assert Checkpointer(directory).saved_config() == {"lr": 0.05}
  # Another configuration is refused before anything is restored or trained.
  with pytest.raises(ConfigMismatchError, match=re.escape("different configuration: epochs None (now 3), "
                                                          "lr 0.05 (now 0.1)")) as raised:
    train(SmallNet(), x, y, config, progress=False,
          checkpointer=Checkpointer(directory, config={"lr": 0.1, "epochs": 3}))
  assert raised.value.differences == [("epochs", None, 3), ("lr", 0.05, 0.1)]
  # A checkpoint saved without a configuration cannot be vouched for.
  Checkpointer(str(tmp_path / "old")).save(first.state, 2, first.history)
  with pytest.raises(ConfigMismatchError, match="records no configuration"):
    Checkpointer(str(tmp_path / "old"), config={"lr": 0.05}).restore(first.state)


class TinyNet(nn.Module):
  """Dense -> ReLU -> Dropout -> Dense: small enough for by-hand two-pass SAM."""

  rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
    x = nn.Dropout(self.rate, deterministic=not train)(x)
    return nn.Dense(10)(x)


def by_hand_sam_step(model, params, x, y, rho, lr, dropout_rng, group_size=None):
  """One SAM step written from Foret et al. (2021), Algorithm 1, with plain jax.grad.

  group_size=m: m-sharpness, eps_i from group i's own gradient, the mean of the
  groups' perturbed gradients. First SGD-momentum step: the update is -lr * g.
  Returns (new params, mean L(w + eps_i) - L(w) on the whole batch).
  """
  import jax.numpy as jnp
  import optax

  def loss(p, xs, ys):
    logits = model.apply({"params": p}, xs, train=True, rngs={"dropout": dropout_rng})
    return optax.softmax_cross_entropy_with_integer_labels(logits, ys).mean()

  m = group_size or len(y)
  grads, perturbed = [], []
  for start in range(0, len(y), m):
    xs, ys = x[start:start + m], y[start:start + m]
    g = jax.grad(loss)(params, xs, ys)
    norm = jnp.sqrt(sum(jnp.sum(leaf ** 2) for leaf in jax.tree.leaves(g)))
    w_adv = jax.tree.map(lambda w, gi: w + rho * gi / norm, params, g)
    perturbed.append(loss(w_adv, xs, ys))
    grads.append(jax.grad(loss)(w_adv, xs, ys))
  g_sam = jax.tree.map(lambda *gs: sum(gs) / len(gs), *grads)
  new_params = jax.tree.map(lambda w, g: w - lr * g, params, g_sam)
  return new_params, float(np.mean(perturbed) - loss(params, x, y))


@pytest.mark.parametrize("group_size,rate", [(None, 0.3), (4, 0.0)])
def test_one_step_params_and_logged_sharpness_equal_by_hand_sam(digits, group_size, rate):
  x, y = digits[0][:8], digits[1][:8]
  model = TinyNet(rate)
  config = TrainConfig(optimizer="sam", rho=0.3, lr=0.1, weight_decay=0.0, epochs=1, batch_size=8, seed=5,
                       group_size=group_size)
  result = train(model, x, y, config, progress=False)
  # The loop's conventions: init keys (seed, seed + 1), batch order of (seed, epoch 0), dropout key of step 0.
  params = model.init({"params": jax.random.key(5), "dropout": jax.random.key(6)}, x[:2])["params"]
  order = np.random.default_rng([5, 0]).permutation(8)
  rng = jax.random.fold_in(jax.random.key(5 + 2), 0)
  expected, sharpness = by_hand_sam_step(model, params, x[order], y[order], 0.3, 0.1, rng, group_size)
  for a, b in zip(leaves(result.state.params), leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert abs(result.history[0]["sharpness"] - sharpness) < 1e-5
  assert result.history[0]["sharpness"] > 0


def test_group_size_reaches_the_perturbation(digits):
  x, y = digits[0][:64], digits[1][:64]
  common = dict(optimizer="sam", epochs=1, batch_size=32, seed=0)
  grouped = train(TinyNet(), x, y, TrainConfig(group_size=8, **common), progress=False)
  whole = train(TinyNet(), x, y, TrainConfig(**common), progress=False)
  assert max(float(np.max(np.abs(a - b))) for a, b in zip(leaves(grouped.state.params),
                                                           leaves(whole.state.params))) > 1e-4
  with pytest.raises(ValueError, match="group_size"):
    train(TinyNet(), x, y, TrainConfig(group_size=0, **common), progress=False)


@pytest.mark.parametrize("optimizer", ["sam", "looksam"])
def test_vmapped_rho_sweep_equals_separate_runs(digits, optimizer):
  import dataclasses

  from sam_optax.experiments.train import train_sweep

  x, y, x_test, y_test = digits
  x, y = x[:128], y[:128]
  config = TrainConfig(optimizer=optimizer, epochs=2, batch_size=64, seed=2, looksam_k=2)
  rhos = [0.02, 0.3]
  sweep = train_sweep(SmallNet(), x, y, config, rhos, x_eval=x_test, y_eval=y_test, progress=False)
  assert sweep.vmapped and len(sweep.results) == 2
  for rho, swept in zip(rhos, sweep.results):
    alone = train(SmallNet(), x, y, dataclasses.replace(config, rho=rho), x_test=x_test, y_test=y_test,
                  progress=False)
    # params, BatchNorm statistics and the whole optax state (perturbed_loss included)
    for a, b in zip(leaves(swept.state), leaves(alone.state)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-5)  # some leaves are ~1e-6 noise
    for h_swept, h_alone in zip(swept.history, alone.history):
      for key in ("train_batch_loss", "sharpness", "test_loss", "test_acc"):
        assert abs(h_swept[key] - h_alone[key]) < 1e-5, key
  # The radii differ, so the runs do.
  assert not np.allclose(leaves(sweep.results[0].state.params)[0], leaves(sweep.results[1].state.params)[0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=0), "epochs must be an int >= 1, got 0"),
    (dict(batch_size=True), "batch_size must be an int >= 1, got True"),
    (dict(looksam_k=0), "looksam_k must be an int >= 1, got 0"),
    (dict(seed=1.5), "seed must be an int, got 1.5"),
    (dict(lr=float("nan")), "lr must be None or a finite number > 0, got nan"),
    (dict(lr=0.0), "lr must be None or a finite number > 0, got 0.0"),
    (dict(weight_decay=float("nan")), "weight_decay must be a finite number >= 0, got nan"),
    (dict(sigma=-1.0), "sigma must be a finite number >= 0, got -1.0"),
    (dict(gsam_alpha="0.1"), "gsam_alpha must be a finite number >= 0, got '0.1'"),
    (dict(rho=float("inf")), "rho must be None or a finite number >= 0, got inf"),
])
def test_train_config_refuses_bad_values_by_name(kwargs, match):
  """A NaN weight decay or learning rate used to train to NaN without a word."""
  with pytest.raises(ValueError, match=f"^TrainConfig: {re.escape(match)}"):
    TrainConfig(**kwargs)


def test_train_config_takes_numpy_and_jax_scalars_and_a_traced_rho():
  assert TrainConfig(rho=np.float64(0.1), lr=jnp.float32(0.05)).radius == 0.1
  assert float(jax.jit(lambda rho: TrainConfig(rho=rho).radius)(0.3)) == pytest.approx(0.3)


def test_step_time_leaves_out_the_runs_first_step(digits):
  """The first execution's one-time costs are not a step time (a 1-epoch run compares optimizers fairly)."""
  from sam_optax.experiments import train as train_lib  # pylint: disable=import-outside-toplevel

  x, y = digits[0][:256], digits[1][:256]
  config = TrainConfig(optimizer="sgd", epochs=2, batch_size=64)  # 4 steps per epoch
  steps = []

  def run_step(state, batch, step):
    time.sleep(1.0 if step == 0 else 0.02)  # a slow first step, as on a cold device
    steps.append(step)
    return state, {"loss": jnp.float32(batch["y"][0])}

  history = []
  _, epoch_step_seconds = train_lib._loop(  # pylint: disable=protected-access
      None, run_step, x, y, config, histories=[history], first_epoch=0, evaluate_fn=None, bar=None)
  assert steps == list(range(8))
  # Epoch 1 times steps 1-3 (not 0), epoch 2 all four; counting step 0 would give >= 0.26 s.
  assert all(0.02 <= seconds < 0.2 for seconds in epoch_step_seconds), epoch_step_seconds
  assert [record["epoch"] for record in history] == [1, 2]
  assert 1 / 0.2 < history[0]["steps_per_second"] <= 1 / 0.02
