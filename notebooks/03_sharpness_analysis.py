# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Seeing sharpness: Hessian spectra and filter-normalized loss landscapes
#
# We train the same CNN with SGD and with SAM, then measure how flat each minimum is:
# the top Hessian eigenvalue λmax, the ratio |λmax/λmin| the SAM study tabulates, the
# Hessian trace (Hutchinson), the eigenvalue density (stochastic Lanczos quadrature, as
# PyHessian), and 1D/2D loss landscapes along filter-normalized directions
# (Li et al., 2018). All in JAX, no PyTorch.

# %%
import importlib.util
import os
import subprocess
import sys

REPOSITORY = "git+https://github.com/your-org/sam_optax"  # <- set to this repository's URL
if importlib.util.find_spec("sam_optax") is None:
    # From the checkout this notebook sits in (`git clone ...; cd sam_optax/notebooks`), else the URL.
    checkout = os.path.dirname(os.getcwd())
    local = os.path.exists(os.path.join(checkout, "pyproject.toml"))
    source = f"{checkout}[experiments]" if local else f"sam_optax[experiments] @ {REPOSITORY}"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", source], check=True)

# %%
import jax
import matplotlib.pyplot as plt
import numpy as np

from sam_optax import analysis
from sam_optax.analysis import plotting
from sam_optax.experiments import data, models
from sam_optax.experiments.train import TrainConfig, evaluate, make_eval_loss_fn, train

SMOKE = os.environ.get("SAM_OPTAX_SMOKE", "0") == "1"
EPOCHS = 2 if SMOKE else 25
GRID = 7 if SMOKE else 21
print(f"backend={jax.default_backend()}, epochs={EPOCHS}")

# %% [markdown]
# ## Train SGD and SAM

# %%
dataset = data.load_dataset("digits")
model = models.get_model("cnn", dataset.num_classes)
trained = {}
for name in ("sgd", "sam"):
    result = train(model, dataset.x_train, dataset.y_train, TrainConfig(optimizer=name, epochs=EPOCHS), progress=False)
    trained[name] = result.state
    test_loss, test_acc = evaluate(model, result.state.params, result.state.batch_stats, dataset.x_test, dataset.y_test)
    print(f"{name}: test accuracy {100 * test_acc:.2f}%, test loss {test_loss:.4f}")

# %% [markdown]
# ## Hessian: λmax, λmin, their ratio, and the trace
# `loss_fn(params, batch)` is the eval-mode loss (BatchNorm statistics frozen, no
# dropout); the Hessian is that of the mean loss over the given batches.

# %%
batches = [{"x": dataset.x_train[i:i + 256], "y": dataset.y_train[i:i + 256]} for i in range(0, 512, 256)]
summaries = {}
for name, state in trained.items():
    loss_fn = make_eval_loss_fn(model, state.batch_stats)
    summaries[name] = analysis.sharpness_summary(loss_fn, state.params, batches, key=jax.random.key(0))
    s = summaries[name]
    print(f"{name}: λmax={s.lambda_max:.4g}  λmin={s.lambda_min:.4g}  |λmax/λmin|={s.lambda_ratio:.3g}  "
          f"trace={s.trace:.4g} ± {s.trace_stderr:.2g}  ({s.num_hvps} HVPs)")
    assert s.lambda_max > 0 and s.lambda_max >= s.lambda_min

# %%
top = analysis.hessian_eigenvalues(make_eval_loss_fn(model, trained["sgd"].batch_stats), trained["sgd"].params,
                                   batches, top_k=3, key=jax.random.key(1))
print("SGD top-3 eigenvalues:", np.round(top.eigenvalues, 4), f"({top.num_hvps} HVPs)")

# %% [markdown]
# ## Eigenvalue density (log scale, as PyHessian plots it)

# %%
densities = {name: analysis.spectral_density(make_eval_loss_fn(model, s.batch_stats), s.params, batches,
                                             key=jax.random.key(2), num_iters=20 if SMOKE else 80)
             for name, s in trained.items()}
for name, d in densities.items():
    assert abs(np.sum(d.density) * (d.grid[1] - d.grid[0]) - 1.0) < 1e-6
path = plotting.plot_spectral_density(densities, "density.png")
plt.imshow(plt.imread(path)); plt.axis("off"); plt.show()

# %% [markdown]
# ## Filter-normalized loss landscapes (1D and 2D)
# The same random directions for both models (same key), each rescaled filter by filter
# to the model's own weights.

# %%
alphas = np.linspace(-1, 1, 2 * GRID + 1)
grid = np.linspace(-1, 1, GRID)
curves, surfaces = {}, {}
for name, state in trained.items():
    loss_fn = make_eval_loss_fn(model, state.batch_stats)
    dx = analysis.filter_normalized_direction(state.params, jax.random.key(10))
    dy = analysis.filter_normalized_direction(state.params, jax.random.key(11))
    curves[name] = (alphas, analysis.loss_surface_1d(loss_fn, state.params, batches, dx, alphas))
    surfaces[name] = (grid, grid, analysis.loss_surface_2d(loss_fn, state.params, batches, dx, dy, grid, grid))
for path in (plotting.plot_loss_surface_1d(curves, "landscape_1d.png"),
             plotting.plot_loss_contour(surfaces, "landscape_2d.png"),
             plotting.plot_loss_surface_3d(surfaces, "landscape_3d.png")):
    plt.figure(figsize=(10, 4)); plt.imshow(plt.imread(path)); plt.axis("off"); plt.show()
