"""`sam-optax compare` end to end on the bundled digits data, and its error handling."""

import csv
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from sam_optax.experiments import cli
from sam_optax.experiments.data import DATASETS

RUN_KEYS = {"train_loss", "train_acc", "test_loss", "test_acc", "gen_gap", "lambda_max", "lambda_min",
            "lambda_ratio", "hessian_trace", "sharpness", "seconds", "step_time_ratio", "per_seed"}


def test_compare_end_to_end(tmp_path, capsys):
  out = tmp_path / "run"
  status = cli.main(["compare", "--epochs", "2", "--train-size", "384", "--test-size", "200",
                     "--optimizers", "sgd,sam,fsam,looksam", "--seeds", "0,1", "--analysis-examples", "128",
                     "--label-noise", "0.2", "--out", str(out), "--no-progress"])
  assert status == 0
  printed = capsys.readouterr().out
  assert "| optimizer | train loss | train acc (%) | test loss | test acc (%) | gen. gap | λmax |" in printed
  for name in ("sgd", "sam", "fsam", "looksam"):
    assert f"| {name} |" in printed
  results = json.loads((out / "results.json").read_text())
  assert results["config"]["dataset"] == "digits" and results["config"]["label_noise"] == 0.2
  assert set(results["runs"]) == {"sgd", "sam", "fsam", "looksam"}
  for name, run in results["runs"].items():
    assert RUN_KEYS <= set(run)
    assert len(run["per_seed"]) == 2
    assert 0.0 <= run["train_acc"] <= 1.0 and 0.0 <= run["test_acc"] <= 1.0
    # Top-level values are the means over seeds.
    mean = sum(r["test_acc"] for r in run["per_seed"]) / 2
    assert abs(run["test_acc"] - mean) < 1e-12
    assert abs(run["gen_gap"] - (run["test_loss"] - run["train_loss"])) < 1e-9
    assert run["lambda_max"] > 0 and run["lambda_max"] >= run["lambda_min"]
    assert abs(run["lambda_ratio"] - sum(abs(r["lambda_max"] / r["lambda_min"]) for r in run["per_seed"]) / 2) < 1e-6
  assert results["runs"]["sgd"]["step_time_ratio"] == 1.0
  # Sharpness L(w+eps) - L(w): logged for the sharpness-aware runs only (last-epoch mean).
  assert "| L(w+ε) − L(w) |" in printed
  assert results["runs"]["sgd"]["sharpness"] is None
  for name in ("sam", "fsam", "looksam"):
    assert all(r["sharpness"] is not None for r in results["runs"][name]["per_seed"])
    assert results["runs"][name]["sharpness"] > 0
  rows = list(csv.DictReader(open(out / "results.csv")))
  assert len(rows) == 4 * 3  # two seeds and a mean row per optimizer
  for name in ("training_curves.png", "landscape_1d.png", "spectral_density.png",
               "landscape_2d_sam.png", "landscape_3d_fsam.png"):
    assert (out / name).stat().st_size > 10_000


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--optimizers", "sgd,adamw"], "unknown optimizer(s) adamw"),
        (["--rho", "-0.1"], "--rho must be a finite number >= 0"),
        (["--lmbda", "1.0"], "--lmbda must be in [0, 1)"),
        (["--label-noise", "1.5"], "--label-noise must be a fraction"),
        (["--model", "resnet"], "unknown model 'resnet'"),
        (["--group-size", "5"], "--group-size must be a positive divisor of --batch-size (64)"),
        (["--dataset", "fashion_mnist", "--data-dir", "/nonexistent"], "apt-get install dataset-fashion-mnist"),
        (["--dataset", "tu:"], "unknown dataset 'tu:'; choose from digits, "),
        # A model that cannot take the data is refused before training, with the auto choice named.
        (["--dataset", "synthetic_sequences", "--model", "cnn"],
         "cnn takes image (B, H, W, C) arrays, got shape (2, 32, 1); --model auto trains transformer on "
         "synthetic_sequences"),
        (["--dataset", "synthetic_graphs", "--model", "mlp"],
         "mlp takes batched (B, ...) arrays, got a dict of edge_mask, edges, node_mask, nodes"),
    ],
)
def test_bad_options_exit_nonzero_with_a_clear_message(tmp_path, arguments, message):
  completed = subprocess.run(
      [sys.executable, "-m", "sam_optax", "compare", "--epochs", "1", "--out", str(tmp_path), *arguments],
      capture_output=True, text=True, timeout=300, check=False,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert completed.returncode == 2
  assert message in completed.stderr
  assert "Traceback" not in completed.stderr


def test_help_lists_the_options():
  completed = subprocess.run([sys.executable, "-m", "sam_optax", "compare", "--help"],
                             capture_output=True, text=True, timeout=120, check=True)
  for option in ("--dataset", "--model", "--optimizers", "--base", "--rho", "--sigma", "--lmbda", "--epochs",
                 "--batch-size", "--lr", "--label-noise", "--seeds", "--out", "--no-analysis", "--checkpoint-dir"):
    assert option in completed.stdout


def test_checkpoint_dir_resumes(tmp_path, capsys):
  arguments = ["compare", "--epochs", "2", "--train-size", "256", "--test-size", "64", "--optimizers", "fsam",
               "--no-analysis", "--no-plots", "--no-progress", "--checkpoint-dir", str(tmp_path / "ckpt")]
  assert cli.main(arguments + ["--out", str(tmp_path / "a")]) == 0
  first = json.loads((tmp_path / "a" / "results.json").read_text())["runs"]["fsam"]
  assert (tmp_path / "ckpt" / "fsam_seed0").is_dir()
  # A second run finds the finished checkpoint and reproduces the same model.
  assert cli.main(arguments + ["--out", str(tmp_path / "b")]) == 0
  text = (tmp_path / "b" / "results.json").read_text()
  second = json.loads(text)["runs"]["fsam"]
  assert first["test_loss"] == second["test_loss"] and first["train_acc"] == second["train_acc"]
  # Nothing was trained the second time: the step time is the one the checkpoint's history recorded,
  # not NaN (which json.dump wrote as a bare NaN, invalid JSON).
  json.loads(text, parse_constant=lambda name: pytest.fail(f"results.json holds {name}"))
  assert second["per_seed"][0]["step_seconds"] == pytest.approx(first["per_seed"][0]["step_seconds"], rel=1e-9)
  assert second["step_time_ratio"] is None  # no base optimizer in this run


def test_checkpoint_of_other_options_is_refused_before_training(tmp_path, capsys):
  """A checkpoint resumes only the configuration that made it; a differing one is named in one line."""
  common = ["compare", "--train-size", "256", "--test-size", "64", "--no-analysis", "--no-plots",
            "--no-progress", "--checkpoint-dir", str(tmp_path / "ckpt")]
  assert cli.main(common + ["--epochs", "1", "--optimizers", "fsam", "--out", str(tmp_path / "a")]) == 0
  capsys.readouterr()
  # sgd would train first (it has no checkpoint): the fsam checkpoint is checked before it does.
  rerun = common + ["--optimizers", "sgd,fsam", "--out", str(tmp_path / "b")]
  assert cli.main(rerun + ["--epochs", "1", "--lr", "0.1", "--label-noise", "0.1"]) == 2
  error = capsys.readouterr().err
  assert error.count("\n") == 1 and "Traceback" not in error
  assert "fsam_seed0 was saved by a run with other options: --label-noise 0.0 (now 0.1), --lr 0.05 (now 0.1)" \
      in error
  assert not (tmp_path / "b" / "results.json").exists() and not any((tmp_path / "ckpt" / "sgd_seed0").iterdir())
  # The cosine schedule depends on the number of epochs: more epochs is another run too.
  assert cli.main(rerun + ["--epochs", "2"]) == 2
  assert "--epochs 1 (now 2)" in capsys.readouterr().err
  # Another dataset or subset size is another run (the old model would be relabelled / mis-shaped).
  assert cli.main(rerun + ["--epochs", "1", "--dataset", "synthetic_sequences"]) == 2
  error = capsys.readouterr().err
  assert "--dataset digits (now synthetic_sequences)" in error and "--model cnn (now transformer)" in error
  assert "Traceback" not in error


def test_a_diverged_run_is_reported_and_every_result_written(tmp_path, capsys):
  """--lr 1e4 diverges to NaN weights: the Hessian analysis is skipped for it (Lanczos on NaN used to raise
  LinAlgError and nothing was written), results.json stays strict JSON and the table says so."""
  out = tmp_path / "run"
  assert cli.main(["compare", "--train-size", "256", "--test-size", "64", "--epochs", "1", "--lr", "1e4",
                   "--optimizers", "sgd", "--analysis-examples", "64", "--no-plots", "--no-progress",
                   "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  run = json.loads((out / "results.json").read_text(),
                   parse_constant=lambda name: pytest.fail(f"results.json holds {name}"))["runs"]["sgd"]
  assert run["diverged"] is True and run["per_seed"][0]["diverged"] is True
  assert run["train_loss"] is None and run["per_seed"][0]["lambda_max"] is None and run["lambda_max"] is None
  assert 0.0 <= run["train_acc"] <= 1.0 and run["seconds"] > 0
  row = next(line for line in printed.splitlines() if line.startswith("| sgd"))
  assert row.startswith("| sgd (diverged) | nan |")
  assert row.split(" | ")[6:8] == ["nan", "nan"]  # λmax, |λmax/λmin|: not computable, not "–"
  rows = list(csv.DictReader(open(out / "results.csv")))
  assert rows[0]["diverged"] == "True"


@pytest.mark.parametrize("arguments, message", [
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan"),
    (["--weight-decay", "-0.5"], "--weight-decay must be a finite number >= 0, got -0.5"),
    (["--sigma", "nan"], "--sigma must be a finite number >= 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (["--lmbda", "nan"], "--lmbda must be in [0, 1), got nan"),
    (["--rho", "inf"], "--rho must be a finite number >= 0, got inf"),
])
def test_non_finite_numbers_are_refused(arguments, message):
  """NaN compares false both ways, so `x < 0` checks let it through (a NaN weight decay trained to NaN);
  checked in process, through the parser and the same validation the command runs."""
  from sam_optax.experiments import cli  # pylint: disable=import-outside-toplevel

  args = cli.build_parser().parse_args(["compare", *arguments])
  with pytest.raises(cli.UsageError) as raised:
    cli.validate(args)
  assert str(raised.value) == message


@pytest.mark.parametrize("arguments, message", [
    (["--seeds=-1"], "--seeds must be integers >= 0, got -1"),
    (["--seeds", "0,-3"], "--seeds must be integers >= 0, got 0,-3"),
    (["--seeds", "0,1,0"], "--seeds lists a seed twice: 0,1,0"),
])
def test_negative_and_repeated_seeds_are_refused(capsys, arguments, message):
  """numpy's generators refuse negative seeds (a traceback mid-run); a repeated seed fakes a zero spread."""
  with pytest.raises(cli.UsageError, match=f"^{re.escape(message)}$"):
    cli.check_compare(arguments)
  assert cli.main(["compare", *arguments]) == 2
  assert capsys.readouterr().err == f"sam-optax: error: {message}\n"


@pytest.mark.parametrize("arguments, message", [
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'; choose from digits, fashion_mnist"),
    (["--model", "resnet"], "unknown model 'resnet'; choose from auto, mlp, cnn, wrn, transformer, gcn"),
    (["--optimizers", "sam,sam"], "--optimizers lists a name twice: sam,sam"),
    (["--batch-size", "128", "--group-size", "48"], "--group-size must be a positive divisor of --batch-size (128)"),
])
def test_check_compare_refuses_what_the_command_refuses_without_running(arguments, message):
  """check_compare (used by the benchmarks that plan several runs) applies the command's own checks."""
  with pytest.raises(cli.UsageError, match=re.escape(message)):
    cli.check_compare(arguments)


def test_check_compare_returns_the_parsed_options_and_lets_argparse_refuse_non_numbers(capsys):
  args = cli.check_compare(["--dataset", "mitbih", "--group-size", "8", "--seeds", "0,1"])
  assert (args.dataset, args.group_size, args.seeds) == ("mitbih", 8, [0, 1])  # no data files looked for
  with pytest.raises(SystemExit):
    cli.check_compare(["--label-noise", "x"])
  assert "argument --label-noise: invalid float value: 'x'" in capsys.readouterr().err


def test_dataset_help_names_every_dataset(capsys):
  with pytest.raises(SystemExit):
    cli.build_parser().parse_args(["compare", "--help"])
  help_text = " ".join(capsys.readouterr().out.split())
  assert "mitbih" in help_text and "mutagenicity" in help_text
  for name in cli.DATASETS:
    assert name in help_text


def test_any_tudataset_runs_by_its_name_with_the_gcn(tmp_path, capsys):
  from test_data import write_tudataset  # pylint: disable=import-outside-toplevel

  # 24 small graphs in the TUDataset text format: rings (label 1) and paths (label 0).
  graphs = []
  for g in range(24):
    size = 3 + g % 4
    edges = [(i, i + 1) for i in range(size - 1)] + ([(0, size - 1)] if g % 2 else [])
    graphs.append((size, edges, [g % 3] * size, g % 2))
  write_tudataset(tmp_path / "DS", "DS", graphs)
  argv = ["--dataset", "tu:DS", "--data-dir", str(tmp_path / "DS"), "--epochs", "2", "--batch-size", "8",
          "--optimizers", "adam,sam", "--base", "adam", "--no-analysis", "--no-plots", "--no-progress"]
  assert cli.check_compare(argv).dataset == "tu:DS"
  assert cli.main(["compare", *argv, "--out", str(tmp_path / "run")]) == 0
  results = json.loads((tmp_path / "run" / "results.json").read_text())
  assert results["config"]["model"] == "gcn"  # --model auto on a graph set
  assert results["config"]["train_size"] + results["config"]["test_size"] == 24
  for run in results["runs"].values():
    assert 0.0 <= run["test_acc"] <= 1.0 and run["train_loss"] > 0
  assert "| sam |" in capsys.readouterr().out


def test_auto_models_match_the_readme_table():
  readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
  table = readme.split("### Data and models", 1)[1].split("\n\n", 2)[1]
  documented = {}
  for row in table.splitlines()[2:]:
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    for name in re.findall(r"`([^`]+)`", cells[0]):
      documented[name] = cells[-1].strip("`")
  assert set(documented) == {*DATASETS, "tu:NAME"}
  for name, model in documented.items():
    assert cli.default_model(name) == model, name
