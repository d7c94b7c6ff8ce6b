"""``sam-optax study``: the seed study's Table I in one command, with rho chosen on validation data.

The SAM study this project grows from (Table I of the report in
``shared/papers``) trains three (architecture, data) pairs with their standard
optimizer and with SAM, picks rho out of four values per model and reports
train/test loss and accuracy and |lambda_max/lambda_min| of the Hessian, with
3D surfaces of the WideResNet's loss (its Figure 2) and contours of the GCN's
(Figure 3). Its published ratios: W.ResNet SGD 21.7 -> SAM 4.8 (rho = 2),
Attention SGD 16.8 -> SAM 12.2 (rho = 1), GCN Adam 289 -> SAM 65 (rho = 0.05).

For each pair this module

1. holds out a stratified ``validation_fraction`` of the *training* set;
2. trains the base optimizer and, for each sharpness-aware optimizer, every
   rho of the grid on the rest (one ``jax.vmap``-ed program per grid where
   ``sam_optax`` accepts a traced rho: :func:`~sam_optax.experiments.train.train_sweep`);
3. chooses rho by the last epoch's validation accuracy (mean over seeds; ties
   go to the lower validation loss) -- the test set is not read until every
   rho of the model is chosen;
4. evaluates the base and the chosen runs on the test set and analyses their
   Hessian (:func:`sam_optax.experiments.report.analyse`, as ``compare`` does).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

PUBLISHED = {  # Table I of the study: (optimizer, train loss, train acc, test loss, test acc, |lmax/lmin|)
    "wrn": {"rho": 2.0, "rows": [("SGD", 0.0367, 98.57, 0.1095, 95.43, 21.7), ("SAM", 0.0459, 98.64, 0.0961, 95.97, 4.8)]},
    "attention": {"rho": 1.0, "rows": [("SGD", 0.0770, 96.31, 0.1204, 94.64, 16.8), ("SAM", 0.0836, 95.94, 0.1223, 94.26, 12.2)]},
    "gcn": {"rho": 0.05, "rows": [("ADAM", 0.1754, 86.46, 0.2406, 80.41, 289.0), ("SAM", 0.1719, 87.05, 0.2457, 81.11, 65.0)]},
}

GENERATED = ("synthetic_sequences", "synthetic_graphs")
# Rho grids scale with the optimizer's usual radius (ASAM's is ~10x SAM's, Kwon et al. 2021).
GRID_SCALE = {"sam": 1.0, "fsam": 1.0, "gsam": 1.0, "looksam": 1.0, "asam": 10.0}


@dataclasses.dataclass(frozen=True)
class StudyModel:
  """One (architecture, data) pair of the study and its training budget."""

  key: str  # wrn, attention, gcn
  label: str  # as in the study's Table I
  model: str  # a name of sam_optax.experiments.models
  dataset: str  # a name of sam_optax.experiments.data
  base: str  # sgd (momentum 0.9) or adam
  lr: float
  epochs: int
  batch_size: int
  rho_grid: tuple
  model_options: tuple = ()  # (field, value) pairs for models.get_model
  train_size: Optional[int] = None
  weight_decay: float = 5e-4


MODEL_KEYS = ("wrn", "attention", "gcn")


def _time_series_default() -> str:
  """The real UCR set if aeon (which ships it) is installed, else the generated sequences."""
  return "italy_power_demand" if importlib.util.find_spec("aeon") is not None else "synthetic_sequences"


def study_models(full: bool = False, data_dir: Optional[str] = None) -> dict[str, StudyModel]:
  """The study's three pairs: CPU-sized by default, the study's scale with ``full``.

  Default: WRN-10-1 on scikit-learn's digits, the Transformer on a UCR set
  (aeon) or generated sequences, the GCN on generated graphs -- unless
  ``data_dir`` holds the study's own sets (``mitbih_train.csv``/``mitbih_test.csv``,
  ``Mutagenicity/``), which are then used. ``full``: WRN-28-10 on CIFAR-10
  (``data_dir/cifar-10-batches-py/``, else tensorflow-datasets / Hugging
  Face), the Transformer on MIT-BIH and the GCN on Mutagenicity (``data_dir``
  needed for the last two), with longer schedules. CIFAR-10 is a ``full``
  set only: a ``cifar-10-batches-py/`` in ``data_dir`` does not change the
  default W.ResNet's digits (WRN-10-1 is sized for them and a CPU).

  Example::

      >>> study_models()["wrn"].dataset, study_models(full=True)["wrn"].dataset
      ('digits', 'cifar10')
  """
  has = lambda *names: bool(data_dir) and all(os.path.exists(os.path.join(data_dir, n)) for n in names)
  series = "mitbih" if full or has("mitbih_train.csv", "mitbih_test.csv") else _time_series_default()
  graphs = ("mutagenicity" if full or has("Mutagenicity") or has("Mutagenicity_A.txt")
            else "synthetic_graphs")
  if full:
    return {
        "wrn": StudyModel("wrn", "W.ResNet", "wrn", "cifar10", "sgd", 0.1, 200, 128, (0.05, 0.5, 1.0, 2.0),
                          (("depth", 28), ("width", 10))),
        "attention": StudyModel("attention", "Attention", "transformer", series, "sgd", 0.05, 50, 128,
                                (0.05, 0.2, 0.5, 1.0),
                                (("model_dim", 128), ("num_layers", 4), ("mlp_dim", 256), ("patch_size", 11))),
        "gcn": StudyModel("gcn", "GCN", "gcn", graphs, "adam", 1e-3, 200, 64, (0.01, 0.05, 0.1, 0.5),
                          (("hidden", 128), ("num_layers", 3))),
    }
  return {
      "wrn": StudyModel("wrn", "W.ResNet", "wrn", "digits", "sgd", 0.05, 6, 64, (0.05, 0.2, 0.5, 2.0),
                        train_size=800),
      "attention": StudyModel("attention", "Attention", "transformer", series, "sgd", 0.05, 12, 32,
                              (0.05, 0.2, 0.5, 1.0), train_size=None if series != "mitbih" else 4000),
      "gcn": StudyModel("gcn", "GCN", "gcn", graphs, "adam", 3e-3, 25, 32, (0.01, 0.05, 0.1, 0.5)),
  }


def validation_split(x, y: np.ndarray, fraction: float, seed: int = 0):
  """A stratified split of the *training* set: ``(x_fit, y_fit, x_val, y_val)``."""
  from sam_optax.experiments.data import _stratified_split  # pylint: disable=import-outside-toplevel
  from sam_optax.experiments.train import take  # pylint: disable=import-outside-toplevel

  if not 0 < fraction < 1:
    raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
  fit, val = _stratified_split(np.asarray(y), fraction, seed)
  return take(x, fit), np.asarray(y)[fit], take(x, val), np.asarray(y)[val]


def choose_rho(rhos: Sequence[float], val_acc: Sequence[float], val_loss: Sequence[float]) -> int:
  """Index of the highest validation accuracy; ties go to the lower validation loss, then smaller rho."""
  order = sorted(range(len(rhos)), key=lambda i: (-val_acc[i], val_loss[i], rhos[i]))
  return order[0]


@dataclasses.dataclass
class StudyOptions:
  """What ``sam-optax study`` was asked for (see ``sam-optax study --help``)."""

  out: str = "runs/study"
  models: Sequence[str] = MODEL_KEYS
  optimizers: Sequence[str] = ("sam",)
  rho_grid: dict = dataclasses.field(default_factory=dict)  # model key (or "*") -> grid
  seeds: Sequence[int] = (0,)
  full: bool = False
  data_dir: Optional[str] = None
  epochs: Optional[int] = None
  train_size: Optional[int] = None
  test_size: Optional[int] = None
  validation_fraction: float = 0.2
  analysis_examples: int = 128
  vmap: bool = True
  progress: bool = True
  plots: bool = True


def _history_for_json(history: list) -> list:
  rename = {"test_loss": "val_loss", "test_acc": "val_acc"}
  return [{rename.get(k, k): v for k, v in record.items()} for record in history]


def run_study(options: StudyOptions, *, datasets: Optional[dict] = None, specs: Optional[dict] = None,
              on_selected: Optional[Callable[[str, dict], None]] = None,
              log: Callable[[str], None] = print) -> dict:
  """Runs the study and writes every output in ``options.out``; returns study.json's content.

  Args:
    options: the study's options.
    datasets: ``{model key: Dataset}`` to use instead of loading the pair's
      dataset (tests).
    specs: ``{model key: StudyModel}`` replacing :func:`study_models`'s (tests:
      smaller networks).
    on_selected: called as ``on_selected(model key, selection)`` once every
      rho of that model is chosen, before its test set is read.
    log: where progress lines go.
  """
  # pylint: disable=import-outside-toplevel
  import jax

  from sam_optax.experiments import data as data_lib
  from sam_optax.experiments import models as models_lib
  from sam_optax.experiments import report
  from sam_optax.experiments.cli import last_epoch_sharpness, summarise
  from sam_optax.experiments.train import TrainConfig, evaluate, train, train_sweep

  specs = {**study_models(options.full, options.data_dir), **(specs or {})}
  os.makedirs(options.out, exist_ok=True)
  seeds = list(options.seeds)
  sam_like = list(options.optimizers)
  study: dict[str, Any] = {
      "config": {
          "models": list(options.models), "optimizers": sam_like, "seeds": seeds, "full": options.full,
          "validation_fraction": options.validation_fraction, "analysis_examples": options.analysis_examples,
          "vmap": options.vmap, "backend": jax.default_backend(), "devices": jax.device_count(),
          "selection": (f"rho chosen by the last epoch's accuracy on a stratified "
                        f"{options.validation_fraction:.0%} validation split held out from the training set "
                        f"(mean over seeds; ties: lower validation loss); the test set is read only after "
                        f"every rho of the model is chosen"),
      },
      "models": {},
      "published": PUBLISHED,
  }
  log(f"sam-optax study: {study['config']['selection']}.")
  # Every model's data first: a missing or broken set fails now (DatasetError), not after hours of
  # training the models before it.
  loaded = dict(datasets or {})
  for key in options.models:
    if key not in loaded:
      spec = specs[key]
      sizes = {}
      train_size = options.train_size or spec.train_size
      if train_size is not None:
        sizes["train_size"] = train_size
      if options.test_size is not None:
        sizes["test_size"] = options.test_size
      loaded[key] = data_lib.load_dataset(spec.dataset, data_dir=options.data_dir, seed=0, **sizes)
  curves_by_model, analyses_by_model = {}, {}
  for key in options.models:
    spec = specs[key]
    epochs = options.epochs or spec.epochs
    dataset = loaded.pop(key)  # released with this model's runs
    x_fit, y_fit, x_val, y_val = validation_split(dataset.x_train, dataset.y_train, options.validation_fraction)
    model = models_lib.get_model(spec.model, dataset.num_classes, dataset.input_shape, **dict(spec.model_options))
    batch_size = min(spec.batch_size, len(y_fit))
    grids = {}
    for name in sam_like:
      grid = options.rho_grid.get(key) or options.rho_grid.get("*") or spec.rho_grid
      grids[name] = [float(r) * (1.0 if (key in options.rho_grid or "*" in options.rho_grid)
                                 else GRID_SCALE.get(name, 1.0)) for r in grid]
    log(f"\n== {spec.label}: {spec.model} on {dataset.name} ({len(y_fit)} train / {len(y_val)} validation "
        f"examples), {spec.base} vs {', '.join(sam_like)}, rho grid {grids}")
    config = lambda optimizer, seed, rho=None: TrainConfig(
        optimizer=optimizer, base=spec.base, rho=rho, epochs=epochs, batch_size=batch_size, lr=spec.lr,
        weight_decay=spec.weight_decay, seed=seed)

    # 1. Train everything on the fit split; only the validation split is evaluated.
    model_start = time.perf_counter()
    base_runs, sweeps = [], {name: [] for name in sam_like}
    for seed in seeds:
      base_runs.append(train(model, x_fit, y_fit, config(spec.base, seed), x_test=x_val, y_test=y_val,
                             progress=options.progress, description=f"{key} {spec.base} (seed {seed})"))
      for name in sam_like:
        sweeps[name].append(train_sweep(
            model, x_fit, y_fit, config(name, seed), grids[name], x_eval=x_val, y_eval=y_val,
            vmap=options.vmap, progress=options.progress, description=f"{key} {name} (seed {seed})"))

    # 2. Choose rho from the validation accuracies alone.
    selection: dict[str, Any] = {
        "base_val_acc": float(np.mean([r.history[-1]["test_acc"] for r in base_runs])),
        "base_val_loss": float(np.mean([r.history[-1]["test_loss"] for r in base_runs])),
        "grids": {},
    }
    for name in sam_like:
      val_acc = np.array([[s.results[i].history[-1]["test_acc"] for i in range(len(grids[name]))]
                          for s in sweeps[name]])
      val_loss = np.array([[s.results[i].history[-1]["test_loss"] for i in range(len(grids[name]))]
                           for s in sweeps[name]])
      chosen = choose_rho(grids[name], val_acc.mean(0), val_loss.mean(0))
      selection["grids"][name] = {
          "rhos": grids[name], "val_acc": val_acc.mean(0).tolist(), "val_acc_std": val_acc.std(0).tolist(),
          "val_loss": val_loss.mean(0).tolist(), "chosen_index": chosen, "chosen_rho": grids[name][chosen],
          "vmapped": all(s.vmapped for s in sweeps[name]),
          "sweep_seconds": [s.seconds for s in sweeps[name]],
          "sequential_reason": sweeps[name][0].note,
      }
      log(f"{spec.label} {name}: chose rho = {grids[name][chosen]:g} by validation accuracy "
          f"({100 * val_acc.mean(0)[chosen]:.2f}%; grid {', '.join(f'{r:g}: {100 * a:.2f}%' for r, a in zip(grids[name], val_acc.mean(0)))}; "
          f"{spec.base}: {100 * selection['base_val_acc']:.2f}%) -- test set not used"
          + ("; grid trained in one vmapped program" if selection["grids"][name]["vmapped"] else ""))
    selection["train_seconds"] = time.perf_counter() - model_start
    if on_selected is not None:
      on_selected(key, selection)
    analysis_start = time.perf_counter()

    # 3. Only now: the test set, for the base and the chosen runs.
    chosen_runs = {spec.base: [(r, None) for r in base_runs]}
    for name in sam_like:
      index = selection["grids"][name]["chosen_index"]
      chosen_runs[name] = [(s.results[index], grids[name][index]) for s in sweeps[name]]
    fit_dataset = dataset._replace(x_train=x_fit, y_train=y_fit)
    per_seed, curves, analyses = {}, {}, {}
    for name, runs in chosen_runs.items():
      per_seed[name] = []
      for seed, (result, rho) in zip(seeds, runs):
        state = result.state
        train_loss, train_acc = evaluate(model, state.params, state.batch_stats, x_fit, y_fit)
        test_loss, test_acc = evaluate(model, state.params, state.batch_stats, dataset.x_test, dataset.y_test)
        diverged = report.diverged(state, train_loss)
        record: dict[str, Any] = {
            "seed": seed, "rho": rho, "train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss,
            "test_acc": test_acc, "gen_gap": test_loss - train_loss, "val_acc": result.history[-1]["test_acc"],
            "seconds": result.seconds, "step_seconds": result.step_seconds,
            "sharpness": last_epoch_sharpness(result.history), "diverged": diverged,
        }
        if diverged:  # no Hessian of non-finite weights (NaN in the table, null in study.json)
          record.update({metric: float("nan") for metric in report.ANALYSIS_KEYS})
        else:
          analysis = report.analyse(model, state, fit_dataset, y_fit, seed=seed,
                                    examples=options.analysis_examples,
                                    landscapes=seed == seeds[0] and options.plots,
                                    surfaces=("2d",) if key in ("wrn", "gcn") else ())
          record.update(analysis["summary"])
          if seed == seeds[0]:
            analyses[name] = analysis
        if seed == seeds[0]:
          curves[name] = result.history
        per_seed[name].append(record)
    for name in per_seed:
      for i, record in enumerate(per_seed[name]):
        record["step_time_ratio"] = record["step_seconds"] / per_seed[spec.base][i]["step_seconds"]
    runs = summarise(per_seed)
    log(f"{spec.label}: trained in {selection['train_seconds']:.0f} s, evaluated and analysed in "
        f"{time.perf_counter() - analysis_start:.0f} s")
    for name in sam_like:
      runs[name]["rho"] = selection["grids"][name]["chosen_rho"]
    runs[spec.base]["rho"] = None
    study["models"][key] = {
        "label": spec.label, "model": spec.model, "model_options": dict(spec.model_options),
        "dataset": dataset.name, "generated": dataset.name in GENERATED, "base": spec.base,
        "epochs": epochs, "batch_size": batch_size, "lr": spec.lr, "weight_decay": spec.weight_decay,
        "train_size": int(len(y_fit)), "validation_size": int(len(y_val)), "test_size": int(len(dataset.y_test)),
        "selection": selection, "runs": runs, "analysis_seconds": time.perf_counter() - analysis_start,
        "curves": {name: _history_for_json(history) for name, history in curves.items()},
    }
    curves_by_model[key], analyses_by_model[key] = curves, analyses

  report.write_json(study, os.path.join(options.out, "study.json"))  # non-finite numbers as null
  table = table1_markdown(study)
  with open(os.path.join(options.out, "table1.md"), "w") as f:
    f.write(table + "\n")
  write_table1_csv(study, os.path.join(options.out, "table1.csv"))
  if options.plots:
    study["plots"] = write_study_plots(study, curves_by_model, analyses_by_model, options.out)
  log("\n" + table)
  log(f"\nwrote {os.path.join(options.out, 'study.json')}, table1.md, table1.csv"
      + (", figures" if options.plots else ""))
  return study


TABLE_COLUMNS = [
    ("train_loss", "train loss", "{:.4f}"),
    ("train_acc", "train acc (%)", "pct"),
    ("test_loss", "test loss", "{:.4f}"),
    ("test_acc", "test acc (%)", "pct"),
    ("gen_gap", "gen. gap", "{:.4f}"),
    ("lambda_max", "λmax", "{:.3g}"),
    ("lambda_ratio", "\\|λmax/λmin\\|", "{:.3g}"),
    ("hessian_trace", "trace", "{:.3g}"),
    ("sharpness", "L(w+ε) − L(w)", "{:.3g}"),
]


def _rows(study: dict):
  for key, entry in study["models"].items():
    for name, run in entry["runs"].items():
      yield key, entry, name, run


def table1_markdown(study: dict) -> str:
  """Table I of the study: a base and a SAM row per model (more with ``--optimizers``)."""
  from sam_optax.experiments.report import _cell  # pylint: disable=import-outside-toplevel

  data_lines = []
  for key, entry in study["models"].items():
    kind = "generated (synthetic) data" if entry["generated"] else "real data"
    data_lines.append(f"{entry['label']}: {entry['model']} on {entry['dataset']} ({kind}; {entry['train_size']} "
                      f"train / {entry['validation_size']} validation / {entry['test_size']} test examples, "
                      f"{entry['epochs']} epochs, batch {entry['batch_size']})")
  seeds = study["config"]["seeds"]
  lines = [
      f"**Table I** (seeds {','.join(str(s) for s in seeds)}; mean ± std over seeds where several). "
      f"{study['config']['selection']}. Train loss/acc on the training examples the runs were fitted on; "
      f"Hessian on {study['config']['analysis_examples']} of them (eval mode). "
      f"L(w+ε) − L(w): last-epoch mean over training batches. SAM wall time: a vmapped grid's time divided "
      f"by the grid size.",
      "",
      *[f"- {line}" for line in data_lines],
      "",
      "| model | optimizer | ρ | " + " | ".join(title for _, title, _ in TABLE_COLUMNS) + " | wall s |",
      "|---|---|---:|" + "---:|" * len(TABLE_COLUMNS) + "---:|",
  ]
  for _, entry, name, run in _rows(study):
    rho = "–" if run.get("rho") is None else f"{run['rho']:g}"
    cells = [_cell(run, key, fmt) for key, _, fmt in TABLE_COLUMNS] + [_cell(run, "seconds", "{:.1f}")]
    label = name.upper() if name in ("sgd", "adam") else name.upper().replace("FSAM", "F-SAM")
    label += " (diverged)" if run.get("diverged") else ""
    lines.append(f"| {entry['label']} | {label} | {rho} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_table1_csv(study: dict, path: str) -> str:
  """One row per model, optimizer and seed, plus a 'mean' row per model and optimizer."""
  import csv  # pylint: disable=import-outside-toplevel

  fields = (["model", "dataset", "optimizer", "seed", "rho"] + [key for key, _, _ in TABLE_COLUMNS]
            + ["lambda_min", "val_acc", "seconds"])
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for key, entry, name, run in _rows(study):
      common = {"model": key, "dataset": entry["dataset"], "optimizer": name}
      for record in run["per_seed"]:
        writer.writerow({**common, **record})
      writer.writerow({**common, **{k: v for k, v in run.items() if k != "per_seed"}, "seed": "mean"})
  return path


def plot_surfaces_same_scale(surfaces: dict, path: str, *, title: str) -> str:
  """3D loss surfaces side by side with one z range (the study's Figure 2)."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  low = min(float(np.min(z)) for _, _, z in surfaces.values())
  high = max(float(np.max(z)) for _, _, z in surfaces.values())
  figure = plt.figure(figsize=(5.5 * len(surfaces), 4.5))
  for index, (label, (xs, ys, losses)) in enumerate(surfaces.items()):
    axis = figure.add_subplot(1, len(surfaces), index + 1, projection="3d")
    grid_x, grid_y = np.meshgrid(xs, ys, indexing="ij")
    axis.plot_surface(grid_x, grid_y, losses, cmap="viridis", vmin=low, vmax=high, linewidth=0)
    axis.set_zlim(low, high)
    axis.set(xlabel="x", ylabel="y", zlabel="loss", title=label)
  figure.suptitle(title)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)
  return path


def plot_rho_selection(study: dict, path: str) -> str:
  """Validation accuracy against rho, one panel per model; the base optimizer dashed, the choice starred."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  entries = study["models"]
  figure, axes = plt.subplots(1, len(entries), figsize=(4.5 * len(entries), 3.8), squeeze=False)
  for axis, entry in zip(axes[0], entries.values()):
    selection = entry["selection"]
    for name, grid in selection["grids"].items():
      acc = 100 * np.asarray(grid["val_acc"])
      line = axis.errorbar(grid["rhos"], acc, yerr=100 * np.asarray(grid["val_acc_std"]), marker="o",
                           capsize=3, label=name)
      axis.plot([grid["chosen_rho"]], [acc[grid["chosen_index"]]], "*", markersize=14,
                color=line[0].get_color())
    axis.axhline(100 * selection["base_val_acc"], linestyle="--", color="gray", label=entry["base"])
    axis.set_xscale("log")
    axis.set(xlabel="ρ", ylabel="validation accuracy (%)", title=f"{entry['label']} ({entry['dataset']})")
    axis.legend(fontsize=8)
  figure.suptitle("ρ chosen on a validation split of the training set (★); the test set is not used")
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)
  return path


def write_study_plots(study: dict, curves: dict, analyses: dict, out_dir: str) -> list[str]:
  """figure2_surfaces.png, figure3_contours.png, rho_selection.png, spectral_density_*.png, training_curves_*.png."""
  from sam_optax.analysis import plotting  # pylint: disable=import-outside-toplevel
  from sam_optax.experiments.report import plot_training_curves  # pylint: disable=import-outside-toplevel

  paths = [plot_rho_selection(study, os.path.join(out_dir, "rho_selection.png"))]
  for key, entry in study["models"].items():
    label = lambda name: (f"{name.upper()}" if entry["runs"][name].get("rho") is None
                          else f"{name.upper()} (ρ={entry['runs'][name]['rho']:g})")
    model_analyses = {label(name): a for name, a in analyses[key].items() if "density" in a}
    paths.append(plot_training_curves({label(n): h for n, h in curves[key].items()},
                                      os.path.join(out_dir, f"training_curves_{key}.png"),
                                      eval_label="validation"))
    if not model_analyses:
      continue
    paths.append(plotting.plot_spectral_density(
        {name: a["density"] for name, a in model_analyses.items()},
        os.path.join(out_dir, f"spectral_density_{key}.png"),
        title=f"{entry['label']}: Hessian eigenvalue density"))
    surfaces = {name: a["surface_2d"] for name, a in model_analyses.items() if "surface_2d" in a}
    if key == "wrn" and surfaces:
      paths.append(plot_surfaces_same_scale(
          surfaces, os.path.join(out_dir, "figure2_surfaces.png"),
          title=f"Figure 2: {entry['label']} loss surface (filter-normalized directions, same z scale)"))
    if key == "gcn" and surfaces:
      low = min(float(np.min(z)) for _, _, z in surfaces.values())
      high = max(float(np.max(z)) for _, _, z in surfaces.values())
      levels = np.linspace(low, high, 25) if high > low else 25
      paths.append(plotting.plot_loss_contour(
          surfaces, os.path.join(out_dir, "figure3_contours.png"), levels=levels,
          title=f"Figure 3: {entry['label']} loss contours (same levels)"))
  return paths


def parse_rho_grid(values: Optional[Sequence[str]]) -> dict:
  """``--rho-grid`` values: ``0.01,0.05`` (every model) or ``gcn=0.01,0.05`` (one model)."""
  grids: dict[str, list] = {}
  for text in values or ():
    key, _, numbers = text.rpartition("=")
    key = key.strip() or "*"
    if key != "*" and key not in MODEL_KEYS:
      raise ValueError(f"--rho-grid: unknown model {key!r}; choose from {', '.join(MODEL_KEYS)}")
    try:
      grid = [float(v) for v in numbers.split(",") if v.strip()]
    except ValueError as error:
      raise ValueError(f"--rho-grid: expected comma-separated numbers, got {numbers!r}") from error
    if not grid or any(not (math.isfinite(r) and r > 0) for r in grid):
      raise ValueError(f"--rho-grid: radii must be finite numbers > 0, got {numbers!r}")
    grids[key] = grid
  return grids
