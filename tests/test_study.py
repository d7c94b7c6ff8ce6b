"""`sam-optax study` end to end on a tiny budget: outputs, schema, and rho chosen from validation only."""

import csv
import dataclasses
import json

import numpy as np
import pytest

from sam_optax.experiments import cli, data, study


class ReadBeforeSelection(AssertionError):
  pass


class Tripwire:
  """A test-set array that raises if it is read while armed, and counts reads once disarmed.

  Reading means indexing (what every evaluation does: ``x[index]``); shape and
  length stay available (they are not the data).
  """

  def __init__(self, array):
    self.array = np.asarray(array)
    self.shape, self.dtype = self.array.shape, self.array.dtype
    self.armed = True
    self.reads = 0

  def __len__(self):
    return len(self.array)

  def __getitem__(self, index):
    if self.armed:
      raise ReadBeforeSelection("the test set was read before rho was chosen")
    self.reads += 1
    return self.array[index]


def tripwired(dataset):
  x_test = ({k: Tripwire(v) for k, v in dataset.x_test.items()} if isinstance(dataset.x_test, dict)
            else Tripwire(dataset.x_test))
  return dataset._replace(x_test=x_test, y_test=Tripwire(dataset.y_test))


def wires(dataset):
  leaves = list(dataset.x_test.values()) if isinstance(dataset.x_test, dict) else [dataset.x_test]
  return leaves + [dataset.y_test]


def test_tripwire_catches_an_evaluation_of_the_test_set():
  # The guard below is only as good as this: the study's own evaluation code trips it.
  from sam_optax.experiments import models
  from sam_optax.experiments.train import evaluate

  import jax

  ds = tripwired(data.load_dataset("synthetic_graphs", train_size=16, test_size=8))
  model = models.get_model("gcn", 2)
  params = model.init(jax.random.key(0), {k: v[:2] for k, v in ds.x_train.items()})["params"]
  with pytest.raises(ReadBeforeSelection):
    evaluate(model, params, {}, ds.x_test, ds.y_test)


def test_study_end_to_end_and_the_test_set_is_not_read_during_selection(tmp_path):
  datasets = {
      "wrn": tripwired(data.load_dataset("digits", train_size=120, test_size=60)),
      "attention": tripwired(data.load_dataset("synthetic_sequences", train_size=120, test_size=60)),
      "gcn": tripwired(data.load_dataset("synthetic_graphs", train_size=120, test_size=60)),
  }
  selected = []

  def on_selected(key, selection):
    for wire in wires(datasets[key]):
      assert wire.reads == 0
      wire.armed = False  # from here on the study may evaluate on the test set
    selected.append((key, selection))

  # The study's pairs with smaller networks (the defaults' budget is the CLI's, not a test's).
  specs = study.study_models()
  specs = {
      "wrn": dataclasses.replace(specs["wrn"], model_options=(("depth", 4),), batch_size=32),
      "attention": dataclasses.replace(specs["attention"], batch_size=32, model_options=(
          ("num_layers", 1), ("model_dim", 16), ("mlp_dim", 16), ("num_heads", 2))),
      "gcn": dataclasses.replace(specs["gcn"], batch_size=32, model_options=(("num_layers", 1), ("hidden", 16))),
  }
  options = study.StudyOptions(
      out=str(tmp_path / "study"), rho_grid={"*": [0.05, 0.5], "gcn": [0.01, 0.1]}, seeds=(0,), epochs=1,
      analysis_examples=32, progress=False)
  lines = []
  result = study.run_study(options, datasets=datasets, specs=specs, on_selected=on_selected, log=lines.append)
  assert [key for key, _ in selected] == ["wrn", "attention", "gcn"]
  for dataset in datasets.values():  # the chosen runs were evaluated on the test set afterwards
    assert all(wire.reads > 0 for wire in wires(dataset))
  printed = "\n".join(lines)
  assert "validation split held out from the training set" in printed and "test set not used" in printed

  out = tmp_path / "study"
  saved = json.loads((out / "study.json").read_text())
  assert saved["config"]["seeds"] == [0] and "validation" in saved["config"]["selection"]
  assert saved["published"]["wrn"]["rho"] == 2.0
  for key, base in (("wrn", "sgd"), ("attention", "sgd"), ("gcn", "adam")):
    entry = saved["models"][key]
    assert entry["base"] == base and set(entry["runs"]) == {base, "sam"}
    assert entry["train_size"] + entry["validation_size"] == 120 and entry["test_size"] == 60
    grid = entry["selection"]["grids"]["sam"]
    assert grid["rhos"] == ([0.01, 0.1] if key == "gcn" else [0.05, 0.5])
    # The chosen rho is the best validation accuracy (ties: lower validation loss).
    best = max(range(2), key=lambda i: (grid["val_acc"][i], -grid["val_loss"][i]))
    assert grid["chosen_rho"] == grid["rhos"][best] == entry["runs"]["sam"]["rho"]
    for name, run in entry["runs"].items():
      for metric in ("train_loss", "train_acc", "test_loss", "test_acc", "gen_gap", "lambda_max",
                     "lambda_ratio", "hessian_trace", "seconds"):
        assert run[metric] is not None and np.isfinite(run[metric]), (key, name, metric)
      assert abs(run["gen_gap"] - (run["test_loss"] - run["train_loss"])) < 1e-9
      assert run["per_seed"][0]["val_acc"] == entry["curves"][name][-1]["val_acc"]
    # The selection's record of the chosen run is the run that is reported.
    assert entry["runs"]["sam"]["per_seed"][0]["val_acc"] == grid["val_acc"][grid["chosen_index"]]
  assert result["models"].keys() == saved["models"].keys()

  table = (out / "table1.md").read_text()
  header = ("| model | optimizer | ρ | train loss | train acc (%) | test loss | test acc (%) | gen. gap | λmax | "
            "\\|λmax/λmin\\| | trace | L(w+ε) − L(w) | wall s |")
  assert header in table
  rows = [line for line in table.splitlines() if line.startswith("| W.ResNet") or line.startswith("| Attention")
          or line.startswith("| GCN")]
  assert len(rows) == 6
  assert "generated (synthetic) data" in table and "digits (real data" in table
  csv_rows = list(csv.DictReader(open(out / "table1.csv")))
  assert len(csv_rows) == 3 * 2 * 2  # one seed row and a mean row per model and optimizer
  for name in ("figure2_surfaces.png", "figure3_contours.png", "rho_selection.png", "spectral_density_wrn.png",
               "spectral_density_attention.png", "spectral_density_gcn.png", "training_curves_gcn.png"):
    assert (out / name).stat().st_size > 10_000, name


def test_choose_rho_and_rho_grid_parsing():
  assert study.choose_rho([0.1, 0.5, 1.0], [0.8, 0.9, 0.9], [0.3, 0.4, 0.2]) == 2  # tie: lower loss
  assert study.choose_rho([0.1, 0.5], [0.9, 0.9], [0.3, 0.3]) == 0  # full tie: smaller rho
  assert study.parse_rho_grid(["0.05,0.5", "gcn=0.01"]) == {"*": [0.05, 0.5], "gcn": [0.01]}
  with pytest.raises(ValueError, match="unknown model 'vit'"):
    study.parse_rho_grid(["vit=0.1"])
  with pytest.raises(ValueError, match="> 0"):
    study.parse_rho_grid(["0.1,-1"])


def test_validation_split_comes_from_the_training_set_only():
  ds = data.load_dataset("digits", train_size=200)
  x_fit, y_fit, x_val, y_val = study.validation_split(ds.x_train, ds.y_train, 0.2)
  assert len(y_fit) + len(y_val) == 200 and abs(len(y_val) - 40) <= 10
  rows = {row.tobytes() for row in ds.x_train}
  assert all(row.tobytes() in rows for row in np.concatenate([x_fit, x_val]))
  assert not {row.tobytes() for row in x_fit} & {row.tobytes() for row in x_val}


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--models", "wrn,vit"], "--models must list some of wrn, attention, gcn"),
        (["--optimizers", "sgd"], "--optimizers must list some of sam"),
        (["--rho-grid", "gcn=abc"], "expected comma-separated numbers"),
        (["--validation-fraction", "1.5"], "--validation-fraction must be in (0, 1)"),
        (["--epochs", "0"], "--epochs must be positive"),
        (["--seeds=-1"], "--seeds must be integers >= 0, got -1"),
        (["--seeds", "2,2"], "--seeds lists a seed twice: 2,2"),
    ],
)
def test_bad_study_options_exit_2_with_a_clear_message(tmp_path, capsys, arguments, message):
  assert cli.main(["study", "--out", str(tmp_path), *arguments]) == 2
  assert message in capsys.readouterr().err


def test_study_help_lists_the_options(capsys):
  with pytest.raises(SystemExit):
    cli.main(["study", "--help"])
  printed = capsys.readouterr().out
  for option in ("--models", "--optimizers", "--rho-grid", "--seeds", "--full", "--data-dir", "--out",
                 "--validation-fraction", "--no-vmap"):
    assert option in printed


def test_every_models_data_is_loaded_before_any_training(tmp_path):
  """A missing data set (here the attention pair's MIT-BIH, no --data-dir) fails before the W.ResNet trains,
  not after it (with --full, after hours)."""
  specs = study.study_models()
  specs = {"wrn": dataclasses.replace(specs["wrn"], model_options=(("depth", 4),), batch_size=32),
           "attention": dataclasses.replace(specs["attention"], dataset="mitbih")}
  options = study.StudyOptions(out=str(tmp_path / "study"), models=("wrn", "attention"), seeds=(0,), epochs=1,
                               progress=False, plots=False)
  lines, selected = [], []
  with pytest.raises(data.DatasetError, match="MIT-BIH heartbeats"):
    study.run_study(options, datasets={"wrn": data.load_dataset("digits", train_size=64, test_size=32)},
                    specs=specs, on_selected=lambda key, _: selected.append(key), log=lines.append)
  assert selected == [] and not any("W.ResNet" in line for line in lines)


def test_cifar_is_a_full_set_only_and_the_help_says_so(tmp_path, capsys):
  """A cifar-10-batches-py/ in --data-dir does not replace the default W.ResNet's digits (the help said it did);
  mitbih and Mutagenicity files do replace their defaults."""
  (tmp_path / "cifar-10-batches-py").mkdir()
  for name in ("mitbih_train.csv", "mitbih_test.csv", "Mutagenicity_A.txt"):
    (tmp_path / name).write_text("")
  default = study.study_models(data_dir=str(tmp_path))
  assert (default["wrn"].dataset, default["attention"].dataset, default["gcn"].dataset) == (
      "digits", "mitbih", "mutagenicity")
  assert study.study_models(full=True, data_dir=str(tmp_path))["wrn"].dataset == "cifar10"
  with pytest.raises(SystemExit):
    cli.main(["study", "--help"])
  printed = " ".join(capsys.readouterr().out.split())
  assert ("Mutagenicity/ (TUDataset text format): sets found there replace the offline defaults; with --full "
          "also cifar-10-batches-py/ (CIFAR-10 is used only with --full)") in printed
