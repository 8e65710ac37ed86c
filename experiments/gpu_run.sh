#!/usr/bin/env bash
# The GPU benchmark in one go (under 6 minutes), from the project root on the GPU machine:
#
#   bash experiments/gpu_run.sh            # → $OUT/results/gpu-<date>.json, $OUT/bench_gpu.log, $OUT/bench_gpu-logs/
#   bash experiments/gpu_run.sh --tiny     # the same on a CPU at toy sizes (a rehearsal; → $OUT/bench_gpu-tiny.json)
#   PARTS=loop bash experiments/gpu_run.sh # the trainer's loop instead (under 4 minutes): experiments/bench_loop.py,
#                                          # ViT-B-32 bf16 batch 256, bare step vs loop on synthetic data vs loop on
#                                          # JPEGs with a decode worker per core but two → $OUT/results/bench_loop-gpu-*
#   PARTS=bench,loop ...                   # both (under 10 minutes)
#
# Installs the wheels that machine lacks from .whl/ (`../shared/gpu/prepare-wheels.sh` fetches them; without .whl/
# the environment's own packages are used), prints the versions and nvidia-smi, then runs experiments/bench_gpu.py
# under a hard timeout with its own deadline inside, so a slow part skips the rest instead of killing the run.
# Extra arguments go to bench_gpu.py. Copy $OUT/results/gpu-<date>.json into experiments/results/ afterwards.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export OUT="${OUT:-/tmp/bench_gpu-out}"
PARTS="${PARTS:-bench}"
for part in ${PARTS//,/ }; do
  [[ "$part" == bench || "$part" == loop ]] || { echo "error: PARTS=$PARTS: each part is bench or loop" >&2; exit 2; }
done
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
  if [[ ",$PARTS," == *",bench,"* ]]; then
    timeout 330 python3 experiments/bench_gpu.py --deadline-s 300 "$@"
    echo "bench_gpu exit code $?"
  fi
  if [[ ",$PARTS," == *",loop,"* ]]; then
    mkdir -p "$OUT/results"
    if [[ " $* " == *" --tiny "* ]]; then  # the rehearsal: a toy model on the CPU
      loop=(--model ViT-T-demo --batch 16 --log-every 4 --rounds 2 --pairs 1 --workers 2 --threads 1 --images 64)
    else
      loop=(--model ViT-B-32 --batch 256 --dtype bfloat16 --log-every 20 --rounds 4 --pairs 2
            --workers "$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))" --threads 1 --images 3000)
    fi
    timeout 230 python3 experiments/bench_loop.py "${loop[@]}" \
      --out "$OUT/results/bench_loop-gpu$([[ " $* " == *" --tiny "* ]] && echo -tiny)-$(date -u +%F).json"
    echo "bench_loop exit code $?"
  fi
} 2>&1 | tee "$OUT/bench_gpu.log"
