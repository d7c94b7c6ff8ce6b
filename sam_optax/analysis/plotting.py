"""Plots of Hessian spectra and loss landscapes (needs ``matplotlib``, imported lazily).

Every function takes a dict ``label -> result`` so several models share one
figure, writes a PNG (or any format matplotlib knows from the extension) to
``path`` and returns the path.
"""

from __future__ import annotations

import os
from typing import Any, Mapping


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel

  if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
    try:
      matplotlib.use("Agg")
    except Exception:  # pylint: disable=broad-except
      pass
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  return plt


def _save(figure, path: str) -> str:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  _pyplot().close(figure)
  return path


def plot_spectral_density(densities: Mapping[str, Any], path: str, *, title: str = "Hessian eigenvalue density") -> str:
  """Densities ``label -> (grid, density, ...)`` on a log-scale y axis, as PyHessian plots them."""
  plt = _pyplot()
  figure, axis = plt.subplots(figsize=(6, 4))
  for label, result in densities.items():
    grid, density = result[0], result[1]
    axis.semilogy(grid, density + 1e-7, label=label)
  axis.set(xlabel="eigenvalue", ylabel="density (log scale)", title=title)
  axis.legend()
  return _save(figure, path)


def plot_loss_surface_1d(surfaces: Mapping[str, Any], path: str, *, title: str = "1D filter-normalized loss landscape") -> str:
  """Curves ``label -> (alphas, losses)``."""
  plt = _pyplot()
  figure, axis = plt.subplots(figsize=(6, 4))
  for label, (alphas, losses) in surfaces.items():
    axis.plot(alphas, losses, label=label)
  axis.set(xlabel="alpha (filter-normalized direction)", ylabel="loss", title=title)
  axis.legend()
  return _save(figure, path)


def plot_loss_contour(surfaces: Mapping[str, Any], path: str, *, levels: int = 30,
                      title: str = "2D filter-normalized loss landscape") -> str:
  """Contour plots ``label -> (xs, ys, losses[i, j] at (xs[i], ys[j]))``, one panel each."""
  plt = _pyplot()
  count = len(surfaces)
  figure, axes = plt.subplots(1, count, figsize=(4.5 * count, 4), squeeze=False)
  for axis, (label, (xs, ys, losses)) in zip(axes[0], surfaces.items()):
    contour = axis.contour(xs, ys, losses.T, levels=levels)
    axis.clabel(contour, inline=True, fontsize=7)
    axis.plot([0], [0], "k+")
    axis.set(xlabel="x", ylabel="y", title=f"{label}")
  figure.suptitle(title)
  return _save(figure, path)


def plot_loss_surface_3d(surfaces: Mapping[str, Any], path: str, *,
                         title: str = "loss surface") -> str:
  """3D surfaces ``label -> (xs, ys, losses)``, one panel each."""
  plt = _pyplot()
  import numpy as np  # pylint: disable=import-outside-toplevel

  count = len(surfaces)
  figure = plt.figure(figsize=(5 * count, 4.5))
  for index, (label, (xs, ys, losses)) in enumerate(surfaces.items()):
    axis = figure.add_subplot(1, count, index + 1, projection="3d")
    grid_x, grid_y = np.meshgrid(xs, ys, indexing="ij")
    axis.plot_surface(grid_x, grid_y, losses, cmap="viridis", linewidth=0, antialiased=True)
    axis.set(xlabel="x", ylabel="y", zlabel="loss", title=label)
  figure.suptitle(title)
  return _save(figure, path)
