"""A rho grid in one program (``jax.vmap`` of the train step over rho) vs one run per rho, side by side.

For each of the ``sam-optax study`` models at its default (CPU) size -- WRN-10-1
on digits, the Transformer on the generated sequences, the GCN on the
generated graphs -- train SAM at the study's four radii twice: once with
:func:`sam_optax.experiments.train.train_sweep` (one vmapped program) and once
as four sequential :func:`~sam_optax.experiments.train.train` runs. Reported:

- whole-sweep wall time, compilation included (what a user waits for), in
  alternating order over ``--rounds`` (median per mode), and its ratio;
- steady-state time per step of all radii (vmapped step vs the sum of the
  sequential runs' steps, compilation excluded);
- correctness: the largest parameter difference between the vmapped and the
  sequential runs.

XLA:CPU is known to be slow for convolutions inside control flow (``lax.scan``
/ ``cond``); ``vmap`` is not control flow -- the weights get a batch axis, so a
convolution becomes a batched (grouped) convolution -- but that can be slow on
XLA:CPU too, which is why this measures each model.

Usage::

    python benchmarks/rho_sweep.py              # ~5-10 minutes on 2 CPU cores
    python benchmarks/rho_sweep.py --quick      # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import positive_int  # noqa: E402  pylint: disable=wrong-import-position

from sam_optax.experiments import data, models, study  # noqa: E402  pylint: disable=wrong-import-position
from sam_optax.experiments.train import TrainConfig, train_sweep  # noqa: E402  pylint: disable=wrong-import-position


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--epochs", type=positive_int, default=3)
  parser.add_argument("--rounds", type=positive_int, default=2, help="alternating repetitions of both modes")
  parser.add_argument("--models", default="wrn,attention,gcn", help=f"comma list from {','.join(study.MODEL_KEYS)}")
  parser.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, 1 round, small sets")
  args = parser.parse_args(argv)
  specs = study.study_models()
  keys = [key.strip() for key in args.models.split(",")]
  if not all(key in specs for key in keys):
    parser.error(f"--models: a comma list from {','.join(specs)}, got {args.models!r}")
  if args.quick:
    args.epochs, args.rounds = 1, 1
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs; "
        f"{args.epochs} epochs, {args.rounds} round(s); measured under load from other jobs when the machine "
        f"is shared")
  rows = []
  for key in keys:
    spec = specs[key]
    sizes = {"train_size": 256, "test_size": 64} if args.quick else (
        {"train_size": spec.train_size} if spec.train_size else {})
    dataset = data.load_dataset(spec.dataset, **sizes)
    model = models.get_model(spec.model, dataset.num_classes, dataset.input_shape, **dict(spec.model_options))
    config = TrainConfig(optimizer="sam", base=spec.base, lr=spec.lr, epochs=args.epochs,
                         batch_size=spec.batch_size, seed=0)
    rhos = list(spec.rho_grid)
    walls = {"vmap": [], "sequential": []}
    step = {}
    last = {}
    for round_index in range(args.rounds):
      order = ("vmap", "sequential") if round_index % 2 == 0 else ("sequential", "vmap")
      for mode in order:
        start = time.perf_counter()
        sweep = train_sweep(model, dataset.x_train, dataset.y_train, config, rhos, vmap=mode == "vmap",
                            progress=False)
        walls[mode].append(time.perf_counter() - start)
        assert sweep.vmapped == (mode == "vmap"), sweep.note
        # seconds per step of all radii together, compilation excluded
        step[mode] = sum(r.step_seconds for r in sweep.results)
        last[mode] = sweep
    difference = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for v, s in zip(last["vmap"].results, last["sequential"].results)
        for a, b in zip(jax.tree.leaves(v.state.params), jax.tree.leaves(s.state.params)))
    wall_v, wall_s = float(np.median(walls["vmap"])), float(np.median(walls["sequential"]))
    rows.append((spec.label, spec.model, dataset.name, len(rhos), wall_s, wall_v, wall_s / wall_v,
                 1e3 * step["sequential"], 1e3 * step["vmap"], step["sequential"] / step["vmap"], difference))
    print(f"{spec.label}: done ({wall_s:.1f} s sequential, {wall_v:.1f} s vmapped)", flush=True)
  print()
  print("| model | data | radii | sequential s | vmapped s | speed-up (wall) | sequential ms/step "
        "(all radii) | vmapped ms/step | speed-up (step) | max \\|Δparams\\| |")
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  for label, model_name, dataset_name, count, wall_s, wall_v, ratio, ms_s, ms_v, step_ratio, diff in rows:
    print(f"| {label} ({model_name}) | {dataset_name} | {count} | {wall_s:.1f} | {wall_v:.1f} | {ratio:.2f}× | "
          f"{ms_s:.1f} | {ms_v:.1f} | {step_ratio:.2f}× | {diff:.1e} |")
  ok = all(row[-1] < 1e-3 for row in rows)
  print(f"\ncorrectness: vmapped sweep == sequential runs (max |Δparams| < 1e-3 after {args.epochs} epochs): "
        f"{'OK' if ok else 'FAILED'}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
