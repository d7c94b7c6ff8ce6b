"""Every experiment model trains on tiny real or generated data, with SAM."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sam_optax.experiments import data, models
from sam_optax.experiments.train import TrainConfig, evaluate, train


def param_count(params):
  return sum(leaf.size for leaf in jax.tree.leaves(params))


@pytest.fixture(scope="module")
def digits():
  return data.load_dataset("digits", train_size=512, test_size=256)


@pytest.mark.parametrize(
    "name,dataset,config,size_range",
    [
        ("mlp", "digits", TrainConfig(optimizer="sam", epochs=3, batch_size=32), (5e3, 5e4)),
        ("cnn", "digits", TrainConfig(optimizer="sam", epochs=3, batch_size=32), (2e4, 2e5)),
        ("wrn", "digits", TrainConfig(optimizer="sam", epochs=3, batch_size=32), (3e4, 2e5)),
        ("transformer", "synthetic_sequences",
         TrainConfig(optimizer="sam", base="adam", lr=3e-3, epochs=4, batch_size=16), (5e3, 1e5)),
        ("gcn", "synthetic_graphs",
         TrainConfig(optimizer="sam", base="adam", lr=3e-3, epochs=6, batch_size=16), (5e2, 2e4)),
    ],
)
def test_model_trains_with_sam(name, dataset, config, size_range, digits):
  ds = digits if dataset == "digits" else data.load_dataset(dataset, train_size=320, test_size=160)
  model = models.get_model(name, ds.num_classes, ds.input_shape)
  result = train(model, ds.x_train, ds.y_train, config, progress=False)
  assert size_range[0] <= param_count(result.state.params) <= size_range[1]
  losses = [h["train_batch_loss"] for h in result.history]
  assert losses[-1] < 0.7 * losses[0], losses
  loss, accuracy = evaluate(model, result.state.params, result.state.batch_stats, ds.x_test, ds.y_test)
  assert accuracy > 1.5 / ds.num_classes  # well above chance
  assert np.isfinite(loss)


def test_forward_shapes_and_batch_stats():
  x = jnp.ones((4, 8, 8, 1))
  for name in ("mlp", "cnn", "wrn"):
    model = models.get_model(name, 7)
    variables = model.init(jax.random.key(0), x)
    assert model.apply(variables, x).shape == (4, 7)
    assert ("batch_stats" in variables) == (name == "wrn")
  model = models.get_model("wrn", 7)
  variables = model.init(jax.random.key(0), x)
  x_random = jax.random.normal(jax.random.key(1), x.shape)
  _, updates = model.apply(variables, x_random, train=True, mutable=["batch_stats"])
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"], updates["batch_stats"])
  assert all(jax.tree.leaves(changed))
  sequences = jnp.ones((3, 30, 2))  # 30 is not a multiple of the patch size: padded
  model = models.get_model("transformer", 5)
  variables = model.init(jax.random.key(0), sequences)
  assert model.apply(variables, sequences).shape == (3, 5)
  out_a = model.apply(variables, sequences, train=True, rngs={"dropout": jax.random.key(1)})
  out_b = model.apply(variables, sequences, train=True, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(out_a, out_b)  # dropout is active in train mode


def test_wrn_depth_must_be_6n_plus_4():
  with pytest.raises(ValueError, match="6n"):
    models.get_model("wrn", 10, depth=12).init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))


def test_unknown_model_lists_choices():
  with pytest.raises(ValueError, match="mlp, cnn, wrn, transformer, gcn"):
    models.get_model("resnet", 10)


def dense_gcn_layer(nodes, edges, node_mask, edge_mask, kernel, bias):
  """One GCN layer from the dense formula ReLU(D^-1/2 (A + I) D^-1/2 H W + b) (numpy)."""
  n = nodes.shape[0]
  adjacency = np.zeros((n, n))
  for (i, j), m in zip(edges, edge_mask):
    if m:
      adjacency[j, i] += 1.0
  a_hat = adjacency + np.eye(n)
  degree = a_hat.sum(1)
  norm = np.diag(degree ** -0.5)
  h = nodes @ kernel + bias
  return np.maximum(norm @ a_hat @ norm @ h, 0.0) * node_mask[:, None]


def test_gcn_matches_dense_formula_and_is_permutation_invariant():
  ds = data.load_dataset("synthetic_graphs", train_size=4, test_size=2)
  model = models.get_model("gcn", 2, num_layers=1)
  graphs = jax.tree.map(jnp.asarray, ds.x_train)
  variables = model.init(jax.random.key(0), graphs)
  params = variables["params"]
  # Dense reference for graph 0: one layer, masked mean pooling, readout.
  g = {k: np.asarray(v[0]) for k, v in ds.x_train.items()}
  kernel, bias = (np.asarray(params["Dense_0"][k]) for k in ("kernel", "bias"))
  h = dense_gcn_layer(g["nodes"], g["edges"], g["node_mask"], g["edge_mask"], kernel, bias)
  pooled = h[g["node_mask"] > 0].mean(0)
  expected = pooled @ np.asarray(params["Dense_1"]["kernel"]) + np.asarray(params["Dense_1"]["bias"])
  np.testing.assert_allclose(model.apply(variables, graphs)[0], expected, rtol=1e-4, atol=1e-5)
  # Relabelling the real nodes of every graph does not change the output.
  size = int(g["node_mask"].sum())
  permutation = np.concatenate([np.random.default_rng(0).permutation(size), np.arange(size, g["nodes"].shape[0])])
  inverse = np.argsort(permutation)
  permuted = dict(g)
  permuted["nodes"] = g["nodes"][permutation]
  permuted["node_mask"] = g["node_mask"][permutation]
  permuted["edges"] = inverse[g["edges"]] * (g["edge_mask"][:, None] > 0)
  batch = jax.tree.map(lambda a: jnp.asarray(a)[None], permuted)
  np.testing.assert_allclose(model.apply(variables, batch)[0], model.apply(variables, graphs)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,kind,message", [
    ("mlp", "graphs", "mlp takes batched (B, ...) arrays, got a dict of edge_mask, edges, node_mask, nodes "
                      "(padded graphs are for gcn)"),
    ("cnn", "sequences", "cnn takes image (B, H, W, C) arrays, got shape (2, 24, 1)"),
    ("wrn", "sequences", "wrn takes image (B, H, W, C) arrays, got shape (2, 24, 1)"),  # was a (3,) output
    ("transformer", "images", "transformer takes sequence (B, length) or (B, length, channels) arrays, "
                              "got shape (2, 8, 8, 1)"),
    ("gcn", "images", "gcn takes padded graphs, a dict of nodes, edges, node_mask, edge_mask; got shape (2, 8, 8, 1)"),
])
def test_a_model_refuses_inputs_it_cannot_take(name, kind, message):
  graphs = data.make_synthetic_graphs(0, train_size=4, test_size=2).x_train
  inputs = {"images": jnp.ones((2, 8, 8, 1)), "sequences": jnp.ones((2, 24, 1)),
            "graphs": jax.tree.map(lambda leaf: jnp.asarray(leaf[:2]), graphs)}
  model = models.get_model(name, 3)
  with pytest.raises(ValueError) as error:
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), inputs[kind])
  assert str(error.value) == message
