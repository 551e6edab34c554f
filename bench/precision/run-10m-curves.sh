#!/usr/bin/env bash
# The 10m config for 2,000 steps twice, f32 and bf16 mixed precision (train.precision), one
# thread each side by side, then both loss curves in one plot (docs/img/10m-bf16-vs-f32.png).
# Resumable: run it again after an interruption and each run continues from its last
# checkpoint (exact resume). Needs a CPU with AVX512-BF16 for the bf16 run to be bf16 (kiln
# says so in its log when it falls back to f32).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet
KILN=target/release/kiln
STEPS=${STEPS:-2000}
run() {
  local precision=$1 dir=runs/10m-${STEPS}-$1
  local resume=()
  [ -f "$dir/metrics.jsonl" ] && resume=(--resume)
  "$KILN" --threads 1 pretrain --config configs/10m.toml "${resume[@]}" \
    --set train.steps="$STEPS" --set train.precision="\"$precision\"" \
    --set train.run_dir="\"$dir\"" > "$dir.log" 2>&1
}
mkdir -p runs
run f32 & f32_pid=$!
run bf16 & bf16_pid=$!
wait $f32_pid
wait $bf16_pid
"$KILN" plot "runs/10m-${STEPS}-f32" "runs/10m-${STEPS}-bf16" --out docs/img/10m-bf16-vs-f32.png
