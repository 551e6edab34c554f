#!/usr/bin/env python3
"""Greedy tokens and log-probs of kiln's unmerged LoRA adapter against transformers + PEFT.

    check_lora_peft.py --base HF_DIR --adapter PEFT_DIR --kiln KILN.jsonl [--tol 1e-3]

KILN.jsonl is `kiln generate --prompt-file` output (prompt, tokens, logprobs). The base loads in
float32 with eager attention, the adapter with peft.PeftModel.from_pretrained; each prompt is
tokenized as kiln did (its ids are recomputed by the HF tokenizer of the base directory, which
kiln wrote) and kiln's tokens are fed one by one: the log-prob of each and the argmax must agree.
Exits 1 on a greedy disagreement or a log-prob difference above --tol.
"""

import argparse
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--kiln", required=True)
    ap.add_argument("--tol", type=float, default=1e-3)
    a = ap.parse_args()
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(a.base)
    base = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, a.adapter).eval()
    worst, bad = 0.0, 0
    for line in open(a.kiln):
        row = json.loads(line)
        ids = tok(row["prompt"], add_special_tokens=True)["input_ids"]
        full = torch.tensor([ids + row["tokens"]])
        with torch.no_grad():
            logits = model(full).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        for i, (t, klp) in enumerate(zip(row["tokens"], row["logprobs"])):
            pos = len(ids) - 1 + i
            ref = lp[pos, t].item()
            worst = max(worst, abs(ref - klp))
            if int(lp[pos].argmax()) != t:
                bad += 1
        print(f"{row['prompt']!r}: {row['text']!r}")
    print(f"max |log-prob difference| {worst:.2e}, greedy disagreements {bad}")
    sys.exit(1 if bad or worst > a.tol else 0)


if __name__ == "__main__":
    main()
