"""PyTorch twin of `kiln pretrain`, for loss-curve comparisons.

Reads kiln's resolved run config (TOML), samples training windows with kiln's
splitmix64 sampler, and trains the reference model with the same LR schedule,
AdamW param groups, global-norm clipping and gradient accumulation.

Usage:
  python bench/reference/train_ref.py --config RUN_DIR/config.toml --out OUT_DIR \
      [--init RUN_DIR/init.safetensors] [--threads 2]

Writes OUT_DIR/metrics.jsonl: {"step", "tokens", "loss", "lr", "grad_norm",
"tokens_per_s"} every log_every steps (and the last), and {"step", "tokens",
"val_loss"} every eval_every steps and at the end.
"""

import argparse
import json
import math
import os
import sys
import time
import tomllib

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kiln_ref import (Llama, LlamaConfig, init_weights, load_safetensors_weights,  # noqa: E402
                      param_groups, save_weights)

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def splitmix64(x: int) -> int:
    z = (x + GOLDEN) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def window_start(seed: int, g: int, n_tokens: int, seq_len: int) -> int:
    """Start of global training row g (kiln's sampler)."""
    return splitmix64(seed ^ ((g * GOLDEN) & MASK64)) % (n_tokens - seq_len)


def to_batch(tokens, starts, seq_len):
    """Windows of seq_len+1 tokens -> (inputs, targets), each (len(starts), seq_len) int64."""
    w = torch.from_numpy(np.stack([tokens[s:s + seq_len + 1].astype(np.int64) for s in starts]))
    return w[:, :-1], w[:, 1:]


def train_batch(tokens, seed, k, batch_size, seq_len):
    """Micro-batch number k (k = step * grad_accum + micro)."""
    n = len(tokens)
    starts = [window_start(seed, k * batch_size + r, n, seq_len) for r in range(batch_size)]
    return to_batch(tokens, starts, seq_len)


def lr_at(s, o, steps):
    """Linear warmup then cosine decay to min_lr (s is 0-based)."""
    warm = o["warmup_steps"]
    if s < warm:
        return o["lr"] * (s + 1) / warm
    p = (s - warm) / max(1, steps - warm)
    return o["min_lr"] + 0.5 * (1 + math.cos(math.pi * p)) * (o["lr"] - o["min_lr"])


@torch.no_grad()
def evaluate(model, val, t):
    """Mean token loss over eval_batches sequential val windows (stops at the end of val.bin)."""
    bs, seq_len = t["batch_size"], t["seq_len"]
    total, count = 0.0, 0
    for b in range(t["eval_batches"]):
        starts = [(b * bs + r) * seq_len for r in range(bs)]
        starts = [s for s in starts if s + seq_len + 1 <= len(val)]
        if not starts:
            break
        x, y = to_batch(val, starts, seq_len)
        total += model.loss(x, y, reduction="sum").item()
        count += y.numel()
        if len(starts) < bs:
            break
    return total / max(count, 1)


def load_tokens(data_dir, split):
    with open(os.path.join(data_dir, "meta.json")) as f:
        dtype = {"u16": "<u2", "u32": "<u4"}[json.load(f)["dtype"]]
    return np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=dtype, mode="r")


def resolve_dataset(path, config_path):
    if os.path.isabs(path) or os.path.exists(path):
        return path
    return os.path.join(os.path.dirname(os.path.abspath(config_path)), path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="kiln resolved config.toml")
    ap.add_argument("--out", required=True, help="output dir for metrics.jsonl")
    ap.add_argument("--init", help="initial weights (safetensors, kiln names)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", choices=["sdpa", "math"], default="sdpa")
    ap.add_argument("--save", help="optionally save final weights here (safetensors)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with open(args.config, "rb") as f:
        conf = tomllib.load(f)
    cfg = LlamaConfig.from_dict(conf["model"])
    o, t = conf["optim"], conf["train"]
    seed, steps, bs, accum, seq_len = t["seed"], t["steps"], t["batch_size"], t["grad_accum"], t["seq_len"]
    assert seq_len <= cfg.max_seq_len
    data_dir = resolve_dataset(conf["data"]["dataset"], args.config)
    train, val = load_tokens(data_dir, "train"), load_tokens(data_dir, "val")

    torch.manual_seed(seed)
    model = Llama(cfg, attn_impl=args.attn)
    if args.init:
        load_safetensors_weights(model, args.init)
    else:
        init_weights(model, std=0.02)
    opt = torch.optim.AdamW(param_groups(model, o["weight_decay"]), lr=o["lr"],
                            betas=(o["beta1"], o["beta2"]), eps=o["eps"])

    os.makedirs(args.out, exist_ok=True)
    metrics = open(os.path.join(args.out, "metrics.jsonl"), "w")

    def log(row):
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        print(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in row.items()), file=sys.stderr)

    tokens_per_step = accum * bs * seq_len
    log_every, eval_every = t.get("log_every", 1), t.get("eval_every", 0)
    timer, timed_tokens = 0.0, 0
    for s in range(steps):
        t0 = time.perf_counter()
        lr = lr_at(s, o, steps)
        for g in opt.param_groups:
            g["lr"] = lr
        step_loss = 0.0
        for micro in range(accum):
            x, y = train_batch(train, seed, s * accum + micro, bs, seq_len)
            loss = model.loss(x, y, reduction="sum") / tokens_per_step  # all tokens are valid
            loss.backward()
            step_loss += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o["grad_clip"]).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        timer += time.perf_counter() - t0
        timed_tokens += tokens_per_step

        step, tokens = s + 1, (s + 1) * tokens_per_step
        if (log_every > 0 and step % log_every == 0) or step == steps:
            log({"step": step, "tokens": tokens, "loss": step_loss, "lr": lr,
                 "grad_norm": grad_norm, "tokens_per_s": timed_tokens / timer})
            timer, timed_tokens = 0.0, 0
        if (eval_every > 0 and step % eval_every == 0) or step == steps:
            log({"step": step, "tokens": tokens, "val_loss": evaluate(model, val, t)})
    metrics.close()
    if args.save:
        save_weights(model, args.save)


if __name__ == "__main__":
    main()
