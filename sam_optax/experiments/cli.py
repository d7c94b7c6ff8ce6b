"""The ``sam-optax`` command line: ``sam-optax compare`` and ``sam-optax study`` (also ``python -m sam_optax``).

``study`` reproduces the SAM study's Table I across its three architectures,
choosing rho on a validation split (see :mod:`sam_optax.experiments.study`).

Trains the same model with a base optimizer and its sharpness-aware versions on
a real dataset, then prints a table like Table I of the SAM study (train/test
loss and accuracy, generalization gap, Hessian lambda_max and
|lambda_max/lambda_min|, wall time, step time relative to the base optimizer)
and writes ``results.json``, ``results.csv`` and PNG plots (training curves,
1D/2D filter-normalized loss landscapes, Hessian spectral density).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Optional, Sequence

import numpy as np

from sam_optax.experiments.data import DATASETS, DatasetError, check_dataset_name

ANALYSIS_EXAMPLES = 256  # training examples the Hessian and landscapes are computed on (PyHessian uses 200)
# The study analyses six models: 128 examples keep its default run within 5 minutes on 2 CPU cores
# (4 min 27 s, against 5 min 22 s with 256).
STUDY_ANALYSIS_EXAMPLES = 128


class UsageError(Exception):
  """A bad option: reported as one line, exit status 2, no traceback."""


def _int_list(text: str) -> list[int]:
  try:
    return [int(s) for s in text.split(",") if s.strip()]
  except ValueError as error:
    raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}") from error


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="sam-optax",
      description="Sharpness-aware minimization in JAX/Optax: compare optimizers on real data.",
  )
  commands = parser.add_subparsers(dest="command", required=True)
  compare = commands.add_parser(
      "compare",
      help="train the same model with a base optimizer, SAM and F-SAM and compare them",
      description=(
          "Train one model with several optimizers on a real dataset and report train/test "
          "loss and accuracy, the generalization gap, Hessian sharpness and loss landscapes."
      ),
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  compare.add_argument("--dataset", default="digits",
                       help=f"one of {', '.join(DATASETS)}, or tu:NAME for any TUDataset (digits is "
                            "bundled with scikit-learn; see the README for where the others' files go)")
  compare.add_argument("--data-dir", default=None, help="where dataset files are (Fashion-MNIST idx, CIFAR pickles)")
  compare.add_argument("--model", default="auto",
                       help="auto (the dataset's model in the README's table), mlp, cnn, wrn, transformer, gcn")
  compare.add_argument("--optimizers", default=None,
                       help="comma list from sgd, adam, sam, asam, fsam, gsam, looksam "
                            "(default: BASE,sam,fsam)")
  compare.add_argument("--base", default="sgd", help="base optimizer: sgd (momentum 0.9) or adam")
  compare.add_argument("--rho", type=float, default=None,
                       help="SAM radius (default per optimizer: 0.05; asam 0.5)")
  compare.add_argument("--sigma", type=float, default=1.0, help="F-SAM: weight of the removed gradient EMA")
  compare.add_argument("--lmbda", type=float, default=0.9, help="F-SAM: EMA decay in [0, 1)")
  compare.add_argument("--group-size", type=int, default=None,
                       help="m-sharpness: one perturbation per group of this many examples of a batch "
                            "(default: one for the whole batch)")
  compare.add_argument("--epochs", type=int, default=25)
  compare.add_argument("--batch-size", type=int, default=64)
  compare.add_argument("--lr", type=float, default=None, help="peak learning rate (default: sgd 0.05, adam 1e-3)")
  compare.add_argument("--weight-decay", type=float, default=5e-4)
  compare.add_argument("--label-noise", type=float, default=0.0,
                       help="fraction of training labels replaced by a different random class")
  compare.add_argument("--seeds", type=_int_list, default=[0],
                       help="comma list of distinct integers >= 0; several give mean ± std")
  compare.add_argument("--train-size", type=int, default=None, help="use only this many training examples")
  compare.add_argument("--test-size", type=int, default=None, help="use only this many test examples")
  compare.add_argument("--out", default="runs/compare", help="output directory")
  compare.add_argument("--no-analysis", action="store_true", help="skip the Hessian and loss-landscape analysis")
  compare.add_argument("--analysis-examples", type=int, default=ANALYSIS_EXAMPLES,
                       help="training examples the Hessian and loss landscapes are computed on")
  compare.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
  compare.add_argument("--checkpoint-dir", default=None,
                       help="save a checkpoint after every epoch and resume from the latest one (refused if "
                            "it was saved with other training options)")
  compare.add_argument("--no-progress", action="store_true", help="hide the progress bars")

  study = commands.add_parser(
      "study",
      help="reproduce the SAM study's Table I: WideResNet, Transformer and GCN, base vs SAM, rho chosen "
           "on validation data",
      description=(
          "For each of the study's three (architecture, data) pairs -- WideResNet on images, a Transformer "
          "encoder on time series, a GCN on graphs -- train the study's base optimizer (SGD+momentum, "
          "SGD+momentum, Adam) and SAM at every rho of a grid, choose rho by accuracy on a validation split "
          "held out from the training set (never the test set), and write Table I, the study's Figures 2 "
          "and 3, the rho-selection plot and the Hessian spectral densities."
      ),
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  study.add_argument("--out", default="runs/study", help="output directory")
  study.add_argument("--models", default="wrn,attention,gcn", help="comma list from wrn, attention, gcn")
  study.add_argument("--optimizers", default="sam",
                     help="sharpness-aware optimizers to add, each with rho chosen from the grid: comma list "
                          "from sam, asam, fsam, gsam, looksam (asam's default grid is 10x)")
  study.add_argument("--rho-grid", action="append", default=None, metavar="[MODEL=]R1,R2,...",
                     help="the rho grid, for every model (0.05,0.5) or one (gcn=0.01,0.05); repeatable. "
                          "Default: four values per model (wrn 0.05,0.2,0.5,2; attention 0.05,0.2,0.5,1; "
                          "gcn 0.01,0.05,0.1,0.5)")
  study.add_argument("--seeds", type=_int_list, default=[0],
                     help="comma list of distinct integers >= 0; several give mean ± std")
  study.add_argument("--full", action="store_true",
                     help="the study's scale: WRN-28-10 on CIFAR-10 (tfds / Hugging Face / --data-dir), the "
                          "Transformer on MIT-BIH and the GCN on Mutagenicity (files in --data-dir), long schedules")
  study.add_argument("--data-dir", default=None,
                     help="folder with mitbih_train.csv/mitbih_test.csv and/or Mutagenicity/ (TUDataset text "
                          "format): sets found there replace the offline defaults; with --full also "
                          "cifar-10-batches-py/ (CIFAR-10 is used only with --full)")
  study.add_argument("--epochs", type=int, default=None, help="override every model's epochs")
  study.add_argument("--train-size", type=int, default=None, help="use only this many training examples per model")
  study.add_argument("--test-size", type=int, default=None, help="use only this many test examples per model")
  study.add_argument("--validation-fraction", type=float, default=0.2,
                     help="fraction of the training set held out to choose rho")
  study.add_argument("--analysis-examples", type=int, default=STUDY_ANALYSIS_EXAMPLES,
                     help="training examples the Hessian and loss landscapes are computed on")
  study.add_argument("--no-vmap", action="store_true",
                     help="train the rho grid as sequential runs instead of one vmapped program")
  study.add_argument("--no-plots", action="store_true", help="do not write the figures (and skip the landscapes)")
  study.add_argument("--no-progress", action="store_true", help="hide the progress bars")
  return parser


def _parse_optimizers(text: Optional[str], base: str) -> list[str]:
  from sam_optax.experiments.train import OPTIMIZERS  # pylint: disable=import-outside-toplevel

  names = [name.strip().lower() for name in (text or f"{base},sam,fsam").split(",") if name.strip()]
  unknown = [name for name in names if name not in OPTIMIZERS]
  if unknown:
    raise UsageError(f"unknown optimizer(s) {', '.join(unknown)}; choose from {', '.join(OPTIMIZERS)}")
  if len(set(names)) != len(names):
    raise UsageError(f"--optimizers lists a name twice: {text}")
  return names


def check_seeds(seeds: Sequence[int]) -> None:
  """Raises :class:`UsageError` unless ``seeds`` lists distinct integers >= 0 (numpy's generators refuse
  negative seeds; a repeated seed fakes a spread of zero).

  Example::

      >>> check_seeds([0, 1, 2])
      >>> check_seeds([0, 0])
      Traceback (most recent call last):
      ...
      sam_optax.experiments.cli.UsageError: --seeds lists a seed twice: 0,0
  """
  if not seeds:
    raise UsageError("--seeds needs at least one seed")
  listed = ",".join(str(seed) for seed in seeds)
  if any(seed < 0 for seed in seeds):
    raise UsageError(f"--seeds must be integers >= 0, got {listed}")
  if len(set(seeds)) != len(seeds):
    raise UsageError(f"--seeds lists a seed twice: {listed}")


def validate_study(args: argparse.Namespace):
  """The study's options as a :class:`~sam_optax.experiments.study.StudyOptions` (UsageError if bad)."""
  from sam_optax.experiments import study  # pylint: disable=import-outside-toplevel
  from sam_optax.experiments.train import SHARPNESS_AWARE  # pylint: disable=import-outside-toplevel

  models = [m.strip() for m in args.models.split(",") if m.strip()]
  unknown = [m for m in models if m not in study.MODEL_KEYS]
  if unknown or not models or len(set(models)) != len(models):
    raise UsageError(f"--models must list some of {', '.join(study.MODEL_KEYS)} once each, got {args.models!r}")
  optimizers = [o.strip().lower() for o in args.optimizers.split(",") if o.strip()]
  bad = [o for o in optimizers if o not in SHARPNESS_AWARE]
  if bad or not optimizers or len(set(optimizers)) != len(optimizers):
    raise UsageError(f"--optimizers must list some of {', '.join(SHARPNESS_AWARE)} once each "
                     f"(the base optimizer is always run), got {args.optimizers!r}")
  try:
    grids = study.parse_rho_grid(args.rho_grid)
  except ValueError as error:
    raise UsageError(str(error)) from error
  check_seeds(args.seeds)
  if not 0 < args.validation_fraction < 1:
    raise UsageError(f"--validation-fraction must be in (0, 1), got {args.validation_fraction}")
  for name in ("epochs", "train_size", "test_size", "analysis_examples"):
    value = getattr(args, name)
    if value is not None and value < 1:
      raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")
  return study.StudyOptions(
      out=args.out, models=models, optimizers=optimizers, rho_grid=grids, seeds=args.seeds, full=args.full,
      data_dir=args.data_dir, epochs=args.epochs, train_size=args.train_size, test_size=args.test_size,
      validation_fraction=args.validation_fraction, analysis_examples=args.analysis_examples,
      vmap=not args.no_vmap, progress=not args.no_progress, plots=not args.no_plots)


def validate(args: argparse.Namespace) -> None:
  if args.rho is not None and not (math.isfinite(args.rho) and args.rho >= 0):
    raise UsageError(f"--rho must be a finite number >= 0, got {args.rho}")
  if not 0 <= args.lmbda < 1:
    raise UsageError(f"--lmbda must be in [0, 1), got {args.lmbda}")
  if not (math.isfinite(args.sigma) and args.sigma >= 0):
    raise UsageError(f"--sigma must be a finite number >= 0, got {args.sigma}")
  if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
    raise UsageError(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")
  if not 0 <= args.label_noise <= 1:
    raise UsageError(f"--label-noise must be a fraction in [0, 1], got {args.label_noise}")
  if args.epochs < 1 or args.batch_size < 1:
    raise UsageError("--epochs and --batch-size must be positive")
  group_size = getattr(args, "group_size", None)
  if group_size is not None and (group_size < 1 or args.batch_size % group_size):
    raise UsageError(f"--group-size must be a positive divisor of --batch-size ({args.batch_size}), got {group_size}")
  if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
    raise UsageError(f"--lr must be a finite number > 0, got {args.lr}")
  if args.base not in ("sgd", "adam"):
    raise UsageError(f"--base must be sgd or adam, got {args.base!r}")
  check_seeds(args.seeds)
  if args.analysis_examples < 1:
    raise UsageError("--analysis-examples must be positive")
  for name in ("train_size", "test_size"):
    value = getattr(args, name)
    if value is not None and value < 1:
      raise UsageError(f"--{name.replace('_', '-')} must be positive")


DEFAULT_MODEL = {
    "digits": "cnn", "fashion_mnist": "cnn", "cifar10": "wrn", "cifar100": "wrn",
    "gunpoint": "transformer", "italy_power_demand": "transformer",
    "synthetic_sequences": "transformer", "synthetic_graphs": "gcn", "mitbih": "transformer",
    "mutagenicity": "gcn",
}


def default_model(dataset: str) -> str:
  """The model ``--model auto`` trains on ``dataset`` (``tu:NAME`` graph sets get ``gcn``).

  Example::

      >>> default_model("fashion_mnist"), default_model("mitbih"), default_model("tu:MUTAG")
      ('cnn', 'transformer', 'gcn')
  """
  return "gcn" if dataset.startswith("tu:") else DEFAULT_MODEL[dataset]


def _mean_std(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
  # None: not computed. NaN/inf (a diverged seed) are kept, so the mean shows the divergence.
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  return float(np.mean(values)), float(np.std(values))


METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "gen_gap", "lambda_max",
           "lambda_min", "lambda_ratio", "hessian_trace", "sharpness", "seconds", "step_time_ratio")


def last_epoch_sharpness(history: list) -> Optional[float]:
  """The last epoch's mean L(w+eps) - L(w) of a run's history (None if not logged)."""
  return history[-1].get("sharpness") if history else None


def summarise(per_seed: dict[str, list[dict]]) -> dict[str, dict]:
  """``{optimizer: per-seed records}`` -> the ``runs`` of results.json (means, stds, per_seed)."""
  runs = {}
  for name, records in per_seed.items():
    summary: dict[str, Any] = {}
    for metric in METRICS:
      summary[metric], summary[metric + "_std"] = _mean_std([r.get(metric) for r in records])
    summary["diverged"] = any(bool(r.get("diverged")) for r in records)
    summary["per_seed"] = records
    runs[name] = summary
  return runs


def checkpoint_config(args: argparse.Namespace, config, model_name: str, dataset) -> dict:
  """What determines a compare run's training, recorded with its checkpoint: only a run with the same values
  resumes it (``config``: the run's :class:`~sam_optax.experiments.train.TrainConfig`; defaults resolved)."""
  from sam_optax.experiments.train import SHARPNESS_AWARE  # pylint: disable=import-outside-toplevel

  record = {
      "dataset": args.dataset, "model": model_name, "optimizer": config.optimizer, "base": config.base_name,
      "epochs": config.epochs, "batch_size": config.batch_size, "lr": float(config.learning_rate),
      "weight_decay": float(config.weight_decay), "label_noise": float(args.label_noise),
      "train_size": int(len(dataset.y_train)), "test_size": int(len(dataset.y_test)), "seed": config.seed,
  }
  if config.optimizer in SHARPNESS_AWARE:
    record.update(rho=float(config.radius), group_size=config.group_size)
  if config.optimizer == "fsam":
    record.update(sigma=float(config.sigma), lmbda=float(config.lmbda))
  return record


def _mismatch_message(directory: str, error) -> str:
  if not error.differences:
    return (f"--checkpoint-dir: {directory} holds a checkpoint that records no configuration (saved by an older "
            f"version); delete it or pass another --checkpoint-dir")
  listed = ", ".join(f"--{key.replace('_', '-')} {old} (now {new})" for key, old, new in error.differences)
  return (f"--checkpoint-dir: {directory} was saved by a run with other options: {listed}; rerun with those, "
          f"delete it or pass another --checkpoint-dir")


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
  if numerator is None or denominator is None or not (math.isfinite(numerator) and math.isfinite(denominator)):
    return None
  return numerator / denominator if denominator > 0 else None


def run_compare(args: argparse.Namespace) -> dict:
  """Runs the comparison and writes every output; returns the results dict."""
  # Heavy imports only once the options are known to be good.
  import jax  # pylint: disable=import-outside-toplevel

  from sam_optax.experiments import data as data_lib  # pylint: disable=import-outside-toplevel
  from sam_optax.experiments import models as models_lib  # pylint: disable=import-outside-toplevel
  from sam_optax.experiments import report  # pylint: disable=import-outside-toplevel
  from sam_optax.experiments.train import TrainConfig, evaluate, train  # pylint: disable=import-outside-toplevel

  optimizers = _parse_optimizers(args.optimizers, args.base)
  model_name = default_model(args.dataset) if args.model == "auto" else args.model
  load_kwargs = {}
  if args.train_size is not None:
    load_kwargs["train_size"] = args.train_size
  if args.test_size is not None:
    load_kwargs["test_size"] = args.test_size
  dataset = data_lib.load_dataset(args.dataset, data_dir=args.data_dir, seed=0, **load_kwargs)
  if args.batch_size > len(dataset.y_train):
    raise UsageError(f"--batch-size {args.batch_size} is larger than the training set ({len(dataset.y_train)})")
  try:
    model = models_lib.get_model(model_name, dataset.num_classes, dataset.input_shape)
    # Shapes only, nothing computed: a model that cannot take these examples
    # (a cnn on sequences, an mlp on graphs) fails here, not inside training.
    examples = jax.tree.map(lambda leaf: leaf[:2], dataset.x_train)
    key = jax.random.key(0)
    jax.eval_shape(lambda x: model.init({"params": key, "dropout": key}, x, train=False), examples)
  except ValueError as error:
    hint = "" if args.model == "auto" else f"; --model auto trains {default_model(args.dataset)} on {args.dataset}"
    raise UsageError(f"{error}{hint}") from error
  os.makedirs(args.out, exist_ok=True)
  config_record = {
      "dataset": args.dataset, "model": model_name, "optimizers": optimizers, "base": args.base,
      "rho": args.rho, "sigma": args.sigma, "lmbda": args.lmbda, "epochs": args.epochs,
      "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
      "label_noise": args.label_noise, "seeds": args.seeds, "group_size": args.group_size,
      "train_size": int(len(dataset.y_train)), "test_size": int(len(dataset.y_test)),
      "backend": jax.default_backend(), "devices": jax.device_count(),
  }
  per_seed: dict[str, list[dict]] = {name: [] for name in optimizers}
  curves: dict[str, list] = {}
  analyses: dict[str, dict] = {}
  run_config = lambda name, seed: TrainConfig(
      optimizer=name, base=args.base, rho=args.rho, sigma=args.sigma, lmbda=args.lmbda,
      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
      weight_decay=args.weight_decay, seed=seed, group_size=args.group_size,
  )
  checkpointers: dict[tuple, Any] = {}
  if args.checkpoint_dir:
    # Every run's checkpoint is checked before anything trains: one saved with other options is refused.
    from sam_optax.experiments.checkpoint import (  # pylint: disable=import-outside-toplevel
        Checkpointer, ConfigMismatchError)

    for seed in args.seeds:
      for name in optimizers:
        directory = os.path.join(args.checkpoint_dir, f"{name}_seed{seed}")
        checkpointer = Checkpointer(
            directory, config=checkpoint_config(args, run_config(name, seed), model_name, dataset))
        checkpointers[name, seed] = checkpointer
        try:
          checkpointer.check_config()
        except ConfigMismatchError as error:
          for opened in checkpointers.values():
            opened.close()
          raise UsageError(_mismatch_message(directory, error)) from error
  for seed in args.seeds:
    y_train = dataset.y_train
    if args.label_noise > 0:
      y_train = data_lib.add_label_noise(y_train, args.label_noise, dataset.num_classes, seed=seed)
    for name in optimizers:
      checkpointer = checkpointers.get((name, seed))
      result = train(
          model, dataset.x_train, y_train, run_config(name, seed), x_test=dataset.x_test, y_test=dataset.y_test,
          progress=not args.no_progress, description=f"{name} (seed {seed})", checkpointer=checkpointer,
      )
      if checkpointer is not None:
        checkpointer.close()
      state = result.state
      train_loss, train_acc = evaluate(model, state.params, state.batch_stats, dataset.x_train, y_train)
      test_loss, test_acc = evaluate(model, state.params, state.batch_stats, dataset.x_test, dataset.y_test)
      diverged = report.diverged(state, train_loss)
      record: dict[str, Any] = {
          "seed": seed, "train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss,
          "test_acc": test_acc, "gen_gap": test_loss - train_loss, "seconds": result.seconds,
          "step_seconds": result.step_seconds if math.isfinite(result.step_seconds) else None,
          "sharpness": last_epoch_sharpness(result.history), "diverged": diverged,
          "lambda_max": None, "lambda_min": None, "lambda_ratio": None, "hessian_trace": None,
      }
      if not args.no_analysis and diverged:
        # No Hessian of non-finite weights: NaN (null in results.json) marks it, not "not computed".
        record.update({key: float("nan") for key in report.ANALYSIS_KEYS})
      elif not args.no_analysis:
        analysis = report.analyse(model, state, dataset, y_train, seed=seed,
                                  examples=args.analysis_examples,
                                  landscapes=seed == args.seeds[0] and not args.no_plots)
        record.update(analysis["summary"])
        if seed == args.seeds[0]:
          analyses[name] = analysis
      if seed == args.seeds[0]:
        curves[name] = result.history
      per_seed[name].append(record)
  # Step time relative to the base optimizer of the same seed.
  reference = args.base if args.base in optimizers else next(
      (n for n in optimizers if n in ("sgd", "adam")), None)
  for name in optimizers:
    for i, record in enumerate(per_seed[name]):
      record["step_time_ratio"] = (
          _ratio(record["step_seconds"], per_seed[reference][i]["step_seconds"]) if reference else None)
  results = {"config": config_record, "runs": summarise(per_seed)}
  # Non-finite numbers (a diverged run's losses) are written as null: results.json stays valid JSON.
  report.write_json(results, os.path.join(args.out, "results.json"))
  report.write_csv(results, os.path.join(args.out, "results.csv"))
  table = report.markdown_table(results)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(table + "\n")
  if not args.no_plots:
    results["plots"] = report.write_plots(curves, analyses, args.out)
  print()
  print(table)
  print(f"\nwrote {os.path.join(args.out, 'results.json')}, results.csv"
        + (", and plots" if not args.no_plots else ""))
  return results


def _check_compare(args: argparse.Namespace) -> None:
  validate(args)
  _parse_optimizers(args.optimizers, args.base)
  try:
    check_dataset_name(args.dataset)
  except DatasetError as error:
    raise UsageError(str(error)) from error
  from sam_optax.experiments.models import MODELS  # pylint: disable=import-outside-toplevel

  if args.model != "auto" and args.model not in MODELS:
    raise UsageError(f"unknown model {args.model!r}; choose from auto, {', '.join(MODELS)}")


def check_compare(argv: Sequence[str]) -> argparse.Namespace:
  """The options of ``sam-optax compare ARGV``, parsed and checked as the command checks them, nothing run.

  For scripts that plan several runs (``benchmarks/generalization.py``,
  ``benchmarks/m_sharpness.py``): a bad setting then fails before the first
  run instead of after the others. Data files are not looked for.

  Args:
    argv: the options after ``compare``.

  Returns:
    The parsed options.

  Raises:
    UsageError: a bad value (an unknown dataset, model or optimizer, a
      ``--group-size`` that does not divide ``--batch-size``, ...).
    SystemExit: what ``argparse`` refuses (an unknown option, a non-number),
      after printing its usage message.

  Example::

      >>> check_compare(["--dataset", "digits", "--group-size", "16"]).group_size
      16
      >>> check_compare(["--group-size", "48"])  # the default batch is 64
      Traceback (most recent call last):
      ...
      sam_optax.experiments.cli.UsageError: --group-size must be a positive divisor of --batch-size (64), got 48
  """
  args = build_parser().parse_args(["compare", *argv])
  _check_compare(args)
  return args


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    if args.command == "compare":
      _check_compare(args)
      run_compare(args)
    elif args.command == "study":
      from sam_optax.experiments.study import run_study  # pylint: disable=import-outside-toplevel

      run_study(validate_study(args))
  except UsageError as error:
    print(f"sam-optax: error: {error}", file=sys.stderr)
    return 2
  except DatasetError as error:
    # Unknown dataset names, missing data files: one clear line, no traceback.
    print(f"sam-optax: error: {error}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("sam-optax: interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
