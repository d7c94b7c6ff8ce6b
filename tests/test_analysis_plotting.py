"""The analysis plots write real image files, with several models on one figure."""

import numpy as np
import pytest

from sam_optax.analysis import plotting


@pytest.fixture
def results():
  grid = np.linspace(-1, 1, 9)
  xx, yy = np.meshgrid(grid, grid, indexing="ij")
  t = np.linspace(-0.1, 2.0, 500)
  return {
      "density": {name: (t, np.exp(-((t - c) ** 2) / 0.01) + 1e-6) for name, c in (("sgd", 1.5), ("sam", 0.5))},
      "curves": {name: (grid, s * grid**2) for name, s in (("sgd", 3.0), ("sam", 1.0))},
      "surfaces": {name: (grid, grid, s * (xx**2 + 2 * yy**2)) for name, s in (("sgd", 3.0), ("sam", 1.0))},
  }


def test_plots_are_written(tmp_path, results):
  paths = [
      plotting.plot_spectral_density(results["density"], str(tmp_path / "density.png")),
      plotting.plot_loss_surface_1d(results["curves"], str(tmp_path / "sub" / "curve.png")),
      plotting.plot_loss_contour(results["surfaces"], str(tmp_path / "contour.png")),
      plotting.plot_loss_surface_3d(results["surfaces"], str(tmp_path / "surface.png")),
  ]
  import matplotlib.image

  for path in paths:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05  # not a blank canvas
  # Two models share a figure: the contour figure has two panels side by side.
  single = plotting.plot_loss_contour({"sam": results["surfaces"]["sam"]}, str(tmp_path / "one.png"))
  assert matplotlib.image.imread(paths[2]).shape[1] > 1.5 * matplotlib.image.imread(single).shape[1]


@pytest.mark.parametrize("name, argument", [
    ("plot_spectral_density", "densities"), ("plot_loss_surface_1d", "surfaces"),
    ("plot_loss_contour", "surfaces"), ("plot_loss_surface_3d", "surfaces")])
def test_bad_results_are_rejected_by_name(tmp_path, name, argument):
  """A list or an empty mapping is refused before matplotlib is touched, and nothing is written."""
  path = tmp_path / "never.png"
  with pytest.raises(TypeError, match=f"^{name}: {argument} must be a mapping label -> .*got type list"):
    getattr(plotting, name)([np.ones(3)], str(path))
  with pytest.raises(ValueError, match=f"^{name}: {argument} is empty"):
    getattr(plotting, name)({}, str(path))
  assert not path.exists()


def test_plain_lists_plot_like_arrays(tmp_path):
  """Results written by hand (or read back from JSON) are lists: every plot takes them."""
  grid = [-1.0, 0.0, 1.0, 2.0]
  xs = ys = [-1.0, 0.0, 1.0]
  losses = [[x * x + y * y for y in ys] for x in xs]
  for plot, results in ((plotting.plot_spectral_density, {"sam": (grid, [0.1, 0.5, 0.3, 0.1])}),
                        (plotting.plot_loss_surface_1d, {"sam": (grid, [1.0, 0.0, 1.0, 4.0])}),
                        (plotting.plot_loss_contour, {"sam": (xs, ys, losses)}),
                        (plotting.plot_loss_surface_3d, {"sam": (xs, ys, losses)})):
    path = plot(results, str(tmp_path / f"{plot.__name__}.png"))
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
