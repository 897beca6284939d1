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
# Order: ResNet-50 timing alone (step limits in the variables below; a step is skipped
# if the budget, $BUDGET_S default 560 s, would be exceeded), then the small-model
# benchmarks as concurrent lanes until the budget ends; each lane writes
# $OUT/work/laneN/results, merged here afterwards with
#   python benchmarks/adaquant.py --merge_from=DIR1,DIR2,...   (same for mixed_precision,
#   pipelines). *_FLAGS variables add flags (R50_FLAGS, ADAQUANT_FLAGS, PIPELINES_FLAGS,
# MIXED_PRECISION_FLAGS: a CPU smoke test uses them to shrink every step). Mixed-
# precision states are cached in $CACHE_DIR (default /tmp/ptq_jax_gpu/cache, packed as $OUT/cache.tgz).
set -u
OUT=${OUT:-/tmp/gpu_out}
BUDGET_S=${BUDGET_S:-560}
WORK=${WORK:-/tmp/ptq_jax_gpu/work}   # outside $OUT: only the .tgz files and the log return
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

pack() {
  tar czf "$OUT/gpu_results.tgz" -C "$WORK" . 2>/dev/null
  [ -d "${CACHE:-}" ] && tar czf "$OUT/cache.tgz" -C "$CACHE" . 2>/dev/null
}

# step NAME LIMIT_S COMMAND...: runs COMMAND under a limit if the budget allows.
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  STEP_RC=skipped
  if (( left < 20 )); then echo "== skip $name (budget spent)"; return; fi
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit}s) $(date +%T)"
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tr '\r' '\n' | grep -v '%|'
  STEP_RC=${PIPESTATUS[0]}
  echo "== $name done rc=$STEP_RC after $(( $(date +%s) - START ))s"
  pack
}

# Start from the repository's results so finished grid cells are skipped.
cp results/adaquant.json results/mixed_precision.json results/scaling.json "$WORK/results/" 2>/dev/null
export XLA_PYTHON_CLIENT_PREALLOCATE=false            # several processes share the GPU below
if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then   # ours: emptied, so the first ResNet-50
  export JAX_COMPILATION_CACHE_DIR=/tmp/ptq_jax_xla_cache   # run below is a cold one
  rm -rf "$JAX_COMPILATION_CACHE_DIR"
fi

# 1. (TRAIN=1 only) MobileNetV2 (28x28) training: the bundled checkpoint's recipe.
if [ "${TRAIN:-0}" = 1 ]; then
  step train_mobilenet_v2 ${TRAIN_S:-140} python3 run.py --config=configs/train_mobilenet_v2.py \
    --workdir="$WORK/train_mobilenet_v2" ${TRAIN_FLAGS:-}
fi

# 2. Alone on the GPU (timings): whole-model parallel AdaQuant of ResNet-50 at 224x224 and
#    the sensitivity table for two options (issue 8's target), then one-layer speed.
step resnet50 ${R50_S:-240} python3 benchmarks/resnet50_gpu.py --out="$WORK/results" ${R50_FLAGS:-}
if [ "$STEP_RC" != 0 ] && [ "$STEP_RC" != 124 ] && [ "$STEP_RC" != 137 ] && [ "$STEP_RC" != skipped ]; then
  echo "== resnet50 failed (rc=$STEP_RC): stopping here so the session can be rerun"; exit 1
fi
# The same again: now JAX's persistent compilation cache ($JAX_COMPILATION_CACHE_DIR,
# filled by the step above) holds the programs, as for any later run at these shapes.
if [ "${R50_WARM:-1}" = 1 ]; then
  step resnet50_warm_cache ${R50_WARM_S:-90} python3 benchmarks/resnet50_gpu.py \
    --nosensitivity --out="$WORK/results" ${R50_FLAGS:-}
fi
# Cold again with XLA's convolution autotuning off (cuDNN's heuristics pick the
# algorithms): does it shorten the cold run, and what does it cost per iteration?
if [ "${R50_AUTOTUNE0:-1}" = 1 ]; then
  rm -rf /tmp/ptq_jax_xla_cache_autotune0
  step resnet50_autotune_off ${R50_AUTOTUNE0_S:-150} env \
    JAX_COMPILATION_CACHE_DIR=/tmp/ptq_jax_xla_cache_autotune0 \
    XLA_FLAGS=--xla_gpu_autotune_level=0 python3 benchmarks/resnet50_gpu.py \
    --nosensitivity --out="$WORK/results" ${R50_FLAGS:-}
fi
# GPU rows of results/scaling.md (one device: the stages' wall time and accuracy; SCALING=1).
if [ "${SCALING:-0}" = 1 ]; then
  step scaling ${SCALING_S:-120} python3 benchmarks/scaling.py --device_counts=1 \
    --noforce_host_devices --out="$WORK/results" ${SCALING_FLAGS:-}
fi
if [ "${SPEED:-0}" = 1 ]; then
  step adaquant_speed ${SPEED_S:-40} python3 benchmarks/adaquant_speed.py --channels=256 \
    --size=14 --iterations=1000 --steps_per_call=1,100,1000 --reference_ms=4.9 \
    --name=adaquant_speed_gpu --out="$WORK/results" ${SPEED_FLAGS:-}
fi

# 3. Throughput: lanes of small-model benchmarks side by side on the one GPU (each lane
#    is launch-bound and leaves the GPU mostly idle), each writing its own directory;
#    their rows say concurrent_processes. Merge afterwards with --merge_from.
# No python-mip on the GPU image: mixed-precision states and tables are computed and
# cached here ($OUT/cache.tgz), the integer programs solved from that cache afterwards.
LANES=(
  "adaquant --models=mobilenet_v2_fmnist --bits=4/4,2/4 --policies=first_last_8bit --skip_existing"
  "adaquant --models=mobilenet_v2_fmnist --bits=3/3 --policies=first_last_8bit --skip_existing ;adaquant --models=resnet20 --skip_existing"
  "adaquant --models=mobilenet_v2_fmnist --bits=4/4,2/4 --policies=all_layers_alike --skip_existing"
  "adaquant --models=mobilenet_v2_fmnist --bits=3/3 --policies=all_layers_alike --skip_existing"
  "mixed_precision --models=mobilenet_v2_fmnist --method=adaquant --states_only ;pipelines --models=mobilenet_v2_fmnist --runs=advanced,sequential,light --qat_epochs=0"
  "pipelines --runs= --qat_epochs=${QAT_EPOCHS:-5} ;pipelines --models=resnet20 --runs=advanced,sequential,light --qat_epochs=0"
)
export PTQ_JAX_CONCURRENT_PROCESSES=${#LANES[@]}
CACHE=${CACHE_DIR:-/tmp/ptq_jax_gpu/cache}
mkdir -p "$CACHE"
left=$(( BUDGET_S - ($(date +%s) - START) - 15 ))
echo "== ${#LANES[@]} lanes, ${left}s $(date +%T)"
(while sleep 30; do pack; done) & packer=$!
pids=()
for i in "${!LANES[@]}"; do
  dir="$WORK/lane$i"; mkdir -p "$dir/results"
  cp "$WORK/results/"*.json "$dir/results/" 2>/dev/null
  (
    IFS=';' read -ra cmds <<< "${LANES[$i]}"
    for c in "${cmds[@]}"; do
      set -- $c; bench=$1; shift
      echo "== lane$i $bench $* $(date +%T)"
      extra_var="$(echo "$bench" | tr a-z A-Z)_FLAGS"            # e.g. ADAQUANT_FLAGS
      [ "$bench" = adaquant ] || set -- --cache_dir="$CACHE" "$@"
      timeout --kill-after=5 "$left" python3 "benchmarks/$bench.py" --out="$dir/results" \
        "$@" ${!extra_var:-} 2>&1 | tr '\r' '\n' | grep -v '%|'
      echo "== lane$i $bench rc=${PIPESTATUS[0]} $(date +%T)"
    done
  ) > "$WORK/lane$i.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
kill $packer 2>/dev/null
tail -n 40 "$WORK"/lane*.log

echo "== total $(( $(date +%s) - START ))s"
pack
