#!/usr/bin/env bash
# The instruction-tuning exercise behind docs/sft-lora.md. Resumable: each run is skipped when
# its adapter/checkpoint exists. Run from the repository root after `cargo build --release`.
#
#   1. SmolLM2-135M-Instruct (Q4_1 GGUF), LoRA r=8 on all seven projections, 1 epoch of the
#      Alpaca demo set (999 records, 5% held out), seq_len 512, batch 4.
#   2. The same model, 240 records, 25 steps each: LoRA on the dequantised base, QLoRA-style
#      (--base-quantized), and full fine-tuning: wall time, tokens/s, peak RSS, held-out loss.
#   3. The 10M model kiln pretrains on Shakespeare (configs/10m.toml, 300 steps), then fully
#      fine-tuned on the same Alpaca set with kiln's plain template.
set -euo pipefail
K=${KILN:-target/release/kiln}
T="--threads 2"
M=${SMOLLM2:-.cache/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
D=.cache/sft-data/alpaca_en_demo.json
scripts/fetch-test-assets.sh >/dev/null
scripts/fetch-sft-data.sh >/dev/null
mkdir -p runs/logs
run() { # NAME ARGS...: runs `kiln sft` unless runs/NAME is complete, logging to runs/logs/NAME.log
    local name=$1; shift
    if [ -f "runs/$name/done" ]; then echo "skip $name"; return; fi
    /usr/bin/time -v $K $T sft --out "runs/$name" "$@" --set train.peak_flops=2e11 \
        > "runs/logs/$name.log" 2>&1 && touch "runs/$name/done"
    grep -E "done |Maximum resident" "runs/logs/$name.log" || true
}
# 1. The main LoRA run.
run sft-smollm2-lora --model $M --data $D --lora-rank 8 \
    --set train.seq_len=512 --set train.eval_every=25 --set train.log_every=5
# 2. LoRA vs QLoRA vs full fine-tuning on the same 240 records.
small="--set sft.max_records=240 --set train.seq_len=512 --set train.steps=25 --set train.eval_every=0 --set train.log_every=5"
run cmp-lora --model $M --data $D --lora-rank 8 $small
run cmp-qlora --model $M --data $D --lora-rank 8 --base-quantized $small
run cmp-full --model $M --data $D $small
# 3. The 10M model: pretrain on Shakespeare, then instruction-tune with the plain template.
if [ ! -d runs/10m/checkpoints ]; then
    $K $T pretrain --config configs/10m.toml --set train.steps=300 > runs/logs/10m.log 2>&1
fi
run sft-10m --model runs/10m --data $D --set train.seq_len=256 --set train.batch_size=8 \
    --set optim.lr=5e-4 --set sft.epochs=2 --set train.eval_every=25 --set train.log_every=5
echo "exercise complete"
