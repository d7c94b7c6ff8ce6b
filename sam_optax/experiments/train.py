"""Training one model with one optimizer: the loop behind ``sam-optax compare``.

Any model of :mod:`sam_optax.experiments.models` (Flax linen, ``__call__(x,
train)``; BatchNorm in ``batch_stats``, dropout on the ``'dropout'`` rng) is
trained with a base optimizer (SGD with momentum, or Adam) or its
sharpness-aware version from :mod:`sam_optax`, with a cosine learning-rate
schedule and weight decay. Runs are deterministic for a seed: the data order
of epoch ``e`` and the dropout key of step ``t`` are functions of ``(seed, e)``
and ``(seed, t)``, so a run resumed from a checkpoint continues on the same
trajectory.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax
from sam_optax.flax_utils import make_linen_grad_fn

BASE_OPTIMIZERS = ("sgd", "adam")
SHARPNESS_AWARE = ("sam", "asam", "fsam", "gsam", "looksam")
OPTIMIZERS = BASE_OPTIMIZERS + SHARPNESS_AWARE

# Radius defaults: SAM paper (0.05, CIFAR-10); ASAM ~10x larger (Kwon et al.).
DEFAULT_RHO = {"sam": 0.05, "asam": 0.5, "fsam": 0.05, "gsam": 0.05, "looksam": 0.05}
DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Hyper-parameters of one training run.

  Attributes:
    optimizer: one of ``OPTIMIZERS``. ``sgd``/``adam`` train with the base
      optimizer alone; the others put the matching ``sam_optax`` transformation
      in front of the base optimizer ``base``.
    base: the base optimizer, ``"sgd"`` (momentum 0.9) or ``"adam"``.
    rho: the SAM radius; ``None`` takes ``DEFAULT_RHO[optimizer]``.
    sigma, lmbda: F-SAM's EMA removal weight and decay.
    gsam_alpha: GSAM's surrogate-gap weight.
    looksam_k, looksam_alpha: LookSAM's period and reuse weight.
    epochs, batch_size: training budget.
    lr: peak learning rate of the cosine schedule (``None``: per base).
    weight_decay: decoupled from the perturbation, applied in the chain after it.
    seed: seeds the initialisation, the data order and dropout.
  """

  optimizer: str = "sam"
  base: str = "sgd"
  rho: Optional[float] = None
  sigma: float = 1.0
  lmbda: float = 0.9
  gsam_alpha: float = 0.1
  looksam_k: int = 5
  looksam_alpha: float = 0.7
  epochs: int = 20
  batch_size: int = 64
  lr: Optional[float] = None
  weight_decay: float = 5e-4
  seed: int = 0

  @property
  def base_name(self) -> str:
    return self.optimizer if self.optimizer in BASE_OPTIMIZERS else self.base

  @property
  def radius(self) -> float:
    return DEFAULT_RHO.get(self.optimizer, 0.0) if self.rho is None else self.rho

  @property
  def learning_rate(self) -> float:
    return DEFAULT_LR[self.base_name] if self.lr is None else self.lr


class TrainState(NamedTuple):
  """Everything a run needs to continue: checkpoint this to resume."""

  params: Any
  batch_stats: Any
  opt_state: Any
  step: jax.Array


class TrainResult(NamedTuple):
  state: TrainState
  history: list  # one dict per epoch
  seconds: float  # wall time of the whole run, compilation included
  step_seconds: float  # median over epochs of the time per train step, compilation excluded


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_loss_fn(model) -> Callable[..., Any]:
  """Training-mode loss ``(params, batch, batch_stats, dropout_rng) -> (loss, new_stats)``."""

  def loss_fn(params, batch, batch_stats, dropout_rng):
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    logits, updates = model.apply(
        variables,
        batch["x"],
        train=True,
        rngs={"dropout": dropout_rng},
        mutable=["batch_stats"] if batch_stats else [],
    )
    new_stats = updates.get("batch_stats", batch_stats) if batch_stats else batch_stats
    return cross_entropy(logits, batch["y"]), new_stats

  return loss_fn


def make_eval_loss_fn(model, batch_stats) -> Callable[[Any, Any], jax.Array]:
  """Eval-mode loss ``loss(params, batch)``: BatchNorm statistics frozen, no dropout.

  This is the ``loss_fn`` the Hessian and loss-landscape analysis use.
  """

  def loss(params, batch):
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    return cross_entropy(model.apply(variables, batch["x"], train=False), batch["y"])

  return loss


def build_optimizer(
    config: TrainConfig, grad_fn: Callable[..., Any], total_steps: int
) -> optax.GradientTransformation:
  """The optax chain of a run: [perturbation] -> weight decay -> base optimizer."""
  if config.optimizer not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {config.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
  if config.base_name not in BASE_OPTIMIZERS:
    raise ValueError(f"unknown base optimizer {config.base!r}; choose from {', '.join(BASE_OPTIMIZERS)}")
  schedule = optax.cosine_decay_schedule(config.learning_rate, max(total_steps, 1))
  if config.base_name == "sgd":
    base = optax.sgd(schedule, momentum=0.9)
  else:
    base = optax.adam(schedule)
  members = []
  rho = config.radius
  if config.optimizer == "sam":
    members.append(sam_optax.sam_perturb(grad_fn, rho=rho))
  elif config.optimizer == "asam":
    members.append(sam_optax.sam_perturb(grad_fn, rho=rho, adaptive=True))
  elif config.optimizer == "fsam":
    members.append(sam_optax.fsam_perturb(grad_fn, rho=rho, sigma=config.sigma, lmbda=config.lmbda))
  elif config.optimizer == "gsam":
    rho_schedule = sam_optax.rho_schedule_from_learning_rate(
        schedule, rho_max=rho, rho_min=0.1 * rho, lr_max=config.learning_rate, lr_min=0.0
    )
    members.append(sam_optax.gsam_perturb(grad_fn, rho=rho_schedule, alpha=config.gsam_alpha))
  elif config.optimizer == "looksam":
    members.append(
        sam_optax.looksam_perturb(grad_fn, rho=rho, k=config.looksam_k, alpha=config.looksam_alpha)
    )
  if config.weight_decay:
    members.append(optax.add_decayed_weights(config.weight_decay))
  members.append(base)
  return optax.chain(*members)


def init_state(model, tx, example_x, seed: int) -> TrainState:
  variables = model.init({"params": jax.random.key(seed), "dropout": jax.random.key(seed + 1)},
                         example_x, train=False)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  return TrainState(params, batch_stats, tx.init(params), jnp.zeros([], jnp.int32))


def take(tree: Any, index: np.ndarray) -> Any:
  """Rows ``index`` of every array of a (possibly structured) input."""
  return jax.tree.map(lambda a: a[index], tree)


def num_examples(tree: Any) -> int:
  return int(jax.tree.leaves(tree)[0].shape[0])


def epoch_batches(x, y, batch_size: int, seed: int, epoch: int) -> Iterator[dict]:
  """Shuffled full batches of epoch ``epoch``; the order depends only on (seed, epoch)."""
  n = num_examples(x)
  order = np.random.default_rng([seed, epoch]).permutation(n)
  for start in range(0, n - batch_size + 1, batch_size):
    index = order[start:start + batch_size]
    yield {"x": take(x, index), "y": y[index]}


def make_train_step(model, tx, loss_fn):
  """``step(state, batch, dropout_key, full_step=None) -> (state, loss)``.

  Pass 1 (at ``w``) keeps its BatchNorm statistics; pass 2 (inside
  ``tx.update``) sees the same batch, statistics and dropout rng.
  """

  def step(state: TrainState, batch, dropout_key, full_step=None):
    dropout_rng = jax.random.fold_in(dropout_key, state.step)

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, state.batch_stats, dropout_rng
    )
    extra = dict(batch=batch, batch_stats=state.batch_stats, dropout_rng=dropout_rng)
    if full_step is not None:
      extra["full_step"] = full_step
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, new_stats, opt_state, state.step + 1), loss

  return step


@functools.partial(jax.jit, static_argnums=0)
def _evaluation_sums(model, params, batch_stats, x, y):
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  logits = model.apply(variables, x, train=False)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return losses.sum(), (jnp.argmax(logits, -1) == y).sum()


def evaluate(model, params, batch_stats, x, y, batch_size: int = 512) -> tuple[float, float]:
  """Mean cross-entropy and accuracy (a fraction) of the eval-mode model.

  Compiled once per model and chunk shape (the model is a static argument).
  """
  n = num_examples(x)
  total_loss, correct = 0.0, 0
  for start in range(0, n, batch_size):
    index = np.arange(start, min(start + batch_size, n))
    loss_sum, right = _evaluation_sums(model, params, batch_stats, take(x, index), jnp.asarray(y[index]))
    total_loss += float(loss_sum)
    correct += int(right)
  return total_loss / n, correct / n


def train(
    model,
    x_train,
    y_train,
    config: TrainConfig,
    *,
    x_test=None,
    y_test=None,
    progress: bool = True,
    description: Optional[str] = None,
    checkpointer: Any = None,
) -> TrainResult:
  """Trains ``model`` on ``(x_train, y_train)`` as ``config`` says.

  Args:
    model: a Flax linen module with ``__call__(x, train)``.
    x_train, y_train: inputs (an array or a pytree of arrays with a leading
      example axis) and int labels.
    config: the run's hyper-parameters.
    x_test, y_test: evaluated after every epoch for the history, if given.
    progress: show a tqdm progress bar (epoch, loss, accuracy, steps/s).
    description: the progress bar's label.
    checkpointer: an object with ``restore(state) -> (state, epoch) | None``
      and ``save(state, epoch)`` (see :mod:`sam_optax.experiments.checkpoint`);
      the run resumes from the latest checkpoint and saves after each epoch.

  Returns:
    A :class:`TrainResult`.
  """
  start_time = time.perf_counter()
  n = num_examples(x_train)
  if config.batch_size > n:
    raise ValueError(f"batch size {config.batch_size} is larger than the training set ({n})")
  steps_per_epoch = n // config.batch_size
  total_steps = steps_per_epoch * config.epochs
  loss_fn = make_loss_fn(model)
  tx = build_optimizer(config, make_linen_grad_fn(loss_fn), total_steps)
  state = init_state(model, tx, take(x_train, np.arange(min(2, n))), config.seed)
  first_epoch = 0
  history: list = []
  if checkpointer is not None:
    restored = checkpointer.restore(state)
    if restored is not None:
      state, first_epoch, history = restored
  step = make_train_step(model, tx, loss_fn)
  dropout_key = jax.random.key(config.seed + 2)
  example = next(epoch_batches(x_train, y_train, config.batch_size, config.seed, 0))
  # Compile ahead of time so that step timings exclude compilation. LookSAM
  # gets its two programs (full and cheap step) from a static host-side phase.
  if config.optimizer == "looksam":
    jitted = jax.jit(step, static_argnames="full_step")
    compiled = {
        phase: jitted.lower(state, example, dropout_key, full_step=phase).compile()
        for phase in (True, False)
    }
    run_step = lambda s, b, t: compiled[t % config.looksam_k == 0](s, b, dropout_key)
  else:
    compiled_step = jax.jit(step).lower(state, example, dropout_key).compile()
    run_step = lambda s, b, t: compiled_step(s, b, dropout_key)

  bar = None
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

    bar = tqdm(total=total_steps, initial=first_epoch * steps_per_epoch,
               desc=description or config.optimizer, unit="step", leave=True, dynamic_ncols=True)
  epoch_step_seconds = []
  for epoch in range(first_epoch, config.epochs):
    epoch_start = time.perf_counter()
    losses = []
    for i, batch in enumerate(epoch_batches(x_train, y_train, config.batch_size, config.seed, epoch)):
      state, loss = run_step(state, batch, epoch * steps_per_epoch + i)
      losses.append(loss)
      if bar is not None:
        bar.update(1)
    mean_loss = float(jnp.mean(jnp.stack(losses)))  # blocks until the epoch is done
    elapsed = time.perf_counter() - epoch_start
    epoch_step_seconds.append(elapsed / steps_per_epoch)
    record = {"epoch": epoch + 1, "train_batch_loss": mean_loss, "steps_per_second": steps_per_epoch / elapsed}
    if x_test is not None:
      record["test_loss"], record["test_acc"] = evaluate(model, state.params, state.batch_stats, x_test, y_test)
    history.append(record)
    if bar is not None:
      postfix = {"epoch": f"{epoch + 1}/{config.epochs}", "loss": f"{mean_loss:.3f}",
                 "steps/s": f"{record['steps_per_second']:.0f}"}
      if "test_acc" in record:
        postfix["test_acc"] = f"{record['test_acc']:.3f}"
      bar.set_postfix(postfix)
    if checkpointer is not None:
      checkpointer.save(state, epoch + 1, history)
  if bar is not None:
    bar.close()
  seconds = time.perf_counter() - start_time
  step_seconds = float(np.median(epoch_step_seconds)) if epoch_step_seconds else float("nan")
  return TrainResult(state, history, seconds, step_seconds)
