"""Generalization benchmark: base vs SAM vs F-SAM (and ASAM, GSAM, LookSAM) on real data.

Runs ``sam-optax compare`` for each (dataset, label noise) setting with several
seeds and writes ``benchmarks/generalization.md`` with test accuracy mean ± std,
the generalization gap, lambda_max and the step-time ratio, plus the exact
commands. Every number in that file comes from the ``results.json`` files this
script reads back.

Usage::

    python benchmarks/generalization.py                      # digits + Fashion-MNIST, clean + 40 % noise
    python benchmarks/generalization.py --settings digits:0.0 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from common import check_runs, dataset_settings, int_list  # noqa: E402  pylint: disable=wrong-import-position

# dataset -> extra options of its protocol (sizes keep a 2-core CPU run reasonable).
PROTOCOLS = {
    "digits": ["--epochs", "30", "--batch-size", "64", "--analysis-examples", "512"],
    "fashion_mnist": ["--epochs", "6", "--batch-size", "128", "--train-size", "6000", "--test-size", "2000",
                      "--analysis-examples", "512"],
}


def command_for(dataset: str, noise: str, seeds: str, optimizers: str, out: str, extra: list[str]) -> list[str]:
  return [
      sys.executable, "-m", "sam_optax", "compare", "--dataset", dataset,
      "--optimizers", optimizers, "--label-noise", str(noise), "--seeds", seeds,
      "--out", out, "--no-plots", "--no-progress", *PROTOCOLS.get(dataset, []), *extra,
  ]


def format_row(name: str, run: dict) -> str:
  def pm(key, scale=1.0, digits=2):
    mean, std = run.get(key), run.get(key + "_std")
    if mean is None:
      return "–"
    return f"{scale * mean:.{digits}f} ± {scale * (std or 0):.{digits}f}"

  lam = run.get("lambda_max")
  lam_std = run.get("lambda_max_std") or 0.0
  return (f"| {name} | {pm('test_acc', 100)} | {pm('train_acc', 100)} | {pm('gen_gap', 1, 3)} | "
          + (f"{lam:.3g} ± {lam_std:.2g}" if lam is not None else "–")
          + f" | {run.get('step_time_ratio') or float('nan'):.2f} |")


def merge_seed_runs(directories: list[str], out: str) -> dict:
  """Merges ``results.json`` of runs that differ only in their seeds (run in parallel).

  Per-seed records are concatenated and the means/stds recomputed with the
  command line's own :func:`sam_optax.experiments.cli.summarise`.
  """
  from sam_optax.experiments.cli import summarise  # pylint: disable=import-outside-toplevel

  parts = [json.load(open(os.path.join(d, "results.json"))) for d in directories]
  config = dict(parts[0]["config"])
  config["seeds"] = [seed for part in parts for seed in part["config"]["seeds"]]
  per_seed = {name: [record for part in parts for record in part["runs"][name]["per_seed"]]
              for name in parts[0]["runs"]}
  results = {"config": config, "runs": summarise(per_seed), "merged_from": directories}
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  return results


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--settings", type=dataset_settings,
                      default="digits:0.0,digits:0.4,fashion_mnist:0.0,fashion_mnist:0.4",
                      help="comma list of dataset:label_noise")
  parser.add_argument("--seeds", type=int_list, default="0,1,2")
  parser.add_argument("--optimizers", default="sgd,sam,fsam,asam,gsam,looksam")
  parser.add_argument("--out", default=os.path.join("runs", "generalization"))
  parser.add_argument("--report", default=os.path.join(HERE, "generalization.md"))
  parser.add_argument("extra", nargs="*", help="extra options passed to sam-optax compare (after --)")
  args = parser.parse_args(argv)
  planned = [(dataset, noise, os.path.join(args.out, f"{dataset}_noise{noise}")) for dataset, noise in args.settings]
  commands = [command_for(dataset, noise, args.seeds, args.optimizers, out, args.extra)
              for dataset, noise, out in planned]
  check_runs(parser, commands)
  sections = []
  for (dataset, noise, out), command in zip(planned, commands):
    printable = "sam-optax " + " ".join(shlex.quote(c) for c in command[3:])
    print(f"$ {printable}", flush=True)
    start = time.perf_counter()
    completed = subprocess.run(command, check=False)
    if completed.returncode != 0:
      sections.append(f"### {dataset}, label noise {float(noise):.0%}\n\nFAILED (exit {completed.returncode}): `{printable}`\n")
      continue
    with open(os.path.join(out, "results.json")) as f:
      results = json.load(f)
    config = results["config"]
    lines = [
        f"### {dataset}, label noise {float(noise):.0%}",
        "",
        f"{config['model']}, {config['epochs']} epochs, batch {config['batch_size']}, "
        f"{config['train_size']} train / {config['test_size']} test examples, seeds {args.seeds}, "
        f"{time.perf_counter() - start:.0f} s on {config['backend']}.",
        "",
        f"```\n{printable}\n```",
        "",
        "| optimizer | test acc (%) | train acc (%) | gen. gap (test − train loss) | λmax | step time ×base |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [format_row(name, run) for name, run in results["runs"].items()]
    sections.append("\n".join(lines) + "\n")
    print(sections[-1], flush=True)
  with open(args.report + ".sections", "w") as f:
    f.write("\n".join(sections))
  print(f"wrote {args.report}.sections (merge into {args.report} with the discussion)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
