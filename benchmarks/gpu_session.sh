#!/usr/bin/env bash
# One prepared GPU session: everything we measure on a lent accelerator, in priority
# order, each step under its own time limit, results packed after every step.
#
#   OUT=/tmp/gpu_out bash benchmarks/gpu_session.sh
#
# Expects: python3 with jax (CUDA), flax, optax, absl, tqdm; ml_collections as a wheel in
# .whl/ when missing; the Fashion-MNIST splits exported by scripts/export_arrays.py in
# $PTQ_JAX_ARRAYS_DIR (default .gpu/data), so TFDS is not needed there. Writes
# $OUT/gpu_results.tgz (workdir: results/, the MobileNetV2 training run with TRAIN=1)
# and $OUT/log.
# Step limits (seconds) are in the variables below; each step is skipped if the budget
# ($BUDGET_S, default 560) would be exceeded. *_FLAGS variables add flags to a step
# (a CPU smoke test of this script uses them to shrink every step).
set -u
OUT=${OUT:-/tmp/gpu_out}
BUDGET_S=${BUDGET_S:-560}
WORK=$OUT/work
mkdir -p "$WORK/results"
export PYTHONUNBUFFERED=1
export PTQ_JAX_ARRAYS_DIR=${PTQ_JAX_ARRAYS_DIR:-.gpu/data}
START=$(date +%s)

if ! python3 -c 'import ml_collections' 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi -L 2>/dev/null
python3 -c 'import jax; print("jax", jax.__version__, jax.devices())'

pack() { tar czf "$OUT/gpu_results.tgz" -C "$WORK" . 2>/dev/null; }

# step NAME LIMIT_S COMMAND...: runs COMMAND under a limit if the budget allows.
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  if (( left < 20 )); then echo "== skip $name (budget spent)"; return; fi
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit}s) $(date +%T)"
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tr '\r' '\n' | grep -v '%|'
  echo "== $name done rc=${PIPESTATUS[0]} after $(( $(date +%s) - START ))s"
  pack
}

# Start from the repository's results so finished grid cells are skipped.
cp results/adaquant.json results/mixed_precision.json "$WORK/results/" 2>/dev/null

# 1. (TRAIN=1 only) MobileNetV2 (28x28) training: the bundled checkpoint's recipe.
if [ "${TRAIN:-0}" = 1 ]; then
step train_mobilenet_v2 ${TRAIN_S:-140} python3 run.py --config=configs/train_mobilenet_v2.py \
  --workdir="$WORK/train_mobilenet_v2" ${TRAIN_FLAGS:-}
# Use the new checkpoint for the benchmarks below if it beats the bundled one.
python3 - "$WORK/train_mobilenet_v2" <<'EOF'
import json, os, shutil, sys
new = os.path.join(sys.argv[1], 'model_card.json')
old = 'ptq_jax/checkpoints/mobilenet_v2_fmnist_fashion_mnist.json'
if os.path.exists(new):
  a, b = json.load(open(new))['test_top1_pct'], json.load(open(old))['test_top1_pct']
  print(f'new MobileNetV2 {a} vs bundled {b}')
  if a > b:
    shutil.copy(os.path.join(sys.argv[1], 'mobilenet_v2_fmnist_fashion_mnist.msgpack'),
                'ptq_jax/checkpoints/mobilenet_v2_fmnist_fashion_mnist.msgpack')
    shutil.copy(new, old)
    print('benchmarks below use the new checkpoint')
EOF

fi

# 2. One layer, ms/iteration: the GPU reference layer (256->256 at 14x14) and ours.
step adaquant_speed ${SPEED_S:-40} python3 benchmarks/adaquant_speed.py --channels=256 --size=14 \
  --iterations=1000 --steps_per_call=1,100,1000 --reference_ms=4.9 --name=adaquant_speed_gpu \
  --out="$WORK/results" ${SPEED_FLAGS:-}

# 3. The AdaQuant grid (cells already measured on this device are skipped).
step adaquant_resnet20 ${GRID_R20_S:-150} python3 benchmarks/adaquant.py --models=resnet20 \
  --skip_existing --out="$WORK/results" ${GRID_FLAGS:-}
step adaquant_mobilenet_v2 ${GRID_MNV2_S:-150} python3 benchmarks/adaquant.py \
  --models=mobilenet_v2_fmnist --skip_existing --out="$WORK/results" ${GRID_FLAGS:-}

# 4. Mixed precision from parallel-AdaQuant states (MobileNetV2 is slow on CPU).
step mixed_precision ${MP_S:-80} python3 benchmarks/mixed_precision.py \
  --models=mobilenet_v2_fmnist --method=adaquant --out="$WORK/results" ${MP_FLAGS:-}

# 5. The pipelines, stage by stage.
step pipelines ${PIPE_S:-80} python3 benchmarks/pipelines.py --out="$WORK/results" ${PIPE_FLAGS:-}

# 6. Whole-model timing on ImageNet-sized ResNet-50.
step resnet50 ${R50_S:-60} python3 benchmarks/resnet50_gpu.py --out="$WORK/results" ${R50_FLAGS:-}

# 7. The AdaQuant tuning variants (held-out data), if time is left.
step adaquant_tuning ${TUNING_S:-100} python3 benchmarks/adaquant_tuning.py \
  --modes=parallel,sequential --out="$WORK/results" ${TUNING_FLAGS:-}

echo "== total $(( $(date +%s) - START ))s"
pack
