"""Time TRL's DPOTrainer (PEFT LoRA, fp32, CPU) on the preference pairs written by `kiln bench dpo`.

The base is the GGUF itself, dequantised to float32 by transformers (the same weights kiln's
dense LoRA run uses). TRL wraps it with PEFT's LoraConfig(r, lora_alpha, all seven LLaMA
projections, dropout 0), so the reference policy is the base with the adapters disabled.

TRL settings: sigmoid loss with --beta, precompute_ref_log_probs=True (one no-grad pass of the
adapter-disabled model over every pair before training, timed separately as ref_logps_s),
per_device_train_batch_size=--batch-size, no gradient accumulation, max_length=--seq-len,
fp32 (bf16=False), gradient checkpointing OFF (TRL defaults it on; kiln's default is off, so
pass --gradient-checkpointing to compare against kiln's train.activation_checkpointing=true),
AdamW (adamw_torch) with a constant --lr, betas (0.9, 0.95), weight decay 0.1 (kiln's
defaults), clip the global grad norm to 1.0, pairs in file order (no shuffling), seed 0.

The pairs are fed as token ids, never text: the dataset has TRL's own tokenized columns
(prompt_ids, chosen_ids, rejected_ids) and DPOTrainer's tokenizing preprocessing is skipped,
so TRL's collator sees exactly the file's ids (checked for every training batch; the script
fails otherwise). Each step stacks its pairs as [prompt+chosen ...; prompt+rejected ...],
right-padded to the longest of the batch.

One step = what happens between transformers' on_step_begin and on_step_end callbacks: the
policy forward over 2 x batch-size sequences with TRL's fused log-prob head, the DPO loss,
backward, grad clipping, the optimizer and scheduler steps and zero_grad (the batch is
collated just before on_step_begin; logging comes after on_step_end). median_step_s is the
median over the steps after --warmup. Tokens of a step = sum over its pairs of
(len(prompt)+len(chosen)) + (len(prompt)+len(rejected)), padding excluded (TRL computes
padded_tokens_per_step = 2 x batch-size x longest-sequence positions); tokens_per_s =
those tokens summed over the timed steps / the timed steps' summed seconds (as kiln counts).
peak_rss_mib = ru_maxrss of this process (model load and reference pass included).

Usage (kiln runs it with --pytorch; --steps counts the warmup steps too):
  python bench/reference/bench_dpo.py --gguf MODEL.gguf --pairs PAIRS.json \
      [--batch-size 4 --seq-len 256 --rank 16 --alpha 32 --steps 6 --warmup 1 --threads 2 \
       --beta 0.1 --lr 1e-4]
PAIRS.json: [{"prompt_ids": [...], "chosen_ids": [...], "rejected_ids": [...]}, ...], the
pairs of step s at [s*batch_size, (s+1)*batch_size).
"""

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

# No Hub calls (TRL pings telemetry when a trainer is built); set before importing HF libraries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's reference-pass progress bar reads this

import datasets  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402


def shared_training_args(args):
    """The trainer settings bench_dpo.py and bench_grpo.py share: fp32 on the CPU, activation
    checkpointing as --gradient-checkpointing says, kiln's AdamW defaults at a constant --lr,
    no evaluation or saving, a log row every step."""
    return dict(
        bf16=False,
        fp16=False,
        use_cpu=True,
        # transformers 5 renamed it activation_checkpointing (the old name is an alias that TRL
        # defaults to True); setting the new name makes the old one follow.
        activation_checkpointing=args.gradient_checkpointing,
        optim="adamw_torch",
        learning_rate=args.lr,
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.1,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
    )


def lora_config(args):
    """PEFT LoRA of --rank / --alpha on all seven LLaMA projections, no dropout (kiln's)."""
    return peft.LoraConfig(
        r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )


def load_gguf_f32(path):
    """The GGUF's model dequantised to float32 parameters, and its tokenizer.

    transformers dequantises every GGUF tensor on load but still marks the model as quantized
    (hf_quantizer = GgufHfQuantizer, config.quantization_config = GgufConfig), and Trainer
    refuses to train a model quantized with a method that has no training support. The
    parameters are ordinary float32 tensors, so the marks are dropped.
    """
    d, name = os.path.split(os.path.abspath(path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


class PreTokenizedDPOTrainer(trl.DPOTrainer):
    """DPOTrainer that takes already tokenized pairs as they are.

    TRL 1.x's DPOTrainer.__init__ always runs `_prepare_dataset` on a text dataset (extract the
    prompt, append EOS to plain-text completions, apply the chat template, tokenize, split at
    the common prefix, drop prompts that fill max_length). Its output is a dataset with the
    columns prompt_ids / chosen_ids / rejected_ids, which is what DataCollatorForPreference
    reads. Our dataset already has those columns, so preparation is the identity here.
    """

    ref_logps_s = None

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # Called from __init__ when precompute_ref_log_probs=True: a no-grad forward of the
        # adapter-disabled model over every pair, stored as ref_chosen_logps / ref_rejected_logps
        # columns that the collator passes on to the loss.
        t0 = time.perf_counter()
        out = super()._precompute_ref_logps(dataset, name, batch_size)
        self.ref_logps_s = time.perf_counter() - t0
        return out


class StepTimer(transformers.TrainerCallback):
    """Seconds from on_step_begin to on_step_end of each optimizer step, and the logged losses."""

    def __init__(self):
        self.step_s, self.losses, self._t0 = [], [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_s.append(time.perf_counter() - self._t0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


class CheckingCollator:
    """Wraps TRL's collator during training: checks each batch against the file, counts tokens.

    Training batches are drawn in file order (sequential sampler, one process), so the k-th
    collated batch must hold pairs [k*bs, (k+1)*bs) (wrapping around after an epoch).
    """

    def __init__(self, inner, pairs, batch_size):
        self.inner, self.pairs, self.bs = inner, pairs, batch_size
        self.tokens = []  # one entry per collated training batch, in order
        self.padded = []  # the same with padding: rows x padded length

    def __call__(self, examples):
        out = self.inner(examples)
        k = len(self.tokens)
        n = len(self.pairs)
        start = (k * self.bs) % n
        want = self.pairs[start : start + self.bs]
        assert len(examples) == len(want), f"batch {k}: {len(examples)} pairs, expected {len(want)}"
        ids, att, comp = out["input_ids"], out["attention_mask"], out["completion_mask"]
        b = len(want)
        for i, p in enumerate(want):
            for row, completion in ((i, p["chosen_ids"]), (b + i, p["rejected_ids"])):
                seq = p["prompt_ids"] + completion
                got = ids[row][att[row].bool()].tolist()
                assert got == seq, f"batch {k} row {row}: TRL's ids differ from the file's"
                want_mask = [0] * len(p["prompt_ids"]) + [1] * len(completion)
                assert comp[row][: len(seq)].tolist() == want_mask, f"batch {k} row {row}: completion mask"
        self.tokens.append(int(att.sum()))
        self.padded.append(ids.numel())
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps in all, warmup included")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="TRL's default; off here to match kiln's default")
    args = ap.parse_args()
    if args.steps <= args.warmup:
        sys.exit("--steps must exceed --warmup")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    pairs = json.load(open(args.pairs))
    pairs = [{k: [int(t) for t in p[k]] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for p in pairs]
    too_long = [i for i, p in enumerate(pairs)
                if len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) > args.seq_len]
    if too_long:
        # TRL would cut them (keep_start) and the work would differ from kiln's.
        sys.exit(f"pairs {too_long[:5]}... exceed --seq-len {args.seq_len}")
    dataset = datasets.Dataset.from_list(pairs)

    model, tokenizer = load_gguf_f32(args.gguf)
    lora = lora_config(args)

    out_dir = tempfile.mkdtemp(prefix="bench_dpo_")
    config = trl.DPOConfig(
        output_dir=out_dir,
        # DPO
        loss_type=["sigmoid"],
        beta=args.beta,
        precompute_ref_log_probs=True,
        max_length=args.seq_len,
        # batch and order
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        train_sampling_strategy="sequential",  # transformers 5: SequentialSampler, i.e. file order
        dataloader_num_workers=0,
        dataloader_drop_last=False,
        max_steps=args.steps,
        seed=0,
        data_seed=0,
        **shared_training_args(args),
    )

    timer = StepTimer()
    # transformers prints its log dicts on stdout; keep stdout for our one JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        trainer = PreTokenizedDPOTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[timer],
        )
        # Wrap the collator only now: the reference pass in __init__ used it already.
        checker = CheckingCollator(trainer.data_collator, pairs, args.batch_size)
        trainer.data_collator = checker
        trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)  # save_strategy="no": nothing to keep

    n = len(timer.step_s)
    assert n == args.steps, f"{n} steps timed, expected {args.steps}"
    timed = timer.step_s[args.warmup:]
    tokens = sum(checker.tokens[args.warmup : args.steps])
    print(json.dumps({
        "tool": "trl",
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "peft_version": peft.__version__,
        "step_s": timer.step_s,
        "median_step_s": statistics.median(timed),
        "tokens_per_s": tokens / sum(timed),
        "tokens_per_step": checker.tokens[: args.steps],
        "padded_tokens_per_step": checker.padded[: args.steps],
        "ref_logps_s": trainer.ref_logps_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "losses": timer.losses,
        "steps": n,
        "warmup": args.warmup,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "rank": args.rank,
        "alpha": args.alpha,
        "beta": args.beta,
        "lr": args.lr,
        "threads": torch.get_num_threads(),
        "gradient_checkpointing": args.gradient_checkpointing,
        "ids_checked": True,
    }))


if __name__ == "__main__":
    main()
