"""Dataset loaders on real bundled data and on small files written in the standard formats."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest

from sam_optax.experiments import data

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def test_digits_split_is_stratified_standardised_and_seeded():
  ds = data.load_dataset("digits")
  assert ds.x_train.shape[1:] == (8, 8, 1) and ds.x_train.dtype == np.float32
  assert len(ds.y_train) + len(ds.y_test) == 1797
  assert abs(len(ds.y_test) - 0.25 * 1797) < 10
  assert set(np.unique(ds.y_test)) == set(range(10))
  assert abs(float(ds.x_train.mean())) < 1e-4 and abs(float(ds.x_train.std()) - 1) < 1e-4
  again = data.load_dataset("digits")
  np.testing.assert_array_equal(ds.y_test, again.y_test)
  other = data.load_dataset("digits", seed=1)
  assert not np.array_equal(ds.y_test, other.y_test)


def write_idx(path, array):
  codes = {np.dtype(np.uint8): 0x08}
  header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(header + array.tobytes())


@pytest.mark.parametrize("compressed", [True, False])
def test_idx_parser_and_fashion_mnist_from_data_dir(tmp_path, compressed):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
  labels = (np.arange(20) % 10).astype(np.uint8)
  suffix = ".gz" if compressed else ""
  for stem, array in [("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels),
                      ("t10k-images-idx3-ubyte", images[:10]), ("t10k-labels-idx1-ubyte", labels[:10])]:
    write_idx(str(tmp_path / (stem + suffix)), array)
  np.testing.assert_array_equal(data.read_idx(str(tmp_path / ("train-images-idx3-ubyte" + suffix))), images)
  ds = data.load_dataset("fashion_mnist", data_dir=str(tmp_path))
  assert ds.x_train.shape == (20, 28, 28, 1) and ds.x_test.shape == (10, 28, 28, 1)
  np.testing.assert_array_equal(ds.y_train, labels)
  # Standardisation is x/255 with the training mean and std.
  scaled = images / 255.0
  np.testing.assert_allclose(ds.x_train[..., 0], (scaled - scaled.mean()) / scaled.std(), rtol=1e-4, atol=1e-5)


def test_idx_bad_magic_is_a_clear_error(tmp_path):
  path = tmp_path / "bad"
  path.write_bytes(b"\x01\x02\x03\x04")
  with pytest.raises(data.DatasetError, match="magic"):
    data.read_idx(str(path))


# The real files: the Debian package's when installed, else the first 300/100
# real training/test images shipped in tests/data (same idx format).
SUBSET_DIR = os.path.join(os.path.dirname(__file__), "data", "fashion-mnist-subset")
REAL_FASHION_DIR = FASHION_DIR if os.path.isdir(FASHION_DIR) else SUBSET_DIR


def test_real_fashion_mnist():
  # Fashion-MNIST's documented first labels (9 = ankle boot, 0 = T-shirt/top, ...).
  train_labels = data.read_idx(os.path.join(REAL_FASHION_DIR, "train-labels-idx1-ubyte.gz"))
  test_labels = data.read_idx(os.path.join(REAL_FASHION_DIR, "t10k-labels-idx1-ubyte.gz"))
  assert train_labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
  assert test_labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
  ds = data.load_dataset("fashion_mnist", data_dir=REAL_FASHION_DIR, train_size=200, test_size=80)
  assert ds.x_train.shape == (200, 28, 28, 1) and ds.x_test.shape == (80, 28, 28, 1)
  assert set(np.unique(ds.y_train)) == set(range(10))
  assert abs(float(ds.x_train.mean())) < 0.1 and np.isfinite(ds.x_test).all()


def test_missing_files_say_where_to_get_them(tmp_path):
  with pytest.raises(data.DatasetError, match="dataset-fashion-mnist"):
    data.load_dataset("fashion_mnist", data_dir=str(tmp_path))
  with pytest.raises(data.DatasetError, match="unknown dataset 'imagenet'"):
    data.load_dataset("imagenet")


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_from_python_pickles(tmp_path, classes):
  rng = np.random.default_rng(0)
  folder = tmp_path / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
  folder.mkdir()
  label_key = b"labels" if classes == 10 else b"fine_labels"
  names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if classes == 10 else ["train", "test"]
  expected_first = None
  for name in names:
    pixels = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
    if expected_first is None:
      expected_first = pixels[0].reshape(3, 32, 32).transpose(1, 2, 0)
    with open(folder / name, "wb") as f:
      pickle.dump({b"data": pixels, label_key: list(rng.integers(0, classes, size=4))}, f)
  ds = data.load_dataset(f"cifar{classes}", data_dir=str(tmp_path))
  train_count = 20 if classes == 10 else 4
  assert ds.x_train.shape == (train_count, 32, 32, 3) and ds.x_test.shape == (4, 32, 32, 3)
  assert ds.num_classes == classes
  # Channels-last layout: correlate the first image with its raw pixels.
  assert np.corrcoef(ds.x_train[0].ravel(), expected_first.ravel())[0, 1] > 0.999


def test_ts_parser(tmp_path):
  path = tmp_path / "Toy_TRAIN.ts"
  path.write_text("# comment\n@problemName Toy\n@univariate true\n@classLabel true a b\n@data\n"
                  "1.0,2.0,3.0:a\n4.0,5.0,6.5:b\n")
  series, labels = data.read_ts(str(path))
  np.testing.assert_array_equal(series, [[1, 2, 3], [4, 5, 6.5]])
  assert list(labels) == ["a", "b"]


def test_ucr_from_data_dir(tmp_path):
  folder = tmp_path / "GunPoint"
  folder.mkdir()
  for split, rows in [("TRAIN", "1,2,3,4:1\n2,3,4,5:2\n"), ("TEST", "0,1,0,1:2\n")]:
    (folder / f"GunPoint_{split}.ts").write_text("@data\n" + rows)
  ds = data.load_dataset("gunpoint", data_dir=str(tmp_path))
  assert ds.x_train.shape == (2, 4, 1) and ds.num_classes == 2
  np.testing.assert_array_equal(ds.y_train, [0, 1])
  np.testing.assert_array_equal(ds.y_test, [1])


def test_ucr_train_and_test_sizes_are_seeded_subsets(tmp_path):
  """--train-size/--test-size subset both UCR splits, seeded like every other set (the test split was ignored)."""
  folder = tmp_path / "GunPoint"
  folder.mkdir()
  rows = lambda count: "".join(f"{i},{i + 1},{2 * i},{i % 3}:{1 + i % 2}\n" for i in range(count))
  (folder / "GunPoint_TRAIN.ts").write_text("@data\n" + rows(10))
  (folder / "GunPoint_TEST.ts").write_text("@data\n" + rows(12))
  full = data.load_dataset("gunpoint", data_dir=str(tmp_path))
  for seed in (0, 3):
    ds = data.load_dataset("gunpoint", data_dir=str(tmp_path), seed=seed, train_size=4, test_size=5)
    assert ds.x_train.shape == (4, 4, 1) and ds.x_test.shape == (5, 4, 1) and len(ds.y_test) == 5
    x_test, y_test = data._subset(full.x_test, full.y_test, 5, seed + 1)  # pylint: disable=protected-access
    np.testing.assert_array_equal(ds.x_test, x_test)
    np.testing.assert_array_equal(ds.y_test, y_test)


def write_fashion_mnist(directory, count=20):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
  labels = (np.arange(count) % 10).astype(np.uint8)
  for stem, array in [("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels),
                      ("t10k-images-idx3-ubyte", images[:10]), ("t10k-labels-idx1-ubyte", labels[:10])]:
    write_idx(os.path.join(directory, stem + ".gz"), array)


@pytest.mark.parametrize("damage", ["truncated gzip", "corrupt gzip", "truncated idx"])
def test_corrupt_fashion_mnist_is_one_clear_line(tmp_path, capsys, damage):
  from sam_optax.experiments import cli  # pylint: disable=import-outside-toplevel

  write_fashion_mnist(str(tmp_path))
  path = tmp_path / "train-images-idx3-ubyte.gz"
  raw = path.read_bytes()
  if damage == "truncated gzip":  # an interrupted download
    path.write_bytes(raw[:len(raw) // 2])
  elif damage == "corrupt gzip":
    path.write_bytes(raw[:20] + bytes(b ^ 0xFF for b in raw[20:60]) + raw[60:])
  else:  # a complete gzip of an incomplete idx file
    with gzip.open(path, "rb") as f:
      content = f.read()
    with gzip.open(path, "wb") as f:
      f.write(content[:1000])
  with pytest.raises(data.DatasetError, match="corrupt or truncated"):
    data.read_idx(str(path))
  assert cli.main(["compare", "--dataset", "fashion_mnist", "--data-dir", str(tmp_path), "--epochs", "1"]) == 2
  error = capsys.readouterr().err
  assert error.startswith(f"sam-optax: error: {path}: corrupt or truncated") and error.count("\n") == 1


def test_corrupt_cifar_pickle_is_a_clear_error(tmp_path):
  folder = tmp_path / "cifar-10-batches-py"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    with open(folder / name, "wb") as f:
      pickle.dump({b"data": rng.integers(0, 256, size=(4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}, f)
  raw = (folder / "data_batch_3").read_bytes()
  (folder / "data_batch_3").write_bytes(raw[:len(raw) // 3])
  with pytest.raises(data.DatasetError, match="data_batch_3: corrupt or truncated CIFAR pickle"):
    data.load_dataset("cifar10", data_dir=str(tmp_path))
  with open(folder / "data_batch_3", "wb") as f:
    pickle.dump({b"pixels": [1, 2, 3]}, f)  # a pickle, but not a CIFAR batch
  with pytest.raises(data.DatasetError, match="data_batch_3: corrupt CIFAR-10 batch"):
    data.load_dataset("cifar10", data_dir=str(tmp_path))


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.4, 1.0])
def test_label_noise_flips_exactly_the_fraction_to_other_classes(fraction):
  labels = np.random.default_rng(0).integers(0, 10, size=1001)
  noisy = data.add_label_noise(labels, fraction, 10, seed=3)
  flipped = noisy != labels
  assert flipped.sum() == round(fraction * 1001)
  assert noisy.min() >= 0 and noisy.max() < 10
  np.testing.assert_array_equal(noisy, data.add_label_noise(labels, fraction, 10, seed=3))
  assert labels is not noisy


def test_iterate_batches_covers_each_example_once_and_is_seeded():
  x = np.arange(100)
  y = np.arange(100)
  batches = list(data.iterate_batches(x, y, 10, seed=5))
  assert len(batches) == 10
  np.testing.assert_array_equal(np.sort(np.concatenate([b[1] for b in batches])), y)
  again = list(data.iterate_batches(x, y, 10, seed=5))
  np.testing.assert_array_equal(batches[0][0], again[0][0])
  assert len(list(data.iterate_batches(x, y, 30, seed=5))) == 3  # drop_last
  assert len(list(data.iterate_batches(x, y, 30, seed=5, drop_last=False))) == 4


@pytest.mark.parametrize("call, match", [
    (lambda: list(data.iterate_batches(np.zeros((10, 3)), np.zeros(10), 0)), "batch_size must be an int >= 1, got 0"),
    (lambda: list(data.iterate_batches(np.zeros((10, 3)), np.zeros(10), True)), "batch_size must be an int >= 1"),
    (lambda: list(data.iterate_batches(np.zeros((10, 3)), np.zeros(5), 2)),
     r"x and y must have the same number of rows, got \{'x': 10\} and 5 labels"),
    (lambda: list(data.iterate_batches({"nodes": np.zeros((10, 3)), "mask": np.zeros((9, 3))}, np.zeros(10), 2)),
     "x and y must have the same number of rows"),
    (lambda: data.add_label_noise(np.zeros(10, int), 0.5, 1), "num_classes must be an int >= 2"),
    (lambda: data.load_digits(test_fraction=0.0), r"test_fraction must be a number in \(0, 1\), got 0.0"),
    (lambda: data.load_digits(test_fraction=float("nan")), "test_fraction must be a number in"),
    (lambda: data.load_digits(test_fraction=1), "test_fraction must be a number in"),
])
def test_bad_arguments_are_named(call, match):
  """These used to fail inside numpy (``range() arg 3 must not be zero``, ``low >= high``, ``cannot convert
  float NaN to integer``), or to run on silently: a y shorter than x dropped x's extra rows, ``test_fraction=0``
  gave an empty test set."""
  with pytest.raises(ValueError, match=match):
    call()


def test_generated_sets_are_seeded():
  for name in ("synthetic_sequences", "synthetic_graphs"):
    a = data.load_dataset(name, seed=0, train_size=20, test_size=10)
    b = data.load_dataset(name, seed=0, train_size=20, test_size=10)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert len(a.y_train) == 20 and len(a.y_test) == 10


def test_mitbih_csv_loader(tmp_path):
  # Rows exactly as the public CSVs: 187 comma-separated samples in [0, 1], then the label as a float.
  rng = np.random.default_rng(0)
  train_labels = np.array([0, 0, 0, 0, 0, 1, 1, 2, 3, 4, 2, 0])
  test_labels = np.array([0, 0, 0, 1, 2, 3, 4])
  for name, labels in (("mitbih_train.csv", train_labels), ("mitbih_test.csv", test_labels)):
    rows = np.concatenate([rng.uniform(0, 1, size=(len(labels), 187)), labels[:, None]], axis=1)
    np.savetxt(tmp_path / name, rows, delimiter=",", fmt="%.18e")
  x, y = data.read_mitbih_csv(str(tmp_path / "mitbih_train.csv"))
  assert x.shape == (12, 187) and list(y) == list(train_labels)
  unbalanced = data.load_mitbih(str(tmp_path), balance=False)
  assert unbalanced.x_train.shape == (12, 187, 1) and unbalanced.num_classes == 5
  raw = np.loadtxt(tmp_path / "mitbih_train.csv", delimiter=",")[:, :187]
  np.testing.assert_allclose(unbalanced.x_train[..., 0], (raw - raw.mean()) / raw.std(), rtol=1e-4, atol=1e-5)
  # Balanced as in the study: Normal beats (0) cut to the smallest other class (1 example of 3 or 4).
  ds = data.load_dataset("mitbih", data_dir=str(tmp_path))
  assert np.sum(ds.y_train == 0) == 1 and np.sum(ds.y_train == 2) == 2 and len(ds.y_train) == 7
  assert np.sum(ds.y_test == 0) == 1 and len(ds.y_test) == 5
  with pytest.raises(data.DatasetError, match="mitbih_train.csv"):
    data.load_dataset("mitbih", data_dir=str(tmp_path / "nowhere"))
  (tmp_path / "bad").mkdir()
  np.savetxt(tmp_path / "bad" / "mitbih_train.csv", np.zeros((2, 10)), delimiter=",")
  np.savetxt(tmp_path / "bad" / "mitbih_test.csv", np.zeros((2, 10)), delimiter=",")
  with pytest.raises(data.DatasetError, match="expected 188 columns"):
    data.load_mitbih(str(tmp_path / "bad"))


def write_tudataset(directory, name, graphs):
  """graphs: list of (num_nodes, undirected edge list (0-based, local), node labels, graph label)."""
  directory.mkdir(parents=True, exist_ok=True)
  a_lines, indicator, node_labels, graph_labels, offset = [], [], [], [], 0
  for g, (size, edges, labels, label) in enumerate(graphs):
    for i, j in edges:
      a_lines += [f"{offset + i + 1}, {offset + j + 1}", f"{offset + j + 1}, {offset + i + 1}"]
    indicator += [str(g + 1)] * size
    node_labels += [str(v) for v in labels]
    graph_labels.append(str(label))
    offset += size
  for suffix, lines in (("A", a_lines), ("graph_indicator", indicator), ("node_labels", node_labels),
                        ("graph_labels", graph_labels)):
    (directory / f"{name}_{suffix}.txt").write_text("\n".join(lines) + "\n")


def test_tudataset_text_format_loader(tmp_path):
  graphs = [
      (3, [(0, 1), (1, 2)], [0, 2, 0], 1),       # a path
      (4, [(0, 1), (1, 2), (2, 3), (3, 0)], [1, 1, 1, 1], 0),  # a square
      (2, [(0, 1)], [2, 0], 1),
      (3, [], [0, 0, 0], 0),                      # no edges
  ]
  write_tudataset(tmp_path / "Mutagenicity", "Mutagenicity", graphs)
  x, y = data.read_tudataset(str(tmp_path / "Mutagenicity"), "Mutagenicity")
  assert list(y) == [1, 0, 1, 0]
  assert x["nodes"].shape == (4, 4, 4)  # 3 node-label values one-hot + degree
  assert x["edges"].shape == (4, 8, 2) and x["edge_mask"].sum(1).tolist() == [4, 8, 2, 0]
  np.testing.assert_array_equal(x["node_mask"][0], [1, 1, 1, 0])
  # Graph 0: node labels 0, 2, 0 -> one-hot columns 0, 2, 0; degrees 1, 2, 1.
  np.testing.assert_array_equal(x["nodes"][0, :3, :3], [[1, 0, 0], [0, 0, 1], [1, 0, 0]])
  np.testing.assert_allclose(x["nodes"][0, :3, 3], [0.25, 0.5, 0.25])
  assert np.all(x["nodes"][0, 3] == 0)
  # Edges are local to their graph (0-based), both directions.
  local = {tuple(e) for e, m in zip(x["edges"][1], x["edge_mask"][1]) if m}
  assert local == {(0, 1), (1, 0), (1, 2), (2, 1), (2, 3), (3, 2), (3, 0), (0, 3)}
  # The loader (through the name or tu:NAME) splits the graphs, stratified by label.
  ds = data.load_dataset("mutagenicity", data_dir=str(tmp_path), seed=0)
  assert ds.num_classes == 2 and len(ds.y_train) + len(ds.y_test) == 4 and ds.input_shape == (4, 4)
  assert sorted(ds.y_test.tolist()) == [0, 1]
  same = data.load_dataset("tu:Mutagenicity", data_dir=str(tmp_path / "Mutagenicity"), seed=0)
  np.testing.assert_array_equal(same.x_train["edges"], ds.x_train["edges"])
  with pytest.raises(data.DatasetError, match="Mutagenicity_A.txt"):
    data.load_dataset("mutagenicity", data_dir=str(tmp_path / "nowhere"))


def test_tudataset_graphs_run_through_the_gcn(tmp_path):
  import jax
  from sam_optax.experiments import models

  graphs = [(3, [(0, 1), (1, 2)], [0, 1, 0], 1), (2, [(0, 1)], [1, 1], 0)]
  write_tudataset(tmp_path, "DS", graphs)
  x, _ = data.read_tudataset(str(tmp_path), "DS")
  model = models.get_model("gcn", 2)
  variables = model.init(jax.random.key(0), x)
  assert model.apply(variables, x).shape == (2, 2)
