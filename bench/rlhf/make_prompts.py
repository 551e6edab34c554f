"""Prompts for the PPO/GRPO demonstrations: the instructions of LLaMA-Factory's
alpaca_en_demo.json (fetched by scripts/fetch-sft-data.sh) as {"prompt": ...} JSONL.

    python3 bench/rlhf/make_prompts.py .cache/sft-data/alpaca_en_demo.json > .cache/rlhf/prompts.jsonl
"""
import json
import sys

for r in json.load(open(sys.argv[1])):
    text = r["instruction"] if not r.get("input") else r["instruction"] + "\n" + r["input"]
    if len(text) < 400:
        print(json.dumps({"prompt": text}))
