#!/usr/bin/env bash
# The preference-tuning exercise behind docs/rlhf.md. Resumable: a finished run is skipped
# (runs/NAME/done), an interrupted one continues from its last checkpoint (--resume); two
# copies may run side by side (a lock per run), e.g. `THREADS=1 STAGES="rm dpo"` next to
# `THREADS=1` (two copies with 2 threads each on 2 cores lose a third of the time to the kernel).
# Run from the repository root after `cargo build --release`; each run logs to
# runs/logs/NAME.log.
#
#   grpo  GRPO on SmolLM2-135M-Instruct (Q4_1 GGUF, LoRA r=16 on the dequantised base) with the
#         programmatic reward contains:with (17% of the model's 40-token answers to these
#         prompts contain "with" at the start) on the Alpaca demo instructions: 4 prompts x 8
#         samples a step, k3 KL term beta 0.04 (DeepSeekMath's value), 60 steps; the reward is
#         the function's alone (no missing-EOS penalty).
#   ppo   PPO on the same model, reward and prompts: 16 prompts a step, 4 epochs of 2
#         minibatches, KL coefficient 0.15, a constant learning rate 2e-4, 50 steps.
#   ppo-lr1e-4  (not in the default stages) the same at KL coefficient 0.1 and lr 1e-4, 60 steps.
#   ppo-lr1.5e-4  (not in the default stages) the same at lr 1.5e-4, 60 steps.
#   ppo-32  (not in the default stages) 32 prompts a step, 2 epochs of 2 minibatches (the same
#         updates per step as 16 x 4 x 2), lr 2e-4, the adaptive KL controller (start 0.1,
#         target 5 nats, horizon 320 samples: at most 2% a step), 45 steps.
#   length  (not in the default stages) GRPO with length:16 and the missing-EOS penalty: a
#         harder target (answers of about 16 tokens that end), 80 steps.
#   rm    The SFT adapter of docs/sft-lora.md merged into SmolLM2, then a reward model (LoRA
#         r=16 + score head) on dpo_en_demo.json, 20% held out, pairs up to 1024 tokens.
#   pipe  PPO of the SFT model against that reward model.
#   dpo   DPO (LoRA r=16, sigmoid loss, beta 0.1) from SmolLM2-Instruct on the first 100 pairs
#         of dpo_en_demo.json (30% held out), cut to 384 tokens (the prompt's start first,
#         then the completion's end): one thread forwards about 250 tokens/s, so the whole set
#         at 1024 tokens would take hours here.
set -euo pipefail
K=${KILN:-target/release/kiln}
T="--threads ${THREADS:-2}"
M=${SMOLLM2:-.cache/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
STAGES=${STAGES:-grpo ppo rm pipe dpo}
PREFS=.cache/sft-data/dpo_en_demo.json
PROMPTS=.cache/rlhf/prompts.jsonl
scripts/fetch-test-assets.sh >/dev/null
scripts/fetch-sft-data.sh >/dev/null
mkdir -p runs/logs .cache/rlhf
[ -s $PROMPTS ] || python3 bench/rlhf/make_prompts.py .cache/sft-data/alpaca_en_demo.json > $PROMPTS
want() { [[ " $STAGES " == *" $1 "* ]]; }
run() { # NAME VERB ARGS...: runs `kiln VERB` unless runs/NAME is complete
    local name=$1; shift
    until mkdir "runs/$name.lock" 2>/dev/null; do # another copy is on it: wait for it
        [ -f "runs/$name/done" ] && break
        sleep 30
    done
    if [ -f "runs/$name/done" ]; then echo "skip $name"; rmdir "runs/$name.lock" 2>/dev/null || true; return; fi
    local resume=""
    [ -d "runs/$name/checkpoints" ] && resume="--resume"
    /usr/bin/time -v $K $T "$@" --out "runs/$name" $resume >> "runs/logs/$name.log" 2>&1 \
        && touch "runs/$name/done"
    rmdir "runs/$name.lock"
    grep -E " done |Maximum resident" "runs/logs/$name.log" | tail -2 || true
}
if want grpo; then
    run grpo-smollm2 grpo --model $M --prompts $PROMPTS --reward-fn contains:with \
        --lora-rank 16 --group-size 8 --beta 0.04 --max-new-tokens 40 --set train.steps=60 \
        --set train.batch_size=4 --set grpo.penalize_missing_eos=false --set optim.lr=3e-4 \
        --set train.checkpoint_every=10
fi
if want ppo; then
    # The run of docs/rlhf.md: 40 steps, then resumed to 50 (the learning rate is constant, so
    # that is the same run as 50 straight steps). ppo-lr1e-4 is the slower first run beside it.
    run ppo-smollm2-kl015 ppo --model $M --prompts $PROMPTS --reward-fn contains:with \
        --lora-rank 16 --max-new-tokens 40 --set train.steps=50 --set train.batch_size=16 \
        --set ppo.epochs=4 --set ppo.minibatches=2 --set ppo.penalize_missing_eos=false \
        --set optim.lr=2e-4 --set optim.min_lr=2e-4 --set optim.warmup_steps=5 \
        --set ppo.kl_coef=0.15 --set train.checkpoint_every=10
fi
if want ppo-lr1e-4; then
    run ppo-smollm2 ppo --model $M --prompts $PROMPTS --reward-fn contains:with --lora-rank 16 \
        --max-new-tokens 40 --set train.steps=60 --set train.batch_size=16 --set ppo.epochs=4 \
        --set ppo.minibatches=2 --set ppo.penalize_missing_eos=false --set optim.lr=1e-4 \
        --set optim.min_lr=1e-4 --set optim.warmup_steps=5 --set train.checkpoint_every=10
fi
if want ppo-lr1.5e-4; then
    run ppo-smollm2-lr15 ppo --model $M --prompts $PROMPTS --reward-fn contains:with --lora-rank 16 \
        --max-new-tokens 40 --set train.steps=60 --set train.batch_size=16 --set ppo.epochs=4 \
        --set ppo.minibatches=2 --set ppo.penalize_missing_eos=false --set optim.lr=1.5e-4 \
        --set optim.min_lr=1.5e-4 --set optim.warmup_steps=5 --set train.checkpoint_every=10
fi
if want ppo-32; then
    run ppo-smollm2-32 ppo --model $M --prompts $PROMPTS --reward-fn contains:with --lora-rank 16 \
        --max-new-tokens 40 --set train.steps=45 --set train.batch_size=32 --set ppo.epochs=2 \
        --set ppo.minibatches=2 --set ppo.penalize_missing_eos=false --set optim.lr=2e-4 \
        --set optim.min_lr=2e-4 --set optim.warmup_steps=5 --set ppo.adaptive_kl=true \
        --set ppo.kl_target=5 --set ppo.kl_horizon=320 --set train.checkpoint_every=5
fi
if want length; then
    run grpo-length-smollm2 grpo --model $M --prompts $PROMPTS --reward-fn length:16 \
        --lora-rank 16 --group-size 8 --beta 0.04 --max-new-tokens 40 --set train.steps=80 \
        --set train.batch_size=4 --set optim.lr=3e-4 --set train.checkpoint_every=10
fi
if want rm; then
    if [ ! -f runs/sft-smollm2-merged/config.json ]; then
        [ -d runs/sft-smollm2-lora/adapter ] || bench/sft/exercise.sh
        $K $T lora merge --model $M --adapter runs/sft-smollm2-lora/adapter \
            --out runs/sft-smollm2-merged > runs/logs/sft-smollm2-merged.log 2>&1
    fi
    run rm-smollm2 reward train --model runs/sft-smollm2-merged --data $PREFS --lora-rank 16 \
        --set train.seq_len=1024 --set sft.val_fraction=0.2 --set train.eval_every=15
fi
if want dpo; then
    run dpo-smollm2 dpo --model $M --data $PREFS --lora-rank 16 --beta 0.1 \
        --set sft.max_records=100 --set sft.val_fraction=0.3 --set train.seq_len=384 \
        --set train.eval_every=0
fi
if want pipe; then
    until [ -f runs/rm-smollm2/done ]; do sleep 30; done # the reward model (stage rm)
    run ppo-rm-smollm2 ppo --model runs/sft-smollm2-merged --prompts $PROMPTS \
        --reward runs/rm-smollm2 --lora-rank 16 --max-new-tokens 48 --set train.steps=10 \
        --set train.batch_size=8 --set ppo.minibatches=2 --set optim.lr=1e-4 \
        --set train.checkpoint_every=10
fi
echo "exercise complete: $STAGES"
