"""Training one model with one optimizer: the loop behind ``sam-optax compare``.

Any model of :mod:`sam_optax.experiments.models` (Flax linen, ``__call__(x,
train)``; BatchNorm in ``batch_stats``, dropout on the ``'dropout'`` rng) is
trained with a base optimizer (SGD with momentum, or Adam) or its
sharpness-aware version from :mod:`sam_optax`, with a cosine learning-rate
schedule and weight decay. Runs are deterministic for a seed: the data order
of epoch ``e`` and the dropout key of step ``t`` are functions of ``(seed, e)``
and ``(seed, t)``, so a run resumed from a checkpoint continues on the same
trajectory.

With a sharpness-aware optimizer the loop also logs the sharpness SAM
minimises, ``L(w + eps) - L(w)`` (Foret et al. 2021, eq. 1), for free: the
perturbation is built with ``value_and_grad=True`` so its second pass returns
``L(w + eps)`` (``perturbed_loss`` in the optimizer state) next to the gradient,
and the first pass gives ``L(w)``. :func:`train_sweep` trains one optimizer at
several radii rho in one compiled program (``jax.vmap`` of the train step over
rho) when the installed ``sam_optax`` accepts a traced rho.
"""

from __future__ import annotations

import dataclasses
import functools
import math
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


def _traced_or(value: Any, check: Callable[[float], bool]) -> bool:
  return isinstance(value, jax.core.Tracer) or check(float(value))


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
    group_size: m-sharpness: one perturbation per group of ``group_size``
      examples of the batch (Foret et al. 2021, section 4.1); ``None``: one
      perturbation for the whole batch.
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
  group_size: Optional[int] = None

  def __post_init__(self):
    """Refuses what would otherwise train silently wrong (a NaN weight decay or learning rate) or fail late."""
    def integer(value):
      return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    def finite(value):  # a real number (a 0-d array too), not a bool; a tracer cannot be checked and passes
      if isinstance(value, jax.core.Tracer):
        return True
      if isinstance(value, (bool, np.bool_, str)):
        return False
      try:
        return np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.number) and \
            math.isfinite(float(value))
      except (TypeError, ValueError):
        return False

    for argument in ("epochs", "batch_size", "looksam_k"):
      value = getattr(self, argument)
      if not integer(value) or value < 1:
        raise ValueError(f"TrainConfig: {argument} must be an int >= 1, got {value!r}")
    if not integer(self.seed):
      raise ValueError(f"TrainConfig: seed must be an int, got {self.seed!r}")
    if self.lr is not None and not (finite(self.lr) and _traced_or(self.lr, lambda v: v > 0)):
      raise ValueError(f"TrainConfig: lr must be None or a finite number > 0, got {self.lr!r}")
    for argument in ("weight_decay", "sigma", "gsam_alpha", "looksam_alpha"):
      value = getattr(self, argument)
      if not (finite(value) and _traced_or(value, lambda v: v >= 0)):
        raise ValueError(f"TrainConfig: {argument} must be a finite number >= 0, got {value!r}")
    if self.rho is not None and not (finite(self.rho) and _traced_or(self.rho, lambda v: v >= 0)):
      raise ValueError(f"TrainConfig: rho must be None or a finite number >= 0, got {self.rho!r}")

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
  # Median over epochs of the time per train step, compilation and the first step excluded. A run
  # restored whole from a checkpoint reports the step times its history recorded (NaN if none).
  step_seconds: float


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
    config: TrainConfig, grad_fn: Callable[..., Any], total_steps: int, *, rho: Any = None,
    value_and_grad: bool = False,
) -> optax.GradientTransformation:
  """The optax chain of a run: [perturbation] -> weight decay -> base optimizer.

  ``rho`` overrides ``config.radius`` and may be a traced scalar (a rho sweep
  under ``jax.vmap``). ``value_and_grad=True``: ``grad_fn`` returns ``(loss,
  gradient)`` and the perturbation's state records ``perturbed_loss``.
  """
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
  rho = config.radius if rho is None else rho
  options = {}
  if value_and_grad:
    options["value_and_grad"] = True
  if config.group_size is not None:
    if config.group_size < 1:
      raise ValueError(f"group_size must be a positive number of examples, got {config.group_size}")
    options["group_size"] = config.group_size
  if config.optimizer == "sam":
    members.append(sam_optax.sam_perturb(grad_fn, rho=rho, **options))
  elif config.optimizer == "asam":
    members.append(sam_optax.sam_perturb(grad_fn, rho=rho, adaptive=True, **options))
  elif config.optimizer == "fsam":
    members.append(sam_optax.fsam_perturb(grad_fn, rho=rho, sigma=config.sigma, lmbda=config.lmbda, **options))
  elif config.optimizer == "gsam":
    rho_schedule = sam_optax.rho_schedule_from_learning_rate(
        schedule, rho_max=rho, rho_min=0.1 * rho, lr_max=config.learning_rate, lr_min=0.0
    )
    members.append(sam_optax.gsam_perturb(grad_fn, rho=rho_schedule, alpha=config.gsam_alpha, **options))
  elif config.optimizer == "looksam":
    members.append(
        sam_optax.looksam_perturb(grad_fn, rho=rho, k=config.looksam_k, alpha=config.looksam_alpha, **options)
    )
  if config.weight_decay:
    members.append(optax.add_decayed_weights(config.weight_decay))
  members.append(base)
  return optax.chain(*members)


@functools.partial(jax.jit, static_argnums=0)
def _init_variables(model, keys, x):
  # One compiled program per model and input shape (eager init compiles every op separately).
  return model.init(keys, x, train=False)


def init_state(model, tx, example_x, seed: int) -> TrainState:
  variables = _init_variables(model, {"params": jax.random.key(seed), "dropout": jax.random.key(seed + 1)},
                              example_x)
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


def make_train_step(model, tx, loss_fn, *, log_sharpness: bool = False):
  """``step(state, batch, dropout_key, full_step=None) -> (state, metrics)``.

  Pass 1 (at ``w``) keeps its BatchNorm statistics; pass 2 (inside
  ``tx.update``) sees the same batch, statistics and dropout rng. ``metrics``
  has the batch loss ``L(w)`` and, with ``log_sharpness`` (the perturbation
  built with ``value_and_grad=True``), ``sharpness = L(w + eps) - L(w)``.
  """
  del model

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
    metrics = {"loss": loss}
    if log_sharpness:
      metrics["sharpness"] = optax.tree_utils.tree_get(opt_state, "perturbed_loss") - loss
    return TrainState(params, new_stats, opt_state, state.step + 1), metrics

  return step


@functools.partial(jax.jit, static_argnums=0)
def _evaluation_sums(model, params, batch_stats, x, y, mask):
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  logits = model.apply(variables, x, train=False)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return (losses * mask).sum(), ((jnp.argmax(logits, -1) == y) * mask).sum()


def evaluate(model, params, batch_stats, x, y, batch_size: int = 512) -> tuple[float, float]:
  """Mean cross-entropy and accuracy (a fraction) of the eval-mode model.

  Chunks of ``batch_size`` examples, the last one padded (and masked), so a
  model compiles once whatever the set's size (the model is a static argument).
  """
  n = num_examples(x)
  chunk = batch_size
  total_loss, correct = 0.0, 0
  for start in range(0, n, chunk):
    index = np.arange(start, min(start + chunk, n))
    mask = np.ones(chunk, np.float32)
    mask[len(index):] = 0.0
    index = np.concatenate([index, np.full(chunk - len(index), index[0])])
    loss_sum, right = _evaluation_sums(model, params, batch_stats, take(x, index), jnp.asarray(y[index]),
                                       jnp.asarray(mask))
    total_loss += float(loss_sum)
    correct += int(right)
  return total_loss / n, correct / n


def _run_setup(model, x_train, config: TrainConfig):
  """(n, steps per epoch, total steps, loss_fn, whether sharpness is logged, grad_fn) of a run."""
  n = num_examples(x_train)
  if config.batch_size > n:
    raise ValueError(f"batch size {config.batch_size} is larger than the training set ({n})")
  steps_per_epoch = n // config.batch_size
  log_sharpness = _logs_sharpness(config)
  loss_fn = make_loss_fn(model)
  grad_fn = make_linen_grad_fn(loss_fn, value_and_grad=log_sharpness)
  return n, steps_per_epoch, steps_per_epoch * config.epochs, loss_fn, log_sharpness, grad_fn


def _logs_sharpness(config: TrainConfig) -> bool:
  return config.optimizer in SHARPNESS_AWARE


def _compile_steps(step, state, example, dropout_key, config: TrainConfig, transform=None):
  """Compiled step(s) ahead of time (timings exclude compilation); ``run(state, batch, t)``.

  LookSAM gets its two programs (full and cheap step) from a static host-side
  phase. ``transform`` (e.g. a vmap over rho) wraps the step before jit.
  """
  transform = transform or (lambda f: f)
  if config.optimizer == "looksam":
    compiled = {
        phase: jax.jit(transform(functools.partial(step, full_step=phase))).lower(
            state, example, dropout_key).compile()
        for phase in (True, False)
    }
    return lambda s, b, t: compiled[t % config.looksam_k == 0](s, b, dropout_key)
  compiled_step = jax.jit(transform(step)).lower(state, example, dropout_key).compile()
  return lambda s, b, t: compiled_step(s, b, dropout_key)


def _loop(state, run_step, x_train, y_train, config: TrainConfig, *, histories: list, first_epoch: int,
          evaluate_fn, bar, checkpointer=None) -> tuple[Any, list]:
  """The epoch loop shared by :func:`train` (one run) and :func:`train_sweep` (runs stacked on axis 0).

  ``evaluate_fn(state) -> [(loss, acc) per run]`` or None. Each history record
  holds the epoch's mean batch loss, mean sharpness (if logged), steps/s and
  the evaluation. Returns ``(state, per-epoch seconds per step)``.
  """
  n = num_examples(x_train)
  steps_per_epoch = n // config.batch_size
  epoch_step_seconds = []
  for epoch in range(first_epoch, config.epochs):
    epoch_start = time.perf_counter()
    timed_steps = 0
    metrics = []
    for i, batch in enumerate(epoch_batches(x_train, y_train, config.batch_size, config.seed, epoch)):
      state, step_metrics = run_step(state, batch, epoch * steps_per_epoch + i)
      metrics.append(step_metrics)
      timed_steps += 1
      if epoch == first_epoch and i == 0 and steps_per_epoch > 1:
        # The run's first execution pays one-time costs (buffer allocation,
        # first dispatch: 3-15x a step on XLA:CPU); it is not timed, so one
        # short epoch still gives comparable step times across optimizers.
        jax.block_until_ready((state, step_metrics))
        epoch_start, timed_steps = time.perf_counter(), 0
      if bar is not None:
        bar.update(1)
    # Epoch means per run, on the host (blocks until the epoch is done; no
    # eager jnp op, whose first-call compilation would land in the first
    # optimizer's step time).
    metrics = jax.device_get(metrics)
    means = {k: np.atleast_1d(np.mean(np.stack([m[k] for m in metrics]), axis=0, dtype=np.float64))
             for k in metrics[0]}
    elapsed = time.perf_counter() - epoch_start
    epoch_step_seconds.append(elapsed / timed_steps)
    evaluations = evaluate_fn(state) if evaluate_fn is not None else None
    for r, history in enumerate(histories):
      record = {"epoch": epoch + 1, "train_batch_loss": float(means["loss"][r]),
                "steps_per_second": timed_steps / elapsed}
      if "sharpness" in means:
        record["sharpness"] = float(means["sharpness"][r])
      if evaluations is not None:
        record["test_loss"], record["test_acc"] = evaluations[r]
      history.append(record)
    if bar is not None:
      record = histories[0][-1]
      postfix = {"epoch": f"{epoch + 1}/{config.epochs}", "loss": f"{record['train_batch_loss']:.3f}",
                 "steps/s": f"{record['steps_per_second']:.0f}"}
      if "sharpness" in record:
        postfix["sharp"] = f"{record['sharpness']:.2g}"
      if "test_acc" in record:
        postfix["eval_acc" if len(histories) > 1 else "test_acc"] = f"{record['test_acc']:.3f}"
      bar.set_postfix(postfix)
    if checkpointer is not None:
      checkpointer.save(state, epoch + 1, histories[0])
  return state, epoch_step_seconds


def _progress_bar(progress: bool, total: int, initial: int, description: str):
  if not progress:
    return None
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  return tqdm(total=total, initial=initial, desc=description, unit="step", leave=True, dynamic_ncols=True)


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
    x_test, y_test: evaluated after every epoch for the history, if given
      (the study passes its validation split here, never the test set).
    progress: show a tqdm progress bar (epoch, loss, sharpness, accuracy, steps/s).
    description: the progress bar's label.
    checkpointer: an object with ``restore(state) -> (state, epoch, history) | None``
      and ``save(state, epoch, history)`` (see :mod:`sam_optax.experiments.checkpoint`);
      the run resumes from the latest checkpoint and saves after each epoch.
      A :class:`~sam_optax.experiments.checkpoint.Checkpointer` given the run's
      ``config`` refuses a checkpoint of another configuration
      (``ConfigMismatchError``) before anything is trained.

  Returns:
    A :class:`TrainResult`. Each history record has ``epoch``,
    ``train_batch_loss``, ``steps_per_second``, ``sharpness`` (the epoch's mean
    ``L(w + eps) - L(w)``, sharpness-aware optimizers only) and, with a test
    set, ``test_loss`` and ``test_acc``.

  Example (one epoch of SAM on 256 digits; :func:`evaluate` scores the result)::

      >>> from sam_optax.experiments.data import load_dataset
      >>> from sam_optax.experiments.models import get_model
      >>> dataset = load_dataset("digits", train_size=256, test_size=64)
      >>> model = get_model("mlp", dataset.num_classes)
      >>> config = TrainConfig(optimizer="sam", rho=0.05, epochs=1, batch_size=64)
      >>> result = train(model, dataset.x_train, dataset.y_train, config,
      ...                x_test=dataset.x_test, y_test=dataset.y_test, progress=False)
      >>> sorted(result.history[-1])
      ['epoch', 'sharpness', 'steps_per_second', 'test_acc', 'test_loss', 'train_batch_loss']
      >>> loss, accuracy = evaluate(model, result.state.params, result.state.batch_stats,
      ...                           dataset.x_test, dataset.y_test)
      >>> 0.0 <= accuracy <= 1.0
      True
  """
  start_time = time.perf_counter()
  n, steps_per_epoch, total_steps, loss_fn, log_sharpness, grad_fn = _run_setup(model, x_train, config)
  tx = build_optimizer(config, grad_fn, total_steps, value_and_grad=log_sharpness)
  state = init_state(model, tx, take(x_train, np.arange(min(2, n))), config.seed)
  first_epoch = 0
  history: list = []
  if checkpointer is not None:
    restored = checkpointer.restore(state)
    if restored is not None:
      state, first_epoch, history = restored
  step = make_train_step(model, tx, loss_fn, log_sharpness=log_sharpness)
  dropout_key = jax.random.key(config.seed + 2)
  example = next(epoch_batches(x_train, y_train, config.batch_size, config.seed, 0))
  run_step = _compile_steps(step, state, example, dropout_key, config)
  evaluate_fn = None
  if x_test is not None:
    evaluate_fn = lambda s: [evaluate(model, s.params, s.batch_stats, x_test, y_test)]
  bar = _progress_bar(progress, total_steps, first_epoch * steps_per_epoch, description or config.optimizer)
  state, epoch_step_seconds = _loop(state, run_step, x_train, y_train, config, histories=[history],
                                    first_epoch=first_epoch, evaluate_fn=evaluate_fn, bar=bar,
                                    checkpointer=checkpointer)
  if bar is not None:
    bar.close()
  seconds = time.perf_counter() - start_time
  if epoch_step_seconds:
    step_seconds = float(np.median(epoch_step_seconds))
  else:  # every epoch came from the checkpoint: the step times its history recorded
    saved = [1.0 / record["steps_per_second"] for record in history if record.get("steps_per_second")]
    step_seconds = float(np.median(saved)) if saved else float("nan")
  return TrainResult(state, history, seconds, step_seconds)


class SweepResult(NamedTuple):
  """The runs of :func:`train_sweep`, in the order of ``rhos``."""

  results: list  # one TrainResult per rho
  vmapped: bool  # True: one program trained every rho (jax.vmap over rho)
  seconds: float  # wall time of the whole sweep, compilation included
  note: str  # why the sweep ran sequentially, if it did


def unstack(tree: Any, index: int) -> Any:
  """Run ``index`` of a state whose arrays are stacked on axis 0."""
  return jax.tree.map(lambda a: a[index], tree)


def train_sweep(
    model,
    x_train,
    y_train,
    config: TrainConfig,
    rhos,
    *,
    x_eval=None,
    y_eval=None,
    vmap: bool = True,
    progress: bool = True,
    description: Optional[str] = None,
) -> SweepResult:
  """Trains ``config`` once per radius in ``rhos``; one compiled program for all of them if it can.

  With ``vmap=True``, a sharpness-aware ``config.optimizer`` and a
  ``sam_optax`` whose perturbations accept a traced rho, the train step is
  ``jax.vmap``-ed over the vector ``rhos``: every run starts from the same
  initialisation (the seed's), sees the same batches and dropout keys, and
  equals the separate run ``train(..., dataclasses.replace(config, rho=r))``
  up to float rounding. Otherwise (or if tracing fails) the runs are
  sequential calls of :func:`train`.

  Args:
    model, x_train, y_train, config: as for :func:`train`; ``config.rho`` is ignored.
    rhos: the radii.
    x_eval, y_eval: evaluated after every epoch for every run (the history's
      ``test_loss``/``test_acc``): pass a validation split to choose rho.
    vmap: try the single vmapped program.
    progress, description: one progress bar for the sweep.

  Returns:
    A :class:`SweepResult`. With vmap, each run's ``seconds`` is the sweep's
    wall time divided by the number of runs and ``step_seconds`` the time of
    one vmapped step (all runs) divided by the number of runs.
  """
  rhos = [float(r) for r in rhos]
  if not rhos:
    raise ValueError("rhos must list at least one radius")
  note = ""
  if not vmap:
    note = "vmap disabled"
  elif config.optimizer not in SHARPNESS_AWARE:
    note = f"{config.optimizer} has no rho"
  if not note:
    try:
      return _train_vmapped(model, x_train, y_train, config, rhos, x_eval=x_eval, y_eval=y_eval,
                            progress=progress, description=description)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError, TypeError) as error:
      note = f"vmap over rho failed ({type(error).__name__}); ran sequentially"
  start = time.perf_counter()
  results = [
      train(model, x_train, y_train, dataclasses.replace(config, rho=rho), x_test=x_eval, y_test=y_eval,
            progress=progress, description=f"{description or config.optimizer} rho={rho:g}")
      for rho in rhos
  ]
  return SweepResult(results, False, time.perf_counter() - start, note)


def _train_vmapped(model, x_train, y_train, config: TrainConfig, rhos, *, x_eval, y_eval, progress,
                   description) -> SweepResult:
  start_time = time.perf_counter()
  n, steps_per_epoch, total_steps, loss_fn, log_sharpness, grad_fn = _run_setup(model, x_train, config)
  build = lambda rho: build_optimizer(config, grad_fn, total_steps, rho=rho, value_and_grad=log_sharpness)
  # Same initialisation for every rho (as separate runs with this seed); states stacked on axis 0.
  single = init_state(model, build(rhos[0]), take(x_train, np.arange(min(2, n))), config.seed)
  count = len(rhos)
  state = jax.tree.map(lambda a: jnp.broadcast_to(a, (count,) + a.shape), single)
  rho_vector = jnp.asarray(rhos, jnp.float32)

  def step(stacked, batch, dropout_key, full_step=None):
    def one(run_state, rho):
      return make_train_step(model, build(rho), loss_fn, log_sharpness=log_sharpness)(
          run_state, batch, dropout_key, full_step)
    return jax.vmap(one)(stacked, rho_vector)

  dropout_key = jax.random.key(config.seed + 2)
  example = next(epoch_batches(x_train, y_train, config.batch_size, config.seed, 0))
  run_step = _compile_steps(step, state, example, dropout_key, config)
  evaluate_fn = None
  if x_eval is not None:
    evaluate_fn = lambda s: [evaluate(model, unstack(s.params, r), unstack(s.batch_stats, r), x_eval, y_eval)
                             for r in range(count)]
  label = description or config.optimizer
  bar = _progress_bar(progress, total_steps, 0, f"{label} rho={','.join(f'{r:g}' for r in rhos)} (vmap)")
  histories = [[] for _ in rhos]
  state, epoch_step_seconds = _loop(state, run_step, x_train, y_train, config, histories=histories,
                                    first_epoch=0, evaluate_fn=evaluate_fn, bar=bar)
  if bar is not None:
    bar.close()
  seconds = time.perf_counter() - start_time
  step_seconds = float(np.median(epoch_step_seconds)) / count
  results = [TrainResult(unstack(state, r), histories[r], seconds / count, step_seconds) for r in range(count)]
  return SweepResult(results, True, seconds, "")
