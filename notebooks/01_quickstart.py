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
# # sam_optax quick start: SAM and Friendly-SAM in one line
#
# Sharpness-aware minimization (Foret et al., 2021) replaces the gradient at the
# weights `w` by the gradient at an adversarially perturbed point:
#
# $$\epsilon = \rho\,\frac{g}{\|g\|_2},\qquad w \leftarrow w - \eta\,\nabla L(w + \epsilon).$$
#
# Friendly-SAM (Li et al., 2024) perturbs along the gradient *noise* instead:
# `d = g - sigma * m`, with `m` an exponential moving average of past gradients.
#
# In `sam_optax` both are an Optax transformation you put first in a chain.
# This notebook trains a small Flax NNX CNN with SGD, SAM and F-SAM and compares them.

# %%
# On Colab: install the package (skipped when it is already importable).
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
import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import sam_optax
from sam_optax.flax_utils import make_nnx_grad_fn, make_nnx_train_step

backend, devices = jax.default_backend(), jax.device_count()
SMOKE = os.environ.get("SAM_OPTAX_SMOKE", "0") == "1"  # CI: tiny budget
EPOCHS = 1 if SMOKE else (8 if backend == "cpu" else 30)
print(f"backend={backend}, devices={devices}, smoke={SMOKE}, epochs={EPOCHS}")

# %% [markdown]
# ## Data
# CIFAR-10 through tensorflow-datasets when it is installed and online (Colab);
# otherwise Fashion-MNIST from the Debian package `dataset-fashion-mnist`, or
# scikit-learn's bundled digits. All real data.

# %%
from sam_optax.experiments import data as data_lib


def load():
    if not SMOKE and backend != "cpu":
        try:
            return data_lib.load_dataset("cifar10")
        except data_lib.DatasetError as error:
            print("CIFAR-10 unavailable:", error)
    if not SMOKE:
        try:
            return data_lib.load_dataset("fashion_mnist", train_size=10_000, test_size=2_000)
        except data_lib.DatasetError:
            pass
    return data_lib.load_dataset("digits")


dataset = load()
x_train, y_train, x_test, y_test = dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test
print(dataset.name, x_train.shape, x_test.shape)


# %% [markdown]
# ## A Flax NNX model

# %%
class CNN(nnx.Module):
    def __init__(self, channels: int, num_classes: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(channels, 16, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.head = nnx.Linear(32, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), (2, 2))
        x = nnx.relu(self.conv2(x)).mean(axis=(1, 2))
        return self.head(self.dropout(x))


def loss_fn(model, batch):
    logits = model(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


# %% [markdown]
# ## The one-line change
# `make_nnx_grad_fn` turns the NNX loss into the `grad_fn(params, batch, model_state)`
# the transformation calls at `w + eps`. `make_nnx_train_step` writes the step around it:
# it copies the model's non-parameter state (here the dropout rng count) *before* pass 1
# and hands that snapshot to `optimizer.update(..., model_state=snapshot)`, so the
# perturbed pass draws the same dropout mask as pass 1, and the model keeps pass 1's
# state. (Passing the live `nnx.state(model, nnx.Not(nnx.Param))` instead would give
# pass 2 a new mask: pass 1 has already advanced the rng.)

# %%
def make_optimizer(name, model, steps):
    learning_rate = optax.cosine_decay_schedule(0.05, steps)
    base = optax.sgd(learning_rate, momentum=0.9)
    grad_fn = make_nnx_grad_fn(loss_fn, nnx.graphdef(model))
    if name == "sam":
        tx = optax.chain(sam_optax.sam_perturb(grad_fn, rho=0.05), base)
    elif name == "fsam":
        tx = optax.chain(sam_optax.fsam_perturb(grad_fn, rho=0.05, sigma=1.0, lmbda=0.9), base)
    else:
        tx = base
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


# The same step for every optimizer (plain SGD ignores batch= and model_state=).
train_step = nnx.jit(make_nnx_train_step(loss_fn))


@nnx.jit
def accuracy(model, x, y):
    return jnp.mean(jnp.argmax(model(x), -1) == y)


def train(name, seed=0, batch_size=64):
    model = CNN(x_train.shape[-1], dataset.num_classes, rngs=nnx.Rngs(seed))
    steps_per_epoch = len(y_train) // batch_size
    optimizer = make_optimizer(name, model, EPOCHS * steps_per_epoch)
    history = {"loss": [], "test_acc": []}
    start = time.perf_counter()
    for epoch in range(EPOCHS):
        order = np.random.default_rng([seed, epoch]).permutation(len(y_train))
        model.train()
        losses = [train_step(model, optimizer, {"x": x_train[i], "y": y_train[i]})
                  for i in np.split(order[: steps_per_epoch * batch_size], steps_per_epoch)]
        model.eval()
        history["loss"].append(float(np.mean(losses)))
        history["test_acc"].append(float(accuracy(model, x_test, y_test)))
    history["seconds"] = time.perf_counter() - start
    return model, history


results = {name: train(name)[1] for name in ("sgd", "sam", "fsam")}
for name, history in results.items():
    print(f"{name:5s} test accuracy {100 * history['test_acc'][-1]:.2f}%  ({history['seconds']:.1f} s)")

# %%
# The notebook checks itself: every run learned (far above chance).
for name, history in results.items():
    assert history["test_acc"][-1] > 2.0 / dataset.num_classes, (name, history)

# %%
figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
for name, history in results.items():
    epochs = np.arange(1, EPOCHS + 1)
    left.plot(epochs, history["loss"], marker="o", label=name)
    right.plot(epochs, 100 * np.array(history["test_acc"]), marker="o", label=name)
left.set(xlabel="epoch", ylabel="training loss")
right.set(xlabel="epoch", ylabel="test accuracy (%)")
left.legend()
plt.show()

# %% [markdown]
# Next: `02_multi_device` (pmap / sharding, m-sharpness) and
# `03_sharpness_analysis` (Hessian spectra and loss landscapes).
