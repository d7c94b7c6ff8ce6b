"""Flax (linen) models, one per architecture family of the SAM study.

Every model has the same call signature, ``model.apply(variables, x, train=...)``,
so one training loop serves them all: BatchNorm statistics live in the
``'batch_stats'`` collection (only :class:`WideResNet` has them) and dropout
draws from the ``'dropout'`` rng (only :class:`TransformerClassifier` uses it).
Linen keeps parameters a plain pytree, which is what the Hessian and
loss-landscape analysis work on.

=================  ===========================================  ===================
name               model                                        input ``x``
=================  ===========================================  ===================
``mlp``            :class:`MLP`                                  any (flattened)
``cnn``            :class:`CNN`                                  (B, H, W, C)
``wrn``            :class:`WideResNet` (WRN-depth-width, BN)     (B, H, W, C)
``transformer``    :class:`TransformerClassifier`                (B, length, channels)
``gcn``            :class:`GCN`                                  dict of padded graphs
=================  ===========================================  ===================
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

MODELS = ("mlp", "cnn", "wrn", "transformer", "gcn")
GRAPH_KEYS = ("nodes", "edges", "node_mask", "edge_mask")


def _check_array_input(model: str, x: Any, ranks: Sequence[int], layout: str) -> None:
  """A clear error, at trace time, for an input the model cannot take (not a crash deep inside it)."""
  if isinstance(x, Mapping):
    raise ValueError(f"{model} takes {layout} arrays, got a dict of {', '.join(map(str, x))} "
                     "(padded graphs are for gcn)")
  if getattr(x, "ndim", None) not in ranks:
    raise ValueError(f"{model} takes {layout} arrays, got shape {getattr(x, 'shape', type(x).__name__)}")


class MLP(nn.Module):
  """Flatten -> [Dense -> ReLU] x len(hidden_sizes) -> Dense(num_classes)."""

  num_classes: int
  hidden_sizes: Sequence[int] = (128, 64)

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    _check_array_input("mlp", x, range(2, 9), "batched (B, ...)")
    x = x.reshape(x.shape[0], -1)
    for size in self.hidden_sizes:
      x = nn.relu(nn.Dense(size)(x))
    return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
  """[Conv3x3 -> ReLU -> MaxPool2] x 2 -> Dense -> ReLU -> Dense (LeNet-like)."""

  num_classes: int
  features: Sequence[int] = (32, 64)
  hidden: int = 128

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    _check_array_input("cnn", x, (4,), "image (B, H, W, C)")
    for features in self.features:
      x = nn.relu(nn.Conv(features, (3, 3), padding="SAME")(x))
      if x.shape[1] >= 4:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(x)


class WideResidualBlock(nn.Module):
  """Pre-activation block: BN-ReLU-Conv3x3-BN-ReLU-Conv3x3 + (projected) shortcut."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
    y = nn.relu(norm()(x))
    shortcut = x
    if x.shape[-1] != self.features or self.strides != 1:
      shortcut = nn.Conv(self.features, (1, 1), strides=self.strides, use_bias=False)(y)
    y = nn.Conv(self.features, (3, 3), strides=self.strides, padding="SAME", use_bias=False)(y)
    y = nn.relu(norm()(y))
    y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False)(y)
    return y + shortcut


class WideResNet(nn.Module):
  """WRN-depth-width (Zagoruyko & Komodakis 2016), pre-activation, with BatchNorm.

  ``depth = 6n + 4``; three groups of ``n`` blocks with ``16k, 32k, 64k``
  channels (``k = width``). WRN-28-10 is the SAM paper's CIFAR model; WRN-10-1
  runs on a CPU.
  """

  num_classes: int
  depth: int = 10
  width: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    if (self.depth - 4) % 6:
      raise ValueError(f"WideResNet depth must be 6n + 4 (10, 16, 22, 28, ...), got {self.depth}")
    _check_array_input("wrn", x, (4,), "image (B, H, W, C)")
    blocks = (self.depth - 4) // 6
    x = nn.Conv(16, (3, 3), padding="SAME", use_bias=False)(x)
    for group, channels in enumerate((16, 32, 64)):
      for block in range(blocks):
        strides = 2 if group > 0 and block == 0 and x.shape[1] > 1 else 1
        x = WideResidualBlock(channels * self.width, strides)(x, train)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


class TransformerClassifier(nn.Module):
  """Transformer encoder for sequence classification (the study's ECG model).

  Patch embedding (``patch_size`` consecutive time steps -> one token, as in
  time-series transformers) + learned positional embedding ->
  ``num_layers`` pre-norm encoder blocks (multi-head self-attention, MLP,
  dropout) -> mean over time -> Dense(num_classes). Input (B, length, channels).
  """

  num_classes: int
  model_dim: int = 32
  num_heads: int = 4
  num_layers: int = 2
  mlp_dim: int = 64
  dropout_rate: float = 0.1
  patch_size: int = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    _check_array_input("transformer", x, (2, 3), "sequence (B, length) or (B, length, channels)")
    if x.ndim == 2:
      x = x[..., None]
    batch, length, channels = x.shape
    padding = -length % self.patch_size  # zero-pad the end to whole patches
    x = jnp.pad(x, ((0, 0), (0, padding), (0, 0)))
    length = (length + padding) // self.patch_size
    x = nn.Dense(self.model_dim)(x.reshape(batch, length, self.patch_size * channels))
    position = self.param("position_embedding", nn.initializers.normal(0.02), (1, length, self.model_dim))
    x = x + position
    dropout = lambda y: nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    for _ in range(self.num_layers):
      y = nn.LayerNorm()(x)
      y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=self.model_dim)(y, y)
      x = x + dropout(y)
      y = nn.LayerNorm()(x)
      y = nn.Dense(self.mlp_dim)(y)
      y = nn.Dense(self.model_dim)(nn.gelu(y))
      x = x + dropout(y)
    x = nn.LayerNorm()(x).mean(axis=1)
    return nn.Dense(self.num_classes)(x)


class GCN(nn.Module):
  """Graph convolutional network (Kipf & Welling 2017) for graph classification.

  Input: a dict of padded graphs, all arrays with a leading graph axis ``B``:

  - ``nodes``: (B, N, F) node features (padding rows are zero);
  - ``edges``: (B, E, 2) int32 directed edges (i -> j); padding edges are
    ``(0, 0)`` with ``edge_mask`` 0;
  - ``node_mask``: (B, N) 1 for real nodes; ``edge_mask``: (B, E).

  Each layer is ``H' = ReLU(D^-1/2 (A + I) D^-1/2 H W)``, computed with
  ``jax.ops.segment_sum`` over the edge list; a masked mean over nodes pools
  each graph.
  """

  num_classes: int
  hidden: int = 32
  num_layers: int = 2

  @nn.compact
  def __call__(self, graphs, train: bool = False):
    del train
    if not isinstance(graphs, Mapping) or any(key not in graphs for key in GRAPH_KEYS):
      got = f"a dict of {', '.join(map(str, graphs))}" if isinstance(graphs, Mapping) else (
          f"shape {getattr(graphs, 'shape', type(graphs).__name__)}")
      raise ValueError(f"gcn takes padded graphs, a dict of {', '.join(GRAPH_KEYS)}; got {got}")
    nodes, edges = graphs["nodes"], graphs["edges"]
    node_mask = graphs["node_mask"].astype(nodes.dtype)
    edge_mask = graphs["edge_mask"].astype(nodes.dtype)
    num_nodes = nodes.shape[1]

    def propagate(h, edges, node_mask, edge_mask):
      senders, receivers = edges[:, 0], edges[:, 1]
      degree = 1.0 + jax.ops.segment_sum(edge_mask, receivers, num_segments=num_nodes)
      norm = jax.lax.rsqrt(degree)
      weight = edge_mask * norm[senders] * norm[receivers]
      messages = jax.ops.segment_sum(h[senders] * weight[:, None], receivers, num_segments=num_nodes)
      return (messages + h * (norm * norm)[:, None]) * node_mask[:, None]

    h = nodes
    for _ in range(self.num_layers):
      h = nn.Dense(self.hidden)(h)
      h = nn.relu(jax.vmap(propagate)(h, edges, node_mask, edge_mask))
    pooled = jnp.sum(h * node_mask[..., None], axis=1) / jnp.maximum(node_mask.sum(1, keepdims=True), 1.0)
    return nn.Dense(self.num_classes)(pooled)


def get_model(name: str, num_classes: int, input_shape: Any = None, **options) -> nn.Module:
  """The model called ``name`` (one of ``MODELS``) for ``num_classes`` classes.

  Args:
    name: ``mlp``, ``cnn``, ``wrn``, ``transformer`` or ``gcn``.
    num_classes: output size.
    input_shape: the shape of one example (unused by the current models, kept
      so callers need not know which models need it).
    **options: the model's own fields, e.g. ``depth=16, width=2`` for ``wrn``.

  Raises:
    ValueError: for an unknown name, listing the choices.

  Example::

      >>> import jax, jax.numpy as jnp
      >>> model = get_model("wrn", num_classes=10, depth=10, width=1)  # WRN-10-1
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)), train=False)
      >>> model.apply(variables, jnp.ones((2, 8, 8, 1)), train=False).shape
      (2, 10)
  """
  del input_shape
  classes = {"mlp": MLP, "cnn": CNN, "wrn": WideResNet, "transformer": TransformerClassifier, "gcn": GCN}
  if name not in classes:
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
  return classes[name](num_classes=num_classes, **options)
