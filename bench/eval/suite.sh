#!/usr/bin/env bash
# The benchmark figures of docs/eval.md. Resumable: each (model, task) result is one JSON
# file, runs/eval/<model>/<task>.json (and its per-document scores, <task>.samples.jsonl), and
# a result that exists is skipped. Run from the
# repository root after `cargo build --release`; THREADS (default 2) per kiln process.
#
#   instruct  SmolLM2-135M-Instruct (the Q4_1 GGUF, scored in f32): all seven tasks, zero-shot,
#             HellaSwag / PIQA / LAMBADA on their first 1,000 documents, ARC-Easy, ARC-Challenge
#             and WinoGrande whole, MMLU on the first 18 questions of each of its 57 subjects
#             (1,026).
#   sft       The SFT model of docs/sft-lora.md (runs/sft-smollm2-merged, the adapter merged into
#             the same base) on the same documents of ARC-Easy, ARC-Challenge, PIQA, HellaSwag
#             and WinoGrande: before (instruct) and after.
#   pretrain  The model kiln pretrains (runs/10m, the 10M preset of docs/pretrain-10m.md) on all
#             seven, as instruct.
set -euo pipefail
K=${KILN:-target/release/kiln}
T="--threads ${THREADS:-2}"
M=${SMOLLM2:-.cache/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
STAGES=${STAGES:-instruct sft pretrain}
scripts/fetch-test-assets.sh >/dev/null
scripts/fetch-eval-data.sh >/dev/null
want() { [[ " $STAGES " == *" $1 "* ]]; }
one() { # NAME MODEL TASK LIMIT: one task's JSON result
    local out=runs/eval/$1/$3.json limit=""
    [ -s "$out" ] && { echo "skip $1/$3"; return; }
    mkdir -p "runs/eval/$1"
    [ -n "$4" ] && limit="--limit $4"
    $K $T eval --model "$2" --task "$3" $limit --json --samples "runs/eval/$1/$3.samples.jsonl" \
        > "$out.part" 2>> "runs/eval/$1/log"
    mv "$out.part" "$out"
    echo "$1/$3: $(cat "$out")"
}
if want instruct; then
    for t in arc_easy arc_challenge winogrande; do one instruct $M $t ""; done
    for t in hellaswag piqa lambada; do one instruct $M $t 1000; done
    one instruct $M mmlu 18
fi
if want sft; then
    for t in arc_easy arc_challenge winogrande; do one sft runs/sft-smollm2-merged $t ""; done
    for t in piqa hellaswag; do one sft runs/sft-smollm2-merged $t 1000; done
fi
if want pretrain; then
    for t in arc_easy arc_challenge winogrande; do one pretrain runs/10m $t ""; done
    for t in hellaswag piqa lambada; do one pretrain runs/10m $t 1000; done
    one pretrain runs/10m mmlu 18
fi
echo "suite complete: $STAGES"
