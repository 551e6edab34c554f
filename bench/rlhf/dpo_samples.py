"""Greedy answers of SmolLM2-Instruct with and without the DPO adapter to held-out prompts of
dpo_en_demo.json, for docs/rlhf.md. The held-out pairs are the run's held_out.jsonl, or (for
runs made before kiln wrote that file) recomputed exactly as kiln_sft::split_held_out does.

    python3 bench/rlhf/dpo_samples.py runs/dpo-smollm2 [N]
"""
import json
import subprocess
import sys
from pathlib import Path

run = Path(sys.argv[1])
n = int(sys.argv[2]) if len(sys.argv) > 2 else 3
M = ".cache/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def split_held_out(count, fraction, seed):
    """kiln_sft::split_held_out: index i is held out when SplitMix64(seed ^ i*golden) < fraction."""
    mask = (1 << 64) - 1

    def score(i):
        state = (seed ^ (i * 0x9E3779B97F4A7C15 & mask)) & mask
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        return (z >> 11) / float(1 << 53)

    return [i for i in range(count) if score(i) < fraction]


held = run / "held_out.jsonl"
if held.exists():
    prompts = [json.loads(l)["prompt"][-1]["content"] for l in held.read_text().splitlines()]
else:
    cfg = (run / "config.toml").read_text()
    seed = int(next(l.split("=")[1] for l in cfg.splitlines() if l.startswith("seed")))
    frac = float(next(l.split("=")[1] for l in cfg.splitlines() if l.startswith("val_fraction")))
    data = json.load(open(".cache/sft-data/dpo_en_demo.json"))
    limit = [l.split("=")[1] for l in cfg.splitlines() if l.startswith("max_records")]
    data = data[: int(limit[0])] if limit else data
    ix = split_held_out(len(data), frac, seed)
    prompts = [data[i]["conversations"][-1]["value"] for i in ix if len(data[i]["conversations"]) == 1]
prompts = [p for p in prompts if len(p) < 300 and "\n" not in p][:n]
for prompt in prompts:
    print(f"**Prompt:** {prompt}\n")
    for adapter in [None, run / "adapter"]:
        # One chat per prompt: a fresh conversation each time.
        args = ["target/release/kiln", "--threads", "1", "chat", "--model", M, "--temperature",
                "0", "--max-new-tokens", "96"]
        if adapter:
            args += ["--adapter", str(adapter)]
        out = subprocess.run(args, input=prompt + "\n", capture_output=True, text=True)
        who = "DPO" if adapter else "base"
        print(f"- {who}: {out.stdout.strip()!r}\n")
