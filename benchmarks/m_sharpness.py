"""m-sharpness on real data: test accuracy of SAM with one perturbation per group of m examples.

For each setting, runs ``sam-optax compare`` once per group size m (batch 128,
3 seeds; the SGD baseline with the first m), then prints a markdown table
(mean ± std over seeds) read back from the ``results.json`` files. m = 128 is
the whole batch: global SAM.

Usage::

    python benchmarks/m_sharpness.py                                  # digits, clean and 40 % noise
    python benchmarks/m_sharpness.py --settings fashion_mnist:0.0
    python benchmarks/m_sharpness.py --collect-only --out runs/m_sharpness   # tables from earlier runs
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import check_runs, dataset_settings, int_list  # noqa: E402
from generalization import PROTOCOLS  # noqa: E402

BATCH = 128


def command_for(dataset, noise, m, seeds, out, with_baseline):
  protocol = list(PROTOCOLS.get(dataset, []))
  if "--batch-size" in protocol:
    index = protocol.index("--batch-size")
    del protocol[index:index + 2]
  return [sys.executable, "-m", "sam_optax", "compare", "--dataset", dataset,
          "--optimizers", "sgd,sam" if with_baseline else "sam", "--label-noise", str(noise),
          "--seeds", seeds, "--batch-size", str(BATCH), "--group-size", str(m), "--out", out,
          "--no-plots", "--no-progress", *protocol]


def pm(run, key, scale=1.0, digits=2):
  mean, std = run.get(key), run.get(key + "_std")
  if mean is None:
    return "–"
  return f"{scale * mean:.{digits}f} ± {scale * (std or 0):.{digits}f}"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--settings", type=dataset_settings, default="digits:0.4,digits:0.0",
                      help="comma list of dataset:label_noise")
  parser.add_argument("--group-sizes", type=int_list, default="8,32,128",
                      help=f"comma list of m, each dividing the batch ({BATCH})")
  parser.add_argument("--seeds", type=int_list, default="0,1,2")
  parser.add_argument("--out", default="runs/m_sharpness")
  parser.add_argument("--collect-only", action="store_true", help="only read earlier results")
  args = parser.parse_args(argv)
  sizes = [int(m) for m in args.group_sizes.split(",")]
  if not args.collect_only:
    check_runs(parser, [command_for(dataset, noise, m, args.seeds, args.out, with_baseline=i == 0)
                        for dataset, noise in args.settings for i, m in enumerate(sizes)])
  for dataset, noise in args.settings:
    rows, commands = [], []
    for i, m in enumerate(sizes):
      out = os.path.join(args.out, f"{dataset}_noise{noise}_m{m}")
      command = command_for(dataset, noise, m, args.seeds, out, with_baseline=i == 0)
      commands.append(shlex.join(["sam-optax", *command[3:]]))
      if not args.collect_only:
        subprocess.run(command, check=True)
      with open(os.path.join(out, "results.json")) as f:
        runs = json.load(f)["runs"]
      if "sgd" in runs:
        rows.append(("SGD (no perturbation)", runs["sgd"]))
      rows.append((f"SAM, m = {m}" + (" (global)" if m == BATCH else ""), runs["sam"]))
    print(f"\n### {dataset}, label noise {float(noise):.0%}, batch {BATCH}, seeds {args.seeds}\n")
    print("```")
    print("\n".join(commands))
    print("```\n")
    print("| run | test acc (%) | train acc (%) | λmax | L(w+ε) − L(w) |")
    print("|---|---:|---:|---:|---:|")
    for name, run in rows:
      print(f"| {name} | {pm(run, 'test_acc', 100)} | {pm(run, 'train_acc', 100)} | "
            f"{pm(run, 'lambda_max')} | {pm(run, 'sharpness', 1.0, 3)} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
