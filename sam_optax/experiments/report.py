"""Sharpness analysis of trained runs, and the table, CSV and plots of ``compare``."""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any

import jax
import numpy as np

from sam_optax import analysis
from sam_optax.experiments.train import make_eval_loss_fn, num_examples, take

LANDSCAPE_1D_POINTS = 41
LANDSCAPE_2D_POINTS = 17
ANALYSIS_KEYS = ("lambda_max", "lambda_min", "lambda_ratio", "hessian_trace")  # :func:`analyse`'s summary


def diverged(state, train_loss: float) -> bool:
  """True when a trained run's parameters, BatchNorm statistics or training loss are not finite.

  Such a run has no Hessian to analyse (Lanczos on NaN fails); it is reported as diverged.

  Example::

      >>> import jax.numpy as jnp
      >>> from sam_optax.experiments.train import TrainState
      >>> state = TrainState({'w': jnp.array([1.0, jnp.nan])}, {}, (), jnp.zeros([], jnp.int32))
      >>> diverged(state, 0.5), diverged(state._replace(params={'w': jnp.ones(2)}), 0.5)
      (True, False)
  """
  if not math.isfinite(train_loss):
    return True
  leaves = jax.tree.leaves((state.params, state.batch_stats))
  return not all(bool(np.all(np.isfinite(np.asarray(leaf)))) for leaf in leaves)


def json_safe(value: Any) -> Any:
  """``value`` with every non-finite number (NaN, ±inf) replaced by None, numpy scalars and arrays as Python.

  JSON has no NaN or Infinity: ``json.dump`` would write bare ``NaN``, which
  strict parsers refuse.

  Example::

      >>> json_safe({'loss': float('nan'), 'acc': np.float32(0.5), 'seeds': (0, 1), 'trace': [float('inf')]})
      {'loss': None, 'acc': 0.5, 'seeds': [0, 1], 'trace': [None]}
  """
  if isinstance(value, dict):
    return {key: json_safe(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(item) for item in value]
  if isinstance(value, np.ndarray):
    return json_safe(value.tolist())
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  return value


def write_json(results: Any, path: str) -> str:
  """Writes ``results`` as strict JSON (non-finite numbers as null: see :func:`json_safe`)."""
  with open(path, "w") as f:
    json.dump(json_safe(results), f, indent=2, allow_nan=False)
  return path


def analysis_batches(x, y, examples: int, batch_size: int = 256) -> list[dict]:
  """The first ``examples`` training examples as a list of batches."""
  n = min(examples, num_examples(x))
  return [
      {"x": take(x, np.arange(start, min(start + batch_size, n))),
       "y": np.asarray(y[start:min(start + batch_size, n)])}
      for start in range(0, n, batch_size)
  ]


def analyse(model, state, dataset, y_train, *, seed: int, examples: int, landscapes: bool,
            surfaces: tuple = ("1d", "2d")) -> dict:
  """Hessian summary (and, if asked, density and loss landscapes) of a trained model.

  With ``landscapes``, ``surfaces`` says which loss surfaces to compute
  (``"1d"``, ``"2d"``); the spectral density is always computed then.

  The loss is the eval-mode training loss (BatchNorm statistics frozen, no
  dropout) on the first ``examples`` training examples, with the labels the
  model was trained on (noisy ones included).
  """
  loss_fn = make_eval_loss_fn(model, state.batch_stats)
  batches = analysis_batches(dataset.x_train, y_train, examples)
  key = jax.random.key(1000 + seed)
  # One summary per trained model: compiling an unrolled block of probes costs more than it saves here.
  summary = analysis.sharpness_summary(loss_fn, state.params, batches, key=key, trace_block_size=1)
  out: dict[str, Any] = {
      "summary": {
          "lambda_max": float(summary.lambda_max),
          "lambda_min": float(summary.lambda_min),
          "lambda_ratio": float(summary.lambda_ratio),
          "hessian_trace": float(summary.trace),
      }
  }
  if landscapes:
    key_density, key_x, key_y = jax.random.split(jax.random.fold_in(key, 1), 3)
    out["density"] = analysis.spectral_density(loss_fn, state.params, batches, key=key_density)
    direction = jax.jit(analysis.filter_normalized_direction)  # one program, not one per op
    direction_x = direction(state.params, key_x)
    direction_y = direction(state.params, key_y)
    alphas = np.linspace(-1.0, 1.0, LANDSCAPE_1D_POINTS)
    grid = np.linspace(-1.0, 1.0, LANDSCAPE_2D_POINTS)
    if "1d" in surfaces:
      out["surface_1d"] = (alphas, np.asarray(
          analysis.loss_surface_1d(loss_fn, state.params, batches, direction_x, alphas)))
    if "2d" in surfaces:
      out["surface_2d"] = (grid, grid, np.asarray(
          analysis.loss_surface_2d(loss_fn, state.params, batches, direction_x, direction_y, grid, grid)))
  return out


COLUMNS = [
    ("train_loss", "train loss", "{:.4f}"),
    ("train_acc", "train acc (%)", "pct"),
    ("test_loss", "test loss", "{:.4f}"),
    ("test_acc", "test acc (%)", "pct"),
    ("gen_gap", "gen. gap", "{:.4f}"),
    ("lambda_max", "λmax", "{:.3g}"),
    ("lambda_ratio", "\\|λmax/λmin\\|", "{:.3g}"),
    ("sharpness", "L(w+ε) − L(w)", "{:.3g}"),
    ("seconds", "wall s", "{:.1f}"),
    ("step_time_ratio", "step time ×base", "{:.2f}"),
]


def _cell(run: dict, key: str, fmt: str) -> str:
  value, std = run.get(key), run.get(key + "_std")
  if value is None:
    return "–"  # not computed
  if not math.isfinite(value):
    return str(value)  # nan, inf: a diverged run's number
  several = len(run.get("per_seed", [])) > 1 and std is not None
  if fmt == "pct":
    text = f"{100 * value:.2f}"
    return text + (f" ± {100 * std:.2f}" if several else "")
  text = fmt.format(value)
  return text + (f" ± {fmt.format(std)}" if several else "")


def markdown_table(results: dict) -> str:
  """The comparison as a Markdown table (the SAM study's Table I layout)."""
  config = results["config"]
  lines = [
      f"**{config['model']} on {config['dataset']}**, {config['epochs']} epochs, batch "
      f"{config['batch_size']}, label noise {config['label_noise']:.0%}, "
      f"seeds {','.join(str(s) for s in config['seeds'])}",
      "",
      "| optimizer | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
      "|---|" + "---:|" * len(COLUMNS),
  ]
  for name, run in results["runs"].items():
    label = f"{name} (diverged)" if run.get("diverged") else name
    lines.append(f"| {label} | " + " | ".join(_cell(run, key, fmt) for key, _, fmt in COLUMNS) + " |")
  return "\n".join(lines)


def write_csv(results: dict, path: str) -> str:
  """One row per optimizer and seed, plus a 'mean' row per optimizer."""
  fields = ["optimizer", "seed"] + [key for key, _, _ in COLUMNS] + ["lambda_min", "hessian_trace", "diverged"]
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for name, run in results["runs"].items():
      for record in run["per_seed"]:
        writer.writerow({"optimizer": name, **record})
      writer.writerow({"optimizer": name, "seed": "mean", **{k: v for k, v in run.items() if k != "per_seed"}})
  return path


def plot_training_curves(curves: dict, path: str, *, eval_label: str = "test") -> str:
  """Loss, accuracy and (if logged) sharpness per epoch: one colour per run, solid train, dashed eval.

  ``curves``: ``{label: history}`` with the records of :func:`~sam_optax.experiments.train.train`.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  with_sharpness = any(h and "sharpness" in h[0] for h in curves.values())
  panels = 3 if with_sharpness else 2
  figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
  ax_loss, ax_acc = axes[0], axes[1]
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for index, (name, history) in enumerate(curves.items()):
    colour = colours[index % len(colours)]
    epochs = [h["epoch"] for h in history]
    ax_loss.plot(epochs, [h["train_batch_loss"] for h in history], "-", color=colour, label=f"{name} train")
    if history and "test_loss" in history[0]:
      ax_loss.plot(epochs, [h["test_loss"] for h in history], "--", color=colour, label=f"{name} {eval_label}")
      ax_acc.plot(epochs, [100 * h["test_acc"] for h in history], "--", color=colour, label=name)
    if with_sharpness and history and "sharpness" in history[0]:
      axes[2].plot(epochs, [h["sharpness"] for h in history], "-", color=colour, label=name)
  ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title=f"loss (solid: train batches, dashed: {eval_label})")
  ax_acc.set(xlabel="epoch", ylabel=f"{eval_label} accuracy (%)", title=f"{eval_label} accuracy")
  ax_loss.legend(fontsize=8)
  ax_acc.legend(fontsize=8)
  if with_sharpness:
    axes[2].set(xlabel="epoch", ylabel="L(w+ε) − L(w)", title="sharpness (epoch mean of train batches)")
    axes[2].legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)
  return path


def write_plots(curves: dict, analyses: dict, out_dir: str) -> list[str]:
  """Training curves, loss landscapes and spectral densities as PNG files."""
  from sam_optax.analysis import plotting  # pylint: disable=import-outside-toplevel

  paths = [plot_training_curves(curves, os.path.join(out_dir, "training_curves.png"))]
  with_landscapes = {name: a for name, a in analyses.items() if "surface_1d" in a}
  if with_landscapes:
    paths.append(plotting.plot_loss_surface_1d(
        {name: a["surface_1d"] for name, a in with_landscapes.items()},
        os.path.join(out_dir, "landscape_1d.png")))
    paths.append(plotting.plot_spectral_density(
        {name: a["density"] for name, a in with_landscapes.items()},
        os.path.join(out_dir, "spectral_density.png")))
    for name, a in with_landscapes.items():
      paths.append(plotting.plot_loss_contour(
          {name: a["surface_2d"]}, os.path.join(out_dir, f"landscape_2d_{name}.png")))
      paths.append(plotting.plot_loss_surface_3d(
          {name: a["surface_2d"]}, os.path.join(out_dir, f"landscape_3d_{name}.png")))
  return paths
