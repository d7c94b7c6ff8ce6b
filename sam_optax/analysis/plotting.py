"""Plots of Hessian spectra and loss landscapes (needs ``matplotlib``, imported lazily).

Every function takes a dict ``label -> result`` so several models share one
figure, writes a PNG (or any format matplotlib knows from the extension) to
``path`` and returns the path.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel

  if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
    try:
      matplotlib.use("Agg")
    except Exception:  # pylint: disable=broad-except
      pass
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  return plt


def _check_results(results: Any, argument: str, name: str, parts: str) -> None:
  if not isinstance(results, Mapping):
    raise TypeError(f"{name}: {argument} must be a mapping label -> {parts}, got type {type(results).__name__}.")
  if not results:
    raise ValueError(f"{name}: {argument} is empty; pass at least one label -> {parts}.")


def _save(figure, path: str) -> str:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  _pyplot().close(figure)
  return path


def plot_spectral_density(densities: Mapping[str, Any], path: str, *, title: str = "Hessian eigenvalue density") -> str:
  """Densities ``label -> (grid, density, ...)`` on a log-scale y axis, as PyHessian plots them.

  Args:
    densities: ``label -> result`` of :func:`sam_optax.analysis.spectral_density`
      (or any ``(grid, density, ...)``); ``1e-7`` is added before the log.
    path: the file to write (its directory is created); the format follows
      the extension.
    title: the figure's title, default ``"Hessian eigenvalue density"``.

  Returns:
    ``path``.

  Example::

      >>> import os, tempfile
      >>> import numpy as np
      >>> from sam_optax.analysis import plotting
      >>> grid = np.linspace(-1.0, 5.0, 50)
      >>> with tempfile.TemporaryDirectory() as directory:
      ...   path = plotting.plot_spectral_density({"sgd": (grid, np.exp(-grid ** 2))},
      ...                                         os.path.join(directory, "density.png"))
      ...   os.path.getsize(path) > 0
      True
  """
  _check_results(densities, "densities", "plot_spectral_density", "(grid, density, ...)")
  plt = _pyplot()
  figure, axis = plt.subplots(figsize=(6, 4))
  for label, result in densities.items():
    grid, density = np.asarray(result[0]), np.asarray(result[1])
    axis.semilogy(grid, density + 1e-7, label=label)
  axis.set(xlabel="eigenvalue", ylabel="density (log scale)", title=title)
  axis.legend()
  return _save(figure, path)


def plot_loss_surface_1d(surfaces: Mapping[str, Any], path: str, *, title: str = "1D filter-normalized loss landscape") -> str:
  """Curves ``label -> (alphas, losses)``, one per label on shared axes.

  Args:
    surfaces: ``label -> (alphas, losses)``, ``losses`` from
      :func:`sam_optax.analysis.loss_surface_1d`.
    path: the file to write (its directory is created).
    title: the figure's title.

  Returns:
    ``path``.

  Example::

      >>> import os, tempfile
      >>> import numpy as np
      >>> from sam_optax.analysis import plotting
      >>> alphas = np.linspace(-1.0, 1.0, 11)
      >>> with tempfile.TemporaryDirectory() as directory:
      ...   path = plotting.plot_loss_surface_1d({"sgd": (alphas, 3 * alphas ** 2), "sam": (alphas, alphas ** 2)},
      ...                                        os.path.join(directory, "landscape_1d.png"))
      ...   os.path.getsize(path) > 0
      True
  """
  _check_results(surfaces, "surfaces", "plot_loss_surface_1d", "(alphas, losses)")
  plt = _pyplot()
  figure, axis = plt.subplots(figsize=(6, 4))
  for label, (alphas, losses) in surfaces.items():
    axis.plot(alphas, losses, label=label)
  axis.set(xlabel="alpha (filter-normalized direction)", ylabel="loss", title=title)
  axis.legend()
  return _save(figure, path)


def plot_loss_contour(surfaces: Mapping[str, Any], path: str, *, levels: int = 30,
                      title: str = "2D filter-normalized loss landscape") -> str:
  """Contour plots ``label -> (xs, ys, losses[i, j] at (xs[i], ys[j]))``, one panel each.

  The layout of :func:`sam_optax.analysis.loss_surface_2d`'s output; ``+``
  marks the centre ``(0, 0)``.

  Args:
    surfaces: ``label -> (xs, ys, losses)``.
    path: the file to write (its directory is created).
    levels: contour levels per panel, default 30.
    title: the figure's title.

  Returns:
    ``path``.

  Example::

      >>> import os, tempfile
      >>> import numpy as np
      >>> from sam_optax.analysis import plotting
      >>> xs = ys = np.linspace(-1.0, 1.0, 9)
      >>> losses = xs[:, None] ** 2 + 4 * ys[None, :] ** 2
      >>> with tempfile.TemporaryDirectory() as directory:
      ...   path = plotting.plot_loss_contour({"sgd": (xs, ys, losses)}, os.path.join(directory, "contour.png"),
      ...                                     levels=10)
      ...   os.path.getsize(path) > 0
      True
  """
  _check_results(surfaces, "surfaces", "plot_loss_contour", "(xs, ys, losses)")
  plt = _pyplot()
  count = len(surfaces)
  figure, axes = plt.subplots(1, count, figsize=(4.5 * count, 4), squeeze=False)
  for axis, (label, (xs, ys, losses)) in zip(axes[0], surfaces.items()):
    contour = axis.contour(xs, ys, np.asarray(losses).T, levels=levels)
    axis.clabel(contour, inline=True, fontsize=7)
    axis.plot([0], [0], "k+")
    axis.set(xlabel="x", ylabel="y", title=f"{label}")
  figure.suptitle(title)
  return _save(figure, path)


def plot_loss_surface_3d(surfaces: Mapping[str, Any], path: str, *,
                         title: str = "loss surface") -> str:
  """3D surfaces ``label -> (xs, ys, losses)``, one panel each (layout as :func:`plot_loss_contour`).

  Args:
    surfaces: ``label -> (xs, ys, losses)``, ``losses[i, j]`` at ``(xs[i], ys[j])``.
    path: the file to write (its directory is created).
    title: the figure's title, default ``"loss surface"``.

  Returns:
    ``path``.

  Example::

      >>> import os, tempfile
      >>> import numpy as np
      >>> from sam_optax.analysis import plotting
      >>> xs = ys = np.linspace(-1.0, 1.0, 9)
      >>> with tempfile.TemporaryDirectory() as directory:
      ...   path = plotting.plot_loss_surface_3d({"sam": (xs, ys, xs[:, None] ** 2 + ys[None, :] ** 2)},
      ...                                        os.path.join(directory, "surface.png"))
      ...   os.path.getsize(path) > 0
      True
  """
  _check_results(surfaces, "surfaces", "plot_loss_surface_3d", "(xs, ys, losses)")
  plt = _pyplot()
  count = len(surfaces)
  figure = plt.figure(figsize=(5 * count, 4.5))
  for index, (label, (xs, ys, losses)) in enumerate(surfaces.items()):
    axis = figure.add_subplot(1, count, index + 1, projection="3d")
    grid_x, grid_y = np.meshgrid(xs, ys, indexing="ij")
    axis.plot_surface(grid_x, grid_y, np.asarray(losses), cmap="viridis", linewidth=0, antialiased=True)
    axis.set(xlabel="x", ylabel="y", zlabel="loss", title=label)
  figure.suptitle(title)
  return _save(figure, path)
