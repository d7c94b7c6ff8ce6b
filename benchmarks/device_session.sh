#!/usr/bin/env bash
# The accelerator checks of the README's "On a GPU" section, as one prepared run.
#
# A device is lent for minutes, not hours, so the checks run in priority order,
# each under its own time limit, and each writes its log as it goes (a check cut
# off by its limit still leaves what it printed):
#
#   1. hessian_section4   benchmarks/hessian_benchmark.py --sections 4
#                         top_k=5 on the 11.6M-parameter MLP: time / (HVPs x one
#                         HVP) for the device loops, the fused and the unfused host
#                         loops in the same rounds; peak host RSS; Hutchinson blocks.
#                         Decides `_iteration_design`'s accelerator default.
#   2. step_speed         benchmarks/step_speed.py (SAM vs base, hand-written and
#                         optax.contrib.sam steps; XLA flops and temp bytes)
#   3. memory_and_groups  benchmarks/memory_and_groups.py (accumulation, m-sharpness)
#   4. lanczos_overheads  benchmarks/lanczos_overheads.py (one iteration / its product)
#
# Needs jax (with its accelerator plugin), optax, chex, flax, scikit-learn and
# matplotlib; sam_optax itself is taken from this checkout (no install).
#
# Usage, from the repository root:
#   bash benchmarks/device_session.sh            # 8 minutes at most (limits below)
#   bash benchmarks/device_session.sh --quick    # smoke run of the same steps
#   FASHION_MNIST_FILES=DIR bash benchmarks/device_session.sh   # see below
# Logs go to $OUT (the device tool's folder) if set, else benchmarks/results/device/.
set -u

out="${OUT:-benchmarks/results/device}"
mkdir -p "$out"
python="${PYTHON:-python3}"
quick=""
if [ "${1:-}" = "--quick" ]; then
  quick="--quick"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# The CPU figures use the real Fashion-MNIST images (Debian's dataset-fashion-mnist);
# a bare machine lacks them, and the benchmarks then fall back to digits. To time
# the same data there, carry the four idx files and name their folder here.
fashion=/usr/share/datasets/fashion-mnist
if [ -n "${FASHION_MNIST_FILES:-}" ] && ! ls "$fashion"/train-images-idx3-ubyte* >/dev/null 2>&1; then
  mkdir -p "$fashion" && cp "$FASHION_MNIST_FILES"/*-idx?-ubyte* "$fashion"/
fi

"$python" - >"$out/environment.txt" 2>&1 <<'EOF'
import platform
import datetime
import flax, jax, jaxlib, optax
print("date:", datetime.datetime.now().isoformat(timespec="seconds"))
print("python:", platform.python_version(), "jax:", jax.__version__, "jaxlib:", jaxlib.__version__,
      "optax:", optax.__version__, "flax:", flax.__version__)
print("backend:", jax.default_backend(), "devices:", [d.device_kind for d in jax.devices()])
EOF
cat "$out/environment.txt"

# check NAME LIMIT_SECONDS SCRIPT [ARGS...]
check() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit} s): $python $*"
  local start=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$python" "$@" 2>&1 | tee "$out/$name.log"
  local status=${PIPESTATUS[0]}
  echo "== $name: exit $status after $((SECONDS - start)) s" | tee -a "$out/$name.log"
}

check hessian_section4 270 benchmarks/hessian_benchmark.py --sections 4 --lanczos-rounds 4 $quick
check step_speed 100 benchmarks/step_speed.py $quick
check memory_and_groups 70 benchmarks/memory_and_groups.py $quick
check lanczos_overheads 40 benchmarks/lanczos_overheads.py $quick
echo "== logs in $out"
