#!/usr/bin/env bash
# A LoRA adapter that kiln trains on a Qwen2.5 base, loaded by PEFT on transformers' Qwen2:
# kiln exports the GGUF base as an HF directory (f32), trains a rank-8 adapter on all seven
# projections for a few steps of the LLaMA-Factory alpaca demo, and decodes three prompts
# greedily with the unmerged adapter (`generate --prompt-file`: tokens and log-probs);
# check_lora_peft.py then loads the same base with transformers, applies the adapter with
# peft.PeftModel, and compares the greedy tokens and their log-probs.
#
#   bench/reference/check_lora_peft.sh [GGUF] [WORK]
#
# Needs target/release/kiln, scripts/fetch-test-assets.sh and scripts/fetch-sft-data.sh, and
# .cache/venv-ref with torch, transformers and peft. Minutes on 2 cores; not part of the suite.
set -euo pipefail
cd "$(dirname "$0")/../.."
GGUF=${1:-.cache/assets/qwen2.5-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf}
WORK=${2:-/tmp/kiln-lora-peft}
KILN=target/release/kiln
mkdir -p "$WORK"
[ -f "$WORK/base/config.json" ] || $KILN export --model "$GGUF" --format hf --out "$WORK/base"
rm -rf "$WORK/sft"
$KILN sft --model "$WORK/base" --data .cache/sft-data/alpaca_en_demo.json --out "$WORK/sft" \
  --lora-rank 8 --lora-alpha 16 --set train.steps=3 --set train.batch_size=2 \
  --set train.seq_len=192 --set optim.lr=1e-3 2>"$WORK/sft.log"
printf '%s\n' "def add(a, b):" "The three primary colors are" "Give three tips for staying healthy." >"$WORK/prompts.txt"
$KILN generate --model "$WORK/base" --adapter "$WORK/sft/adapter" --prompt-file "$WORK/prompts.txt" \
  --temperature 0 --max-new-tokens 12 >"$WORK/kiln.jsonl" 2>"$WORK/generate.log"
.cache/venv-ref/bin/python bench/reference/check_lora_peft.py \
  --base "$WORK/base" --adapter "$WORK/sft/adapter" --kiln "$WORK/kiln.jsonl"
