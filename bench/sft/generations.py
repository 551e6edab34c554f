"""Greedy answers to held-out prompts before and after fine-tuning, side by side (markdown).

Usage (from the repository root, after bench/sft/exercise.sh):
  python3 bench/sft/generations.py --held-out runs/sft-smollm2-lora/held_out.jsonl -n 5 \
      --before "--model M" --after "--model M --adapter runs/sft-smollm2-lora/adapter"
Each answer is one `kiln chat` turn (temperature 0) with the model's chat template.
"""

import argparse
import json
import shlex
import subprocess


def answer(kiln, model_args, prompt, max_new_tokens):
    cmd = [kiln, "--threads", "2", "chat", *shlex.split(model_args), "--temperature", "0",
           "--max-new-tokens", str(max_new_tokens)]
    out = subprocess.run(cmd, input=prompt.replace("\n", " ") + "\n", capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", default="target/release/kiln")
    ap.add_argument("--held-out", required=True)
    ap.add_argument("-n", type=int, default=5)
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args()
    rows = [json.loads(l) for l in open(args.held_out) if l.strip()][: args.n]
    cell = lambda s: s.replace("|", "\\|").replace("\n", "<br>")
    print("| prompt (held out) | reference | before | after |")
    print("|---|---|---|---|")
    for r in rows:
        msgs = r["messages"]
        user = next(m["content"] for m in msgs if m["role"] == "user")
        ref = next(m["content"] for m in msgs if m["role"] == "assistant")
        b = answer(args.kiln, args.before, user, args.max_new_tokens)
        a = answer(args.kiln, args.after, user, args.max_new_tokens)
        short = lambda s, n=300: s if len(s) <= n else s[:n] + " …"
        print(f"| {cell(short(user, 160))} | {cell(short(ref))} | {cell(short(b))} | {cell(short(a))} |")


if __name__ == "__main__":
    main()
