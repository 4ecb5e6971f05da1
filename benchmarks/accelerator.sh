#!/usr/bin/env bash
# The accelerator figures: the ViT-B/16 recipes' train step (step time,
# examples/s, MFU against the chip's table peak, compiled memory), the speed
# switches that matter there, and R_ot's cost next to a bench_s step. Most
# important first, each run time-boxed, so a short lease still returns the
# head of the list.
#
#   bash benchmarks/accelerator.sh [LOGDIR]          # one GPU or TPU host
#   BATCH=64 STEPS=5 bash benchmarks/accelerator.sh  # smaller per-device batch
#
# Every line of every run goes to LOGDIR/accelerator.log (default
# workdirs/accelerator); `grep -E "^(==|step_s|examples|mfu|compiled_temp)"`
# on it gives the table in benchmarks/RESULTS.md. A failed or timed-out run
# does not stop the list; the script ends naming them, with exit status 1.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
LOGDIR=${1:-workdirs/accelerator}
BATCH=${BATCH:-256}
STEPS=${STEPS:-10}
RUN_TIMEOUT=${RUN_TIMEOUT:-150}
PYTHON=${PYTHON:-python3}
mkdir -p "$LOGDIR"
LOG="$LOGDIR/accelerator.log"
: >"$LOG"
FAILED=()

run() {  # run NAME ARGS...: one bench process, its output appended to the log
  local name=$1
  shift
  echo "== $name: python -m ito_jax.bench $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$RUN_TIMEOUT" "$PYTHON" -m ito_jax.bench "$@" 2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  if [ "$rc" -ne 0 ]; then
    FAILED+=("$name")
  fi
}

B16=(--config.batch_size="$BATCH" --steps="$STEPS")
run clip_b16 --config=configs/clip_vit_b16.py "${B16[@]}"
run clip_b16_attention_xla --config=configs/clip_vit_b16.py "${B16[@]}" --config.model.attention=xla
# ITO encodes M = N = 2 views per sample, so at half the batch it encodes as
# many images as the CLIP runs.
run ito_b16 --config=configs/ito_vit_b16.py --config.batch_size=$((BATCH / 2)) --steps="$STEPS"
run bench_s_ot --config=configs/bench_s.py --steps="$STEPS" --ot
run clip_b16_unscanned --config=configs/clip_vit_b16.py "${B16[@]}" --config.model.scan_layers=False
run clip_b16_patch_dropout50 --config=configs/clip_vit_b16.py "${B16[@]}" --config.model.image.patch_dropout=0.5
run clip_b16_accumulation4 --config=configs/clip_vit_b16.py --config.batch_size="$BATCH" --steps=3 \
  --config.optim.accumulation_steps=4
run clip_b16_remat_full --config=configs/clip_vit_b16.py --config.batch_size="$BATCH" --steps=3 \
  --config.model.remat=full
run siglip_b16 --config=configs/siglip_vit_b16.py "${B16[@]}"

if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "== failed: ${FAILED[*]}" | tee -a "$LOG"
  exit 1
fi
echo "== every run finished" | tee -a "$LOG"
