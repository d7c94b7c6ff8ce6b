"""Real datasets for ``sam-optax compare`` (nothing is downloaded at run time).

==========================  ==================================================================
name                        source
==========================  ==================================================================
``digits`` (default)        scikit-learn's bundled 8x8 digits (1,797 real images, 10 classes)
``fashion_mnist``           the standard idx(.gz) files in ``data_dir`` or in
                            ``/usr/share/datasets/fashion-mnist`` (Debian package
                            ``dataset-fashion-mnist``)
``cifar10`` / ``cifar100``  the python-pickle batches in ``data_dir`` (the official
                            ``cifar-10-python.tar.gz`` unpacked), else tensorflow-datasets,
                            else Hugging Face ``datasets`` (both need the internet once)
``gunpoint``,               UCR time series shipped inside the ``aeon`` wheel
``italy_power_demand``      (``pip install aeon``), read from its ``.ts`` files
``synthetic_sequences``     generated sequences (seeded) for the transformer
``synthetic_graphs``        generated graphs (seeded) for the GCN: no real graph set is
                            available offline
``mitbih``                  the MIT-BIH arrhythmia heartbeats (the SAM study's ECG set) from
                            ``mitbih_train.csv`` / ``mitbih_test.csv`` in ``data_dir`` (the
                            public CSVs: 187 samples and a label per row, no header)
``mutagenicity``,           a TUDataset in its text format in ``data_dir`` (``DS_A.txt``,
``tu:NAME``                 ``DS_graph_indicator.txt``, ``DS_graph_labels.txt``,
                            ``DS_node_labels.txt``); the study's graph set is Mutagenicity
==========================  ==================================================================
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import struct
import zlib
from typing import Any, Iterator, NamedTuple, Optional

import numpy as np

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
DATASETS = ("digits", "fashion_mnist", "cifar10", "cifar100", "gunpoint", "italy_power_demand",
            "synthetic_sequences", "synthetic_graphs", "mitbih", "mutagenicity")


class DatasetError(ValueError):
  """A dataset that is unknown or whose files are missing or corrupt; the message says where to get it."""


def check_dataset_name(name: str) -> None:
  """Raises :class:`DatasetError` unless ``name`` is one of ``DATASETS`` or ``tu:NAME``.

  Example::

      >>> check_dataset_name("tu:MUTAG")  # any TUDataset, by its file prefix
      >>> check_dataset_name("mnist")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      sam_optax.experiments.data.DatasetError: unknown dataset 'mnist'; choose from digits, ..., mutagenicity or tu:NAME
  """
  if not (name in DATASETS or (isinstance(name, str) and name.startswith("tu:") and len(name) > 3)):
    raise DatasetError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)} or tu:NAME")


class Dataset(NamedTuple):
  """A train/test split. Inputs are float32 (standardised); labels int32.

  For graph data, ``x_train``/``x_test`` are dicts of padded arrays (see
  :class:`sam_optax.experiments.models.GCN`), indexable along axis 0.
  """

  name: str
  x_train: Any
  y_train: np.ndarray
  x_test: Any
  y_test: np.ndarray
  num_classes: int
  input_shape: tuple


def _subset(x, y, size: Optional[int], seed: int):
  if size is None or size >= len(y):
    return x, y
  index = np.sort(np.random.default_rng(seed).permutation(len(y))[:size])
  return (x[index] if not isinstance(x, dict) else {k: v[index] for k, v in x.items()}), y[index]


def _standardise(x_train: np.ndarray, x_test: np.ndarray):
  mean, std = x_train.mean(), x_train.std()
  return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int):
  if not (isinstance(test_fraction, (int, float, np.floating)) and not isinstance(test_fraction, bool)
          and 0.0 < test_fraction < 1.0):
    raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
  rng = np.random.default_rng(seed)
  train, test = [], []
  for label in np.unique(y):
    index = rng.permutation(np.flatnonzero(y == label))
    cut = int(round(len(index) * test_fraction))
    if test_fraction > 0 and len(index) > 1:
      cut = min(max(cut, 1), len(index) - 1)  # every class on both sides when it can be
    test.extend(index[:cut])
    train.extend(index[cut:])
  return np.sort(np.array(train, np.int64)), np.sort(np.array(test, np.int64))


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> Dataset:
  """scikit-learn's digits: (8, 8, 1) images, a seeded stratified split."""
  from sklearn.datasets import load_digits as sklearn_digits  # pylint: disable=import-outside-toplevel

  data = sklearn_digits()
  x = (data.images / 16.0).astype(np.float32)[..., None]
  y = data.target.astype(np.int32)
  train, test = _stratified_split(y, test_fraction, seed)
  x_train, x_test = _standardise(x[train], x[test])
  return Dataset("digits", x_train, y[train], x_test, y[test], 10, (8, 8, 1))


def read_idx(path: str) -> np.ndarray:
  """Reads an idx file (MNIST format; gzip-compressed if the name ends in .gz).

  Raises:
    DatasetError: not an idx file, or a corrupt or truncated one.
  """
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (EOFError, gzip.BadGzipFile, zlib.error) as error:
    raise DatasetError(f"{path}: corrupt or truncated file ({type(error).__name__}: {error}); download it "
                       f"again") from error
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise DatasetError(f"{path} is not an idx file (bad magic number)")
  dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
  if data[2] not in dtypes:
    raise DatasetError(f"{path}: unknown idx element type 0x{data[2]:02x}")
  ndim = data[3]
  dtype = np.dtype(dtypes[data[2]])
  if len(data) < 4 + 4 * ndim:
    raise DatasetError(f"{path}: corrupt or truncated idx file (the header ends early); download it again")
  shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
  expected = int(np.prod(shape))
  if len(data) - 4 - 4 * ndim != expected * dtype.itemsize:
    raise DatasetError(f"{path}: corrupt or truncated idx file: expected {expected} elements, found "
                       f"{(len(data) - 4 - 4 * ndim) / dtype.itemsize:g}; download it again")
  array = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
  return array.reshape(shape)


def _find_idx(directory: str, stem: str) -> Optional[str]:
  for name in (stem + ".gz", stem):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  return None


def load_fashion_mnist(data_dir: Optional[str] = None, seed: int = 0,
                       train_size: Optional[int] = None, test_size: Optional[int] = None) -> Dataset:
  """Fashion-MNIST from its idx files; optional seeded subsets for CPU runs."""
  directories = [data_dir] if data_dir else list(FASHION_MNIST_DIRS)
  stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
  for directory in directories:
    paths = [_find_idx(directory, stem) for stem in stems]
    if all(paths):
      break
  else:
    raise DatasetError(
        f"Fashion-MNIST idx files ({', '.join(s + '[.gz]' for s in stems)}) not found in "
        f"{', '.join(directories)}. Install them with `apt-get install dataset-fashion-mnist` "
        f"(Debian/Ubuntu, into /usr/share/datasets/fashion-mnist) or download them from "
        f"https://github.com/zalandoresearch/fashion-mnist and pass --data-dir."
    )
  x_train, y_train, x_test, y_test = (read_idx(p) for p in paths)
  x_train, y_train = _subset(x_train, y_train.astype(np.int32), train_size, seed)
  x_test, y_test = _subset(x_test, y_test.astype(np.int32), test_size, seed + 1)
  x_train, x_test = _standardise(x_train[..., None] / 255.0, x_test[..., None] / 255.0)
  return Dataset("fashion_mnist", x_train, y_train, x_test, y_test, 10, (28, 28, 1))


def _cifar_from_pickles(directory: str, classes: int):
  folder = "cifar-10-batches-py" if classes == 10 else "cifar-100-python"
  root = os.path.join(directory, folder) if os.path.isdir(os.path.join(directory, folder)) else directory
  train_files = [f"data_batch_{i}" for i in range(1, 6)] if classes == 10 else ["train"]
  test_files = ["test_batch"] if classes == 10 else ["test"]
  label_key = b"labels" if classes == 10 else b"fine_labels"

  def read(names):
    xs, ys = [], []
    for name in names:
      path = os.path.join(root, name)
      if not os.path.exists(path):
        return None
      try:
        with open(path, "rb") as f:
          batch = pickle.load(f, encoding="bytes")
      except Exception as error:  # pylint: disable=broad-except  # unpickling fails in many ways
        raise DatasetError(f"{path}: corrupt or truncated CIFAR pickle ({type(error).__name__}: {error}); "
                           f"unpack cifar-{classes}-python.tar.gz again") from error
      try:
        xs.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(batch[label_key], np.int32))
      except (KeyError, TypeError, ValueError) as error:
        raise DatasetError(f"{path}: corrupt CIFAR-{classes} batch: no {label_key!r} and b'data' of "
                           f"3072-pixel rows ({type(error).__name__}: {error})") from error
    return np.concatenate(xs), np.concatenate(ys)

  train, test = read(train_files), read(test_files)
  if train is None or test is None:
    return None
  return train + test


def _cifar_from_hub(classes: int):
  name = f"cifar{classes}"
  if importlib.util.find_spec("tensorflow_datasets") is not None:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    train = tfds.as_numpy(tfds.load(name, split="train", batch_size=-1, as_supervised=True))
    test = tfds.as_numpy(tfds.load(name, split="test", batch_size=-1, as_supervised=True))
    return train[0], train[1].astype(np.int32), test[0], test[1].astype(np.int32)
  if importlib.util.find_spec("datasets") is not None:
    import datasets as hf_datasets  # pylint: disable=import-outside-toplevel

    data = hf_datasets.load_dataset(name)
    image_key = "img"
    label_key = "label" if classes == 10 else "fine_label"
    arrays = []
    for split in ("train", "test"):
      arrays.append(np.stack([np.asarray(image) for image in data[split][image_key]]))
      arrays.append(np.asarray(data[split][label_key], np.int32))
    return tuple(arrays)
  return None


def load_cifar(classes: int = 10, data_dir: Optional[str] = None, seed: int = 0,
               train_size: Optional[int] = None, test_size: Optional[int] = None) -> Dataset:
  """CIFAR-10/100: local pickles in ``data_dir``, else tensorflow-datasets, else HF datasets."""
  arrays = _cifar_from_pickles(data_dir, classes) if data_dir else None
  if arrays is None:
    try:
      arrays = _cifar_from_hub(classes)
    except Exception as error:  # pylint: disable=broad-except  # offline, no cache, ...
      raise DatasetError(f"could not load CIFAR-{classes} through tensorflow-datasets / datasets: {error}. "
                         f"Download https://www.cs.toronto.edu/~kriz/cifar-{classes}-python.tar.gz, "
                         f"unpack it and pass --data-dir.") from error
  if arrays is None:
    raise DatasetError(
        f"CIFAR-{classes} not found: pass --data-dir with the unpacked python version "
        f"(https://www.cs.toronto.edu/~kriz/cifar-{classes}-python.tar.gz), or install "
        f"tensorflow-datasets or datasets on a machine with internet access (e.g. Colab).")
  x_train, y_train, x_test, y_test = arrays
  x_train, y_train = _subset(x_train, y_train, train_size, seed)
  x_test, y_test = _subset(x_test, y_test, test_size, seed + 1)
  x_train, x_test = _standardise(x_train / 255.0, x_test / 255.0)
  return Dataset(f"cifar{classes}", x_train, y_train, x_test, y_test, classes, (32, 32, 3))


def read_ts(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads a univariate, equal-length sktime/aeon ``.ts`` file: (series, labels as strings)."""
  series, labels, in_data = [], [], False
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      if not in_data:
        in_data = line.lower().startswith("@data")
        continue
      *values, label = line.split(":")
      if len(values) != 1:
        raise DatasetError(f"{path}: only univariate .ts files are supported")
      series.append([float(v) for v in values[0].split(",")])
      labels.append(label.strip())
  if not series:
    raise DatasetError(f"{path}: no @data section")
  return np.asarray(series, np.float32), np.asarray(labels)


UCR_NAMES = {"gunpoint": "GunPoint", "italy_power_demand": "ItalyPowerDemand"}


def load_ucr(name: str, data_dir: Optional[str] = None) -> Dataset:
  """A UCR set from ``data_dir`` or from the data the ``aeon`` wheel ships."""
  folder = UCR_NAMES[name]
  directory = os.path.join(data_dir, folder) if data_dir else None
  if directory is None or not os.path.isdir(directory):
    spec = importlib.util.find_spec("aeon")
    if spec is None or not spec.submodule_search_locations:
      raise DatasetError(f"{folder} ships with the aeon package: `pip install aeon` (or pass --data-dir "
                         f"with {folder}/{folder}_TRAIN.ts and _TEST.ts)")
    directory = os.path.join(spec.submodule_search_locations[0], "datasets", "data", folder)
  paths = [os.path.join(directory, f"{folder}_{split}.ts") for split in ("TRAIN", "TEST")]
  for path in paths:
    if not os.path.exists(path):
      raise DatasetError(f"missing {path}; `pip install aeon` ships it")
  (x_train, labels_train), (x_test, labels_test) = read_ts(paths[0]), read_ts(paths[1])
  classes = sorted(set(labels_train) | set(labels_test))
  y_train = np.searchsorted(classes, labels_train).astype(np.int32)
  y_test = np.searchsorted(classes, labels_test).astype(np.int32)
  x_train, x_test = _standardise(x_train[..., None], x_test[..., None])
  return Dataset(name, x_train, y_train, x_test, y_test, len(classes), x_train.shape[1:])


def make_synthetic_sequences(seed: int = 0, train_size: int = 600, test_size: int = 300,
                             length: int = 32, num_classes: int = 3) -> Dataset:
  """Noisy sinusoids whose class is the frequency band: a learnable sequence task."""
  rng = np.random.default_rng(seed)
  n = train_size + test_size
  labels = rng.integers(0, num_classes, size=n).astype(np.int32)
  t = np.linspace(0, 1, length)
  frequency = 1.0 + 2.0 * labels + rng.uniform(-0.4, 0.4, size=n)
  phase = rng.uniform(0, 2 * np.pi, size=n)
  x = np.sin(2 * np.pi * frequency[:, None] * t[None, :] + phase[:, None])
  x = (x + 0.3 * rng.normal(size=x.shape)).astype(np.float32)[..., None]
  x_train, x_test = _standardise(x[:train_size], x[train_size:])
  return Dataset("synthetic_sequences", x_train, labels[:train_size], x_test, labels[train_size:],
                 num_classes, (length, 1))


def make_synthetic_graphs(seed: int = 0, train_size: int = 400, test_size: int = 200,
                          max_nodes: int = 16, max_edges: int = 96) -> Dataset:
  """Random graphs labelled by how densely connected they are.

  Class 0: Erdos-Renyi graphs with edge probability 0.15; class 1: 0.35. The
  number of nodes varies (8 to ``max_nodes``); node features are a constant, the
  node degree divided by 4 (as for TU datasets without node labels) and noise.
  """
  rng = np.random.default_rng(seed)
  n = train_size + test_size
  nodes = np.zeros((n, max_nodes, 3), np.float32)
  edges = np.zeros((n, max_edges, 2), np.int32)
  node_mask = np.zeros((n, max_nodes), np.float32)
  edge_mask = np.zeros((n, max_edges), np.float32)
  labels = rng.integers(0, 2, size=n).astype(np.int32)
  for g in range(n):
    size = int(rng.integers(8, max_nodes + 1))
    probability = 0.35 if labels[g] else 0.15
    pairs = [(i, j) for i in range(size) for j in range(i + 1, size) if rng.uniform() < probability]
    pairs = [pairs[i] for i in rng.permutation(len(pairs))[: max_edges // 2]]
    directed = pairs + [(j, i) for i, j in pairs]
    if directed:
      edges[g, : len(directed)] = directed
      edge_mask[g, : len(directed)] = 1.0
    degree = np.bincount([j for _, j in directed], minlength=size)[:size]
    nodes[g, :size, 0] = 1.0
    nodes[g, :size, 1] = degree / 4.0
    nodes[g, :size, 2] = rng.normal(size=size)
    node_mask[g, :size] = 1.0
  x = {"nodes": nodes, "edges": edges, "node_mask": node_mask, "edge_mask": edge_mask}
  split = lambda lo, hi: {k: v[lo:hi] for k, v in x.items()}
  return Dataset("synthetic_graphs", split(0, train_size), labels[:train_size], split(train_size, n),
                 labels[train_size:], 2, (max_nodes, 3))


MITBIH_FILES = ("mitbih_train.csv", "mitbih_test.csv")


def read_mitbih_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
  """One MIT-BIH heartbeat CSV: rows of 187 samples (in [0, 1]) then the class (0..4), no header."""
  try:
    table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
  except ValueError as error:
    raise DatasetError(f"{path}: not a numeric CSV of 187 samples and a label per row ({error})") from error
  if table.shape[1] != 188:
    raise DatasetError(f"{path}: expected 188 columns (187 samples + label) per row, found {table.shape[1]}")
  labels = table[:, -1]
  if not np.all(labels == np.round(labels)) or labels.min() < 0:
    raise DatasetError(f"{path}: the last column must hold integer class labels")
  return table[:, :-1].astype(np.float32), labels.astype(np.int32)


def _downsample_class(x, y, label: int, keep: int, seed: int):
  index = np.flatnonzero(y == label)
  if len(index) <= keep:
    return x, y
  drop = np.random.default_rng(seed).permutation(index)[keep:]
  mask = np.ones(len(y), bool)
  mask[drop] = False
  return x[mask], y[mask]


def load_mitbih(data_dir: Optional[str], seed: int = 0, train_size: Optional[int] = None,
                test_size: Optional[int] = None, balance: bool = True) -> Dataset:
  """The MIT-BIH arrhythmia heartbeats (Kachuee et al. 2018's CSVs), as the SAM study used them.

  ``balance=True`` down-samples the Normal class (label 0) of each split to the
  size of the split's smallest other class, as the study did (19,659 of the
  109,446 beats). Inputs are (187, 1) series, standardised with the training
  mean and standard deviation.
  """
  if not data_dir or not all(os.path.exists(os.path.join(data_dir, f)) for f in MITBIH_FILES):
    raise DatasetError(
        f"MIT-BIH heartbeats: put {' and '.join(MITBIH_FILES)} (the public 'ECG Heartbeat Categorization' "
        f"CSVs, 187 samples + label per row) in a folder and pass --data-dir "
        f"(looked in {data_dir or 'no --data-dir'})")
  (x_train, y_train), (x_test, y_test) = (read_mitbih_csv(os.path.join(data_dir, f)) for f in MITBIH_FILES)
  if balance:
    for split, (x, y) in enumerate(((x_train, y_train), (x_test, y_test))):
      others = [int(np.sum(y == c)) for c in np.unique(y) if c != 0]
      if others:
        x, y = _downsample_class(x, y, 0, min(others), seed + split)
      if split == 0:
        x_train, y_train = x, y
      else:
        x_test, y_test = x, y
  x_train, y_train = _subset(x_train, y_train, train_size, seed)
  x_test, y_test = _subset(x_test, y_test, test_size, seed + 1)
  num_classes = int(max(y_train.max(), y_test.max())) + 1
  x_train, x_test = _standardise(x_train[..., None], x_test[..., None])
  return Dataset("mitbih", x_train, y_train, x_test, y_test, max(num_classes, 5), x_train.shape[1:])


def _read_ints(path: str, columns: int) -> np.ndarray:
  try:
    table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
  except ValueError as error:
    raise DatasetError(f"{path}: expected {columns} comma-separated integer(s) per line ({error})") from error
  if table.shape[1] != columns:
    raise DatasetError(f"{path}: expected {columns} integer(s) per line, found {table.shape[1]}")
  return table if columns > 1 else table[:, 0]


def read_tudataset(directory: str, name: str) -> tuple[dict, np.ndarray]:
  """A TUDataset in its text format, as padded graphs for :class:`~sam_optax.experiments.models.GCN`.

  Files (1-based node and graph ids): ``{name}_A.txt`` (one directed edge
  ``i, j`` per line; undirected graphs list both directions),
  ``{name}_graph_indicator.txt`` (node i's graph), ``{name}_graph_labels.txt``
  (one label per graph) and, if present, ``{name}_node_labels.txt`` (one
  integer label per node, one-hot encoded). Node features are the one-hot node
  label and the degree divided by 4. Graph labels are mapped to ``0..C-1`` in
  sorted order (e.g. -1/1 -> 0/1).

  Returns:
    ``(graphs, labels)``: ``graphs`` has ``nodes`` (G, N, F), ``edges`` (G, E, 2),
    ``node_mask`` (G, N) and ``edge_mask`` (G, E), padded to the largest graph.
  """
  path = lambda suffix: os.path.join(directory, f"{name}_{suffix}.txt")
  required = [path(s) for s in ("A", "graph_indicator", "graph_labels")]
  missing = [p for p in required if not os.path.exists(p)]
  if missing:
    raise DatasetError(f"TUDataset {name}: missing {', '.join(missing)}; download {name}.zip from "
                       f"the TUDataset collection (chrsmrrs.github.io/datasets), unpack it and pass --data-dir")
  edges = _read_ints(path("A"), 2) - 1
  indicator = _read_ints(path("graph_indicator"), 1) - 1
  graph_labels = _read_ints(path("graph_labels"), 1)
  num_graphs, num_nodes = len(graph_labels), len(indicator)
  if indicator.min() < 0 or indicator.max() >= num_graphs or np.any(np.diff(indicator) < 0):
    raise DatasetError(f"{path('graph_indicator')}: graph ids must be 1..{num_graphs} in non-decreasing order")
  if edges.size and (edges.min() < 0 or edges.max() >= num_nodes):
    raise DatasetError(f"{path('A')}: node ids must be 1..{num_nodes}")
  if edges.size and np.any(indicator[edges[:, 0]] != indicator[edges[:, 1]]):
    raise DatasetError(f"{path('A')}: an edge joins two different graphs")
  if os.path.exists(path("node_labels")):
    node_labels = _read_ints(path("node_labels"), 1)
    if len(node_labels) != num_nodes:
      raise DatasetError(f"{path('node_labels')}: {len(node_labels)} labels for {num_nodes} nodes")
    values = np.unique(node_labels)
    one_hot = np.eye(len(values), dtype=np.float32)[np.searchsorted(values, node_labels)]
  else:
    one_hot = np.ones((num_nodes, 1), np.float32)
  first_node = np.searchsorted(indicator, np.arange(num_graphs))
  sizes = np.bincount(indicator, minlength=num_graphs)
  edge_graph = indicator[edges[:, 0]] if edges.size else np.zeros(0, np.int64)
  edge_counts = np.bincount(edge_graph, minlength=num_graphs)
  max_nodes, max_edges = int(max(sizes.max(), 1)), int(max(edge_counts.max(), 1))
  features = one_hot.shape[1] + 1
  nodes = np.zeros((num_graphs, max_nodes, features), np.float32)
  padded_edges = np.zeros((num_graphs, max_edges, 2), np.int32)
  node_mask = np.zeros((num_graphs, max_nodes), np.float32)
  edge_mask = np.zeros((num_graphs, max_edges), np.float32)
  degree = np.bincount(edges[:, 1], minlength=num_nodes) if edges.size else np.zeros(num_nodes)
  order = np.argsort(edge_graph, kind="stable")
  edge_starts = np.concatenate([[0], np.cumsum(edge_counts)])
  for g in range(num_graphs):
    lo, size = first_node[g], sizes[g]
    nodes[g, :size, :-1] = one_hot[lo:lo + size]
    nodes[g, :size, -1] = degree[lo:lo + size] / 4.0
    node_mask[g, :size] = 1.0
    local = edges[order[edge_starts[g]:edge_starts[g + 1]]] - lo
    padded_edges[g, :len(local)] = local
    edge_mask[g, :len(local)] = 1.0
  classes = np.unique(graph_labels)
  labels = np.searchsorted(classes, graph_labels).astype(np.int32)
  return {"nodes": nodes, "edges": padded_edges, "node_mask": node_mask, "edge_mask": edge_mask}, labels


def load_tudataset(name: str, data_dir: Optional[str], seed: int = 0, test_fraction: float = 0.2,
                   train_size: Optional[int] = None, test_size: Optional[int] = None) -> Dataset:
  """A TUDataset (text format) from ``data_dir`` or ``data_dir/name``, with a seeded stratified split.

  TUDatasets have no official split; like PyTorch Geometric's examples we hold
  out a seeded ``test_fraction`` of the graphs (stratified by label).
  """
  if not data_dir:
    raise DatasetError(f"TUDataset {name}: pass --data-dir with {name}_A.txt, {name}_graph_indicator.txt, "
                       f"{name}_graph_labels.txt and {name}_node_labels.txt (from {name}.zip of the "
                       f"TUDataset collection)")
  directory = os.path.join(data_dir, name) if os.path.isdir(os.path.join(data_dir, name)) else data_dir
  graphs, labels = read_tudataset(directory, name)
  train, test = _stratified_split(labels, test_fraction, seed)
  split = lambda index: {k: v[index] for k, v in graphs.items()}
  x_train, y_train = _subset(split(train), labels[train], train_size, seed)
  x_test, y_test = _subset(split(test), labels[test], test_size, seed + 1)
  return Dataset(name.lower(), x_train, y_train, x_test, y_test, int(labels.max()) + 1,
                 graphs["nodes"].shape[1:])


def load_dataset(name: str, *, data_dir: Optional[str] = None, seed: int = 0,
                 train_size: Optional[int] = None, test_size: Optional[int] = None) -> Dataset:
  """Loads the dataset called ``name`` (one of ``DATASETS``).

  Args:
    name: the dataset (see the module docstring).
    data_dir: where its files are, for file-based sets.
    seed: seeds the digits split, subsets and generated sets.
    train_size, test_size: optional seeded subsets (sizes of generated sets).

  Raises:
    DatasetError: unknown name, or files missing (the message says where to get them).

  Example::

      >>> dataset = load_dataset("digits")  # bundled with scikit-learn
      >>> dataset.x_train.shape, dataset.x_test.shape, dataset.num_classes
      ((1347, 8, 8, 1), (450, 8, 8, 1), 10)
      >>> load_dataset("digits", train_size=256, test_size=64).x_train.shape
      (256, 8, 8, 1)
  """
  check_dataset_name(name)
  if name == "digits":
    data = load_digits(seed)
    x_train, y_train = _subset(data.x_train, data.y_train, train_size, seed)
    x_test, y_test = _subset(data.x_test, data.y_test, test_size, seed + 1)
    return data._replace(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  if name == "fashion_mnist":
    return load_fashion_mnist(data_dir, seed, train_size, test_size)
  if name in ("cifar10", "cifar100"):
    return load_cifar(int(name[5:]), data_dir, seed, train_size, test_size)
  if name in UCR_NAMES:
    data = load_ucr(name, data_dir)
    x_train, y_train = _subset(data.x_train, data.y_train, train_size, seed)
    x_test, y_test = _subset(data.x_test, data.y_test, test_size, seed + 1)
    return data._replace(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  sizes = {k: v for k, v in (("train_size", train_size), ("test_size", test_size)) if v is not None}
  if name == "synthetic_sequences":
    return make_synthetic_sequences(seed, **sizes)
  if name == "synthetic_graphs":
    return make_synthetic_graphs(seed, **sizes)
  if name == "mitbih":
    return load_mitbih(data_dir, seed, train_size, test_size)
  return load_tudataset("Mutagenicity" if name == "mutagenicity" else name[3:], data_dir, seed,
                        train_size=train_size, test_size=test_size)


def add_label_noise(labels: np.ndarray, fraction: float, num_classes: int, seed: int = 0) -> np.ndarray:
  """Replaces exactly ``round(fraction * N)`` labels by a *different* random class.

  The SAM paper's label-noise study corrupts a fraction of the training labels;
  drawing the new label among the other classes makes the corrupted fraction
  exactly the one requested. Returns a new array; ``labels`` is not modified.

  Example::

      >>> labels = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
      >>> noisy = add_label_noise(labels, 0.3, num_classes=4, seed=0)
      >>> int((noisy != labels).sum())  # round(0.3 * 10), each moved to another class
      3
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"label-noise fraction must be in [0, 1], got {fraction}")
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
    raise ValueError(f"add_label_noise: num_classes must be an int >= 2 (a flipped label needs another class), "
                     f"got {num_classes!r}")
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  noisy = labels.copy()
  flip = rng.permutation(len(labels))[: int(round(fraction * len(labels)))]
  offsets = rng.integers(1, num_classes, size=len(flip))
  noisy[flip] = (labels[flip] + offsets) % num_classes
  return noisy


def iterate_batches(x, y, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                    drop_last: bool = True) -> Iterator[tuple[Any, np.ndarray]]:
  """Batches ``(x_batch, y_batch)`` of one epoch, in a seeded order.

  ``x`` is an array or a dict of arrays (graphs) with ``len(y)`` rows;
  ``drop_last=True`` (default) drops the last, smaller batch, so every batch
  has ``batch_size`` examples (one compiled step).

  Example::

      >>> x, y = np.arange(10.0)[:, None], np.arange(10)
      >>> [len(y_batch) for _, y_batch in iterate_batches(x, y, 4)]
      [4, 4]
      >>> [len(y_batch) for _, y_batch in iterate_batches(x, y, 4, drop_last=False)]
      [4, 4, 2]
      >>> np.sort(np.concatenate([y_batch for _, y_batch in iterate_batches(x, y, 4, drop_last=False)])).tolist()
      [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"iterate_batches: batch_size must be an int >= 1, got {batch_size!r}")
  n = len(y)
  rows = {k: len(v) for k, v in x.items()} if isinstance(x, dict) else {"x": len(x)}
  if any(count != n for count in rows.values()):
    raise ValueError(f"iterate_batches: x and y must have the same number of rows, got {rows} and {n} labels")
  order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
  stop = n - batch_size + 1 if drop_last else n
  for start in range(0, max(stop, 0), batch_size):
    index = order[start:start + batch_size]
    x_batch = {k: v[index] for k, v in x.items()} if isinstance(x, dict) else x[index]
    yield x_batch, y[index]
