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

# Progress bars (one line per redraw once '\r' becomes '\n') cut to the line where the
# count moves on: per-layer progress with elapsed time stays in the log, so a step that
# runs past its limit still shows how far it got and how long each layer took.
one_line_per_bar_step() {
  awk '/%\|/ { if (match($0, /[0-9]+\/[0-9]+ \[/)) { n = substr($0, RSTART, RLENGTH);
                 if (n != last) { last = n; print } } next } { print }'
}

# step NAME LIMIT_S COMMAND...: runs COMMAND under a limit if the budget allows.
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  STEP_RC=skipped
  if (( left < 20 )); then echo "== skip $name (budget spent)"; return; fi
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit}s) $(date +%T)"
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tr '\r' '\n' | one_line_per_bar_step
  STEP_RC=${PIPESTATUS[0]}
  echo "== $name done rc=$STEP_RC after $(( $(date +%s) - START ))s"
  pack
}

# Start from the repository's results so finished grid cells are skipped.
cp results/adaquant.json results/mixed_precision.json results/scaling.json "$WORK/results/" 2>/dev/null
export XLA_PYTHON_CLIENT_PREALLOCATE=false            # several processes share the GPU below
if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then   # the lanes' cache, emptied (each
  export JAX_COMPILATION_CACHE_DIR=/tmp/ptq_jax_xla_cache   # ResNet-50 run sets its own)
  rm -rf "$JAX_COMPILATION_CACHE_DIR"
fi

# 1. (TRAIN=1 only) MobileNetV2 (28x28) training: the bundled checkpoint's recipe.
if [ "${TRAIN:-0}" = 1 ]; then
  step train_mobilenet_v2 ${TRAIN_S:-140} python3 run.py --config=configs/train_mobilenet_v2.py \
    --workdir="$WORK/train_mobilenet_v2" ${TRAIN_FLAGS:-}
fi

# 2. Alone on the GPU (timings): whole-model parallel AdaQuant of ResNet-50 at 224x224
#    (issue 8's target). $R50_RUNS lists the runs, in order, each NAME:LIMIT_S:
#      cold            empty compilation cache, with the sensitivity table for two options
#      warm            again with the cache of the run before it (now holding its programs)
#      cold_noautotune empty cache, XLA's convolution autotuning off (cuDNN's heuristics
#                      pick the algorithms). Measured on an H200 with jax 0.11.2: the first
#                      layer (the 7x7 stem) alone took 97 s, so this is not a way to a
#                      faster cold run; kept to recheck on other cards and versions.
#      cold_nosens     empty cache, no sensitivity table (the default's first run and the
#                      baseline for the others): each layer is one program (target, errors,
#                      steps; layer_program=one in the row)
#      cold_autotune1  the same with XLA_FLAGS=--xla_gpu_autotune_level=1: convolutions
#                      still autotuned, without the buffer initialisation and the result
#                      check of the default level 4. If this alone makes a cold run much
#                      shorter, AdaQuant's programs can ask for it (jax.jit compiler_options)
#      cold_autotune2  the same at level 2 (buffers initialised, no check)
#      cold_eval_whole the same as cold_nosens with each layer's float-target and error
#                      passes over the whole set in one piece (--eval_batch_size=1000):
#                      what computing them at the minibatch's shapes saves
#    The first run failing (not a timeout) stops the session so it can be rerun.
R50_RUNS=${R50_RUNS:-cold_nosens:200 warm:80 cold_autotune1:200 cold_eval_whole:200}
first_r50=1
for run in $R50_RUNS; do
  name=${run%%:*}; limit=${run#*:}
  cache=/tmp/ptq_jax_xla_cache_$name; env_flags=(); flags=(--nosensitivity)
  case $name in
    cold) flags=() ;;
    warm) cache=${last_cache:-$cache} ;;   # the cache the run before filled
    cold_noautotune) env_flags=(XLA_FLAGS=--xla_gpu_autotune_level=0) ;;
    cold_nosens) ;;
    cold_autotune1) env_flags=(XLA_FLAGS=--xla_gpu_autotune_level=1) ;;
    cold_autotune2) env_flags=(XLA_FLAGS=--xla_gpu_autotune_level=2) ;;
    cold_eval_whole) flags+=(--eval_batch_size=1000) ;;
    *) echo "== unknown ResNet-50 run $name"; continue ;;
  esac
  [ "$name" = warm ] || rm -rf "$cache"
  last_cache=$cache
  step "resnet50_$name" "$limit" env JAX_COMPILATION_CACHE_DIR="$cache" "${env_flags[@]}" \
    python3 benchmarks/resnet50_gpu.py --out="$WORK/results" "${flags[@]}" ${R50_FLAGS:-}
  if [ "$first_r50" = 1 ] && [ "$STEP_RC" != 0 ] && [ "$STEP_RC" != 124 ] && \
     [ "$STEP_RC" != 137 ] && [ "$STEP_RC" != skipped ]; then
    echo "== resnet50_$name failed (rc=$STEP_RC): stopping here so the session can be rerun"; exit 1
  fi
  first_r50=0
done
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
# $LANES_OVERRIDE ('|'-separated lanes) replaces the list below, e.g. to finish given cells.
LANES=(
  "adaquant --models=mobilenet_v2_fmnist --bits=4/4,2/4 --policies=first_last_8bit --skip_existing"
  "adaquant --models=mobilenet_v2_fmnist --bits=3/3 --policies=first_last_8bit --skip_existing ;adaquant --models=resnet20 --skip_existing"
  "adaquant --models=mobilenet_v2_fmnist --bits=4/4,2/4 --policies=all_layers_alike --skip_existing"
  "adaquant --models=mobilenet_v2_fmnist --bits=3/3 --policies=all_layers_alike --skip_existing"
  "mixed_precision --models=mobilenet_v2_fmnist --method=adaquant --states_only ;pipelines --models=mobilenet_v2_fmnist --runs=advanced,sequential,light --qat_epochs=0"
  "pipelines --runs= --qat_epochs=${QAT_EPOCHS:-5} ;pipelines --models=resnet20 --runs=advanced,sequential,light --qat_epochs=0"
)
if [ -n "${LANES_OVERRIDE:-}" ]; then IFS='|' read -ra LANES <<< "$LANES_OVERRIDE"; fi
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
