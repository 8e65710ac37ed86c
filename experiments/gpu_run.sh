#!/usr/bin/env bash
# The GPU benchmark in one go (under 6 minutes), from the project root on the GPU machine:
#
#   bash experiments/gpu_run.sh            # → $OUT/results/gpu-<date>.json, $OUT/bench_gpu.log, $OUT/bench_gpu-logs/
#   bash experiments/gpu_run.sh --tiny     # the same on a CPU at toy sizes (a rehearsal; → $OUT/bench_gpu-tiny.json)
#
# Installs the wheels that machine lacks from .whl/ (`../shared/gpu/prepare-wheels.sh` fetches them; without .whl/
# the environment's own packages are used), prints the versions and nvidia-smi, then runs experiments/bench_gpu.py
# under a hard timeout with its own deadline inside, so a slow part skips the rest instead of killing the run.
# Extra arguments go to bench_gpu.py. Copy $OUT/results/gpu-<date>.json into experiments/results/ afterwards.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export OUT="${OUT:-/tmp/bench_gpu-out}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
{
  date -u +%FT%TZ
  nvidia-smi || echo "no nvidia-smi"
  python3 -c "import sys, jax, flax, optax; print(sys.version.split()[0], 'jax', jax.__version__, 'flax',
flax.__version__, 'optax', optax.__version__)"
  python3 -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__)" \
    || echo "no torch/open_clip in python3"
  timeout 330 python3 experiments/bench_gpu.py --deadline-s 300 "$@"
  echo "bench_gpu exit code $?"
} 2>&1 | tee "$OUT/bench_gpu.log"
