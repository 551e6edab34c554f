"""Time TRL's GRPOTrainer (PEFT LoRA, fp32, CPU) on the prompts written by `kiln bench grpo`.

The base is the GGUF itself, dequantised to float32 by transformers (as in bench_dpo.py); TRL
wraps it with PEFT's LoraConfig(r, lora_alpha, all seven LLaMA projections, dropout 0).

One optimizer step = one generation round + one update: --prompts-per-step prompts (P) x
--group-size samples each (G). In TRL 1.x per_device_train_batch_size counts completions, not
prompts, and generation_batch_size = per_device_train_batch_size x processes x
steps_per_generation; so per_device_train_batch_size = P*G, gradient_accumulation_steps = 1,
steps_per_generation = 1 and num_iterations = 1 give one model.generate call on P*G rows (each
prompt repeated G times), rewards, group advantages, then one forward + backward over the P*G
sequences and one AdamW step. Being exactly on-policy, TRL then skips the extra no-grad
forward for the "old" log-probs, and with beta=0 it has no reference forward either.

TRL settings: num_generations=G, max_completion_length=--max-new-tokens, sampling with
--temperature, top_p=1, top_k=0 (off), no min_p, no repetition penalty, HF generate with a KV
cache (no vLLM, no continuous batching), stop at the tokenizer's EOS (<|im_end|> for SmolLM2)
or the model's other eos ids; beta=0.0 (no KL, no reference model); loss_type="grpo" (mean over
each sequence's tokens, then over sequences, as kiln's GRPO); rewards scaled per group
((r - mean) / (std + 1e-4)); prompts in file order (shuffle_dataset=False), seed 0; fp32,
activation checkpointing OFF unless --gradient-checkpointing (TRL defaults it on, kiln off);
AdamW with a constant --lr, betas (0.9, 0.95), weight decay 0.1, grad norm clipped to 1.0.
TRL 1.x has no max_prompt_length: prompts are never cut.

Reward: 1.0 when the completion, decoded by TRL with skip_special_tokens=True, contains
--reward-contains, else 0.0 (kiln's contains:TEXT with the missing-EOS penalty off).

Prompts go in as token ids: the dataset's "prompt" column holds the decoded text (TRL treats it
as plain text, so no chat template is applied again) and "prompt_ids" the file's ids, and the
trainer's prompt tokenization is replaced by those ids, so generation starts from exactly the
file's ids. The script also reports whether TRL's own tokenization of the text would have
given the same ids (retokenized_prompts_match).

Timings: step_s = transformers' on_step_begin -> on_step_end (generation, rewards, loss,
backward, clip, optimizer step); rollout_s = TRL's _generate_and_score_completions (left-pad,
model.generate, decode, reward, advantages); generate_s = the model.generate part only;
update_s = step_s - rollout_s. median_step_s over the steps after --warmup. Tokens of a step =
sum over its P*G samples of (prompt tokens + completion tokens), a completion counted as TRL
keeps it (up to and including its EOS, at most --max-new-tokens), i.e. each sample's prompt
and response through the rollout and the update, as kiln counts. Padding is excluded: TRL
left-pads the prompts and right-pads the completions to the step's longest, and computes
padded_tokens_per_step positions in the update's forward and backward;
tokens_per_s = those tokens summed over the timed steps / the timed steps' summed seconds.
peak_rss_mib = ru_maxrss of this process.

Usage (kiln runs it with --pytorch; --steps counts the warmup steps too):
  python bench/reference/bench_grpo.py --gguf MODEL.gguf --prompts PROMPTS.json \
      [--prompts-per-step 4 --group-size 4 --max-new-tokens 32 --temperature 1.0 --rank 16 \
       --alpha 32 --steps 4 --warmup 1 --threads 2 --lr 1e-5 --reward-contains with]
PROMPTS.json: [{"prompt_ids": [...]}, ...], the prompts of step s at
[s*prompts_per_step, (s+1)*prompts_per_step).
"""

import argparse
import contextlib
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time

from bench_dpo import StepTimer, load_gguf_f32, lora_config, shared_training_args  # same directory; also sets the offline / no-telemetry env

import datasets
import peft
import torch
import transformers
import trl


class PreTokenizedGRPOTrainer(trl.GRPOTrainer):
    """GRPOTrainer that generates from the dataset's prompt_ids and times its rollouts."""

    def __init__(self, *a, expected_rows, **kw):
        super().__init__(*a, **kw)
        self.expected_rows = expected_rows  # step -> the dataset rows its rollout must hold
        self.rollouts = []  # one dict per training rollout
        self.retokenized_prompts_match = None
        self._rows = None
        self._gen_s = 0.0

    def _generate_and_score_completions(self, inputs):
        # `inputs` is the generation batch: P*G dataset rows (each prompt G times in a row).
        training = self.model.training
        if training:
            k = len(self.rollouts)
            want = self.expected_rows(k)
            got = [x["row"] for x in inputs]
            assert got == want, f"rollout {k}: rows {got}, expected {want}"
        self._rows = inputs
        self._gen_s = 0.0
        t0 = time.perf_counter()
        out = super()._generate_and_score_completions(inputs)
        rollout_s = time.perf_counter() - t0
        if training:
            prompt_tokens = sum(len(x["prompt_ids"]) for x in inputs)
            completion_lens = out["completion_mask"].sum(dim=1).tolist()
            self.rollouts.append({
                "rollout_s": rollout_s,
                "generate_s": self._gen_s,
                "tokens": prompt_tokens + int(sum(completion_lens)),
                # what the update's forward computes: rows x (longest prompt + longest completion)
                "padded": out["prompt_ids"].numel() + out["completion_ids"].numel(),
                "completion_len_mean": statistics.mean(completion_lens),
                "rewards": self._last_rewards,
            })
        return out

    def _tokenize_prompts(self, prompts):
        # TRL would tokenize plain-text prompts with `processing_class(text=prompts)`; use the
        # file's ids instead. Returns (prompt_ids, images, multimodal_fields) like TRL's.
        assert [x["prompt"] for x in self._rows] == list(prompts)
        ids = [list(x["prompt_ids"]) for x in self._rows]
        if self.retokenized_prompts_match is None:
            self.retokenized_prompts_match = self.processing_class(text=list(prompts))["input_ids"] == ids
        return ids, None, {}

    def _generate_single_turn(self, *a, **kw):
        t0 = time.perf_counter()
        out = super()._generate_single_turn(*a, **kw)
        self._gen_s += time.perf_counter() - t0
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps in all, warmup included")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--reward-contains", default="with")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="TRL's default; off here to match kiln's default")
    args = ap.parse_args()
    if args.steps <= args.warmup:
        sys.exit("--steps must exceed --warmup")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    P, G = args.prompts_per_step, args.group_size

    model, tokenizer = load_gguf_f32(args.gguf)
    records = json.load(open(args.prompts))
    need = args.steps * P
    if len(records) < need:
        sys.exit(f"{args.prompts} holds {len(records)} prompts; {args.steps} steps of {P} need {need}")
    records = records[:need]  # TRL's sampler drops a last incomplete group of prompts anyway
    ids = [[int(t) for t in r["prompt_ids"]] for r in records]
    dataset = datasets.Dataset.from_dict({
        # Plain text, never chat-templated again by TRL (is_conversational is False for a str).
        "prompt": [tokenizer.decode(x, skip_special_tokens=False) for x in ids],
        "prompt_ids": ids,
        "row": list(range(len(ids))),
    })

    def contains(completions, **kwargs):
        rewards = [1.0 if args.reward_contains in c else 0.0 for c in completions]
        trainer._last_rewards = rewards
        return rewards

    lora = lora_config(args)
    out_dir = tempfile.mkdtemp(prefix="bench_grpo_")
    config = trl.GRPOConfig(
        output_dir=out_dir,
        # one optimizer step = one generation round of P prompts x G samples = one update
        per_device_train_batch_size=P * G,  # completions, not prompts
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=G,
        num_iterations=1,
        shuffle_dataset=False,
        max_steps=args.steps,
        seed=0,
        dataloader_num_workers=0,
        remove_unused_columns=False,  # keep prompt_ids / row for our overrides
        # generation
        max_completion_length=args.max_new_tokens,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        min_p=None,
        repetition_penalty=1.0,
        use_vllm=False,
        use_transformers_continuous_batching=False,
        # objective
        beta=0.0,
        loss_type="grpo",
        scale_rewards="group",
        mask_truncated_completions=False,
        log_completions=False,
        **shared_training_args(args),
    )

    timer = StepTimer()
    with contextlib.redirect_stdout(sys.stderr):  # stdout is for our one JSON line
        trainer = PreTokenizedGRPOTrainer(
            model=model,
            reward_funcs=contains,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[timer],
            expected_rows=lambda k: [r for r in range(k * P, (k + 1) * P) for _ in range(G)],
        )
        trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)  # save_strategy="no": nothing to keep

    n = len(timer.step_s)
    assert n == args.steps == len(trainer.rollouts), (n, args.steps, len(trainer.rollouts))
    ro = trainer.rollouts
    timed = timer.step_s[args.warmup:]
    tokens = sum(r["tokens"] for r in ro[args.warmup:])
    print(json.dumps({
        "tool": "trl",
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "peft_version": peft.__version__,
        "step_s": timer.step_s,
        "median_step_s": statistics.median(timed),
        "tokens_per_s": tokens / sum(timed),
        "tokens_per_step": [r["tokens"] for r in ro],
        "padded_tokens_per_step": [r["padded"] for r in ro],
        "rollout_s": [r["rollout_s"] for r in ro],
        "generate_s": [r["generate_s"] for r in ro],
        "update_s": [s - r["rollout_s"] for s, r in zip(timer.step_s, ro)],
        "median_rollout_s": statistics.median(r["rollout_s"] for r in ro[args.warmup:]),
        "median_generate_s": statistics.median(r["generate_s"] for r in ro[args.warmup:]),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "mean_reward": [statistics.mean(r["rewards"]) for r in ro],
        "completion_len_mean": [r["completion_len_mean"] for r in ro],
        "losses": timer.losses,
        "steps": n,
        "warmup": args.warmup,
        "prompts_per_step": P,
        "group_size": G,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "rank": args.rank,
        "alpha": args.alpha,
        "lr": args.lr,
        "threads": torch.get_num_threads(),
        "gradient_checkpointing": args.gradient_checkpointing,
        "retokenized_prompts_match": trainer.retokenized_prompts_match,
    }))


if __name__ == "__main__":
    main()
