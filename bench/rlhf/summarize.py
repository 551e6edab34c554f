"""Summarises the runs of bench/rlhf/exercise.sh for docs/rlhf.md: per run, the metrics of
the first and last steps (means over a window), the held-out rows, wall time from the
metrics, and copies the plots to docs/rlhf/.

    python3 bench/rlhf/summarize.py [RUN...]
"""
import json
import shutil
import sys
from pathlib import Path

RUNS = sys.argv[1:] or ["grpo-smollm2", "ppo-smollm2", "rm-smollm2", "dpo-smollm2", "ppo-rm-smollm2"]
KEYS = ["reward", "score", "kl", "entropy", "response_len", "eos_fraction", "clip_fraction",
        "approx_kl", "value_loss", "loss", "accuracy", "margin", "reward_chosen",
        "reward_rejected"]
OUT = Path("docs/rlhf")
OUT.mkdir(parents=True, exist_ok=True)


def mean(rows, k):
    vals = [r[k] for r in rows if k in r]
    return sum(vals) / len(vals) if vals else None


for name in RUNS:
    run = Path("runs") / name
    path = run / "metrics.jsonl"
    if not path.exists():
        print(f"## {name}: no metrics yet\n")
        continue
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    train = [r for r in rows if not r.get("eval")]
    evals = [r for r in rows if r.get("eval")]
    wall = sum(r.get("step_s", 0) for r in train)
    print(f"## {name}: {len(train)} steps, {wall / 60:.1f} min of steps")
    if train:
        w = max(1, min(5, len(train) // 4))
        print(f"| metric | steps 1-{w} | max | last {w} |")
        print("|---|---|---|---|")
        for k in KEYS:
            a, b = mean(train[:w], k), mean(train[-w:], k)
            if a is None:
                continue
            hi = max(r[k] for r in train if k in r)
            print(f"| {k} | {a:.3f} | {hi:.3f} | {b:.3f} |")
    for e in evals:
        vals = ", ".join(f"{k} {e[k]:.3f}" for k in KEYS if k in e)
        print(f"- held-out at step {e['step']}: {vals}")
    for png in run.glob("*.png"):
        shutil.copy(png, OUT / f"{name}-{png.name}")
    samples = run / "samples.jsonl"
    if samples.exists():
        s = [json.loads(l) for l in samples.read_text().splitlines()]
        for x in (s[0], s[-1]):
            print(f"- sample at step {x['step']} (reward {x['reward']:.2f}): "
                  f"{x['prompt'][:80]!r} -> {x['response'][:200]!r}")
    print()
