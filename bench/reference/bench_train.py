"""Time full PyTorch training steps of the kiln reference model (CPU, fp32 or bf16 autocast).

One step = forward + backward + clip_grad_norm_ + AdamW step + zero_grad on
random tokens. Reports the median step time over the timed steps and tokens/s.
With --precision bf16 the forward and loss run under torch.autocast("cpu",
dtype=torch.bfloat16): matmuls in bf16, weights, gradients and AdamW in fp32.

Usage:
  python bench/reference/bench_train.py --preset reference [--threads 2] \
      [--warmup 2 --steps 5] [--json]
  python bench/reference/bench_train.py --preset reference --flops   # FLOPs/token only
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kiln_ref import Llama, LlamaConfig, init_weights, param_groups  # noqa: E402

PRESETS = {
    "reference": dict(model=dict(vocab_size=8192, dim=384, n_layers=6, n_heads=6, n_kv_heads=2,
                                 ffn_dim=1024, tie_embeddings=False), seq_len=256, batch=8),
    "tiny": dict(model=dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                            ffn_dim=192, tie_embeddings=False), seq_len=64, batch=4),
    "smollm2-135m": dict(model=dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                    ffn_dim=1536, tie_embeddings=True, rope_theta=100000.0),
                         seq_len=256, batch=8),
}


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> int:
    """PaLM convention: 6*N + 12*L*d*T, N = all matmul weights (not the input
    embedding table; the output head counts even when tied)."""
    hd = cfg.head_dim
    attn = cfg.dim * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)  # wq, wk, wv, wo
    ffn = 3 * cfg.dim * cfg.ffn_dim  # w1, w3, w2
    n = cfg.n_layers * (attn + ffn) + cfg.vocab_size * cfg.dim  # + output head
    return 6 * n + 12 * cfg.n_layers * cfg.dim * seq_len


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="reference")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--attn", choices=["sdpa", "math"], default="sdpa")
    ap.add_argument("--seq-len", type=int, help="context length (default: the preset's)")
    ap.add_argument("--batch-size", type=int, help="sequences per step (default: the preset's)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: torch.autocast('cpu', dtype=torch.bfloat16) around forward and loss")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    ap.add_argument("--flops", action="store_true", help="print training FLOPs/token and exit")
    args = ap.parse_args()

    p = PRESETS[args.preset]
    seq_len = args.seq_len or p["seq_len"]
    batch = args.batch_size or p["batch"]
    cfg = LlamaConfig(**{"rope_theta": 10000.0, **p["model"]}, max_seq_len=seq_len, norm_eps=1e-5)
    fpt = flops_per_token(cfg, seq_len)
    if args.preset == "reference" and seq_len == 256:
        assert abs(fpt - 82.6e6) < 0.05e6, fpt
    if args.flops:
        print(f"{args.preset}: {fpt} training FLOPs/token ({fpt / 1e6:.1f}e6)")
        return

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Llama(cfg, attn_impl=args.attn)
    init_weights(model)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=3e-4, betas=(0.9, 0.95), eps=1e-8)

    times = []
    for i in range(args.warmup + args.steps):
        x = torch.randint(0, cfg.vocab_size, (batch, seq_len))
        y = torch.randint(0, cfg.vocab_size, (batch, seq_len))
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = model.loss(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(dt)
        print(f"step {i + 1}/{args.warmup + args.steps}{' (warm-up)' if i < args.warmup else ''}: "
              f"{dt * 1e3:.1f} ms", file=sys.stderr)

    step_ms = statistics.median(times) * 1e3
    tok_s = batch * seq_len / (step_ms / 1e3)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if args.json:
        print(json.dumps({"impl": "pytorch", "torch": torch.__version__, "preset": args.preset,
                          "threads": args.threads, "precision": args.precision, "step_ms_median": round(step_ms, 2),
                          "tokens_per_s": round(tok_s, 1), "peak_rss_mb": round(rss_mb, 1)}))
    else:
        print(f"pytorch {torch.__version__} preset={args.preset} precision={args.precision} "
              f"threads={args.threads}: "
              f"median step {step_ms:.1f} ms, {tok_s:.0f} tokens/s, "
              f"{tok_s * fpt / 1e9:.1f} GFLOP/s, peak RSS {rss_mb:.0f} MB")


if __name__ == "__main__":
    main()
