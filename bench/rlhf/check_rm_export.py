"""Scores two answers with a kiln reward-model export in transformers, for docs/rlhf.md:

    kiln export --model runs/rm-smollm2 --format hf --out /tmp/rm-smollm2-hf
    .cache/venv-ref/bin/python bench/rlhf/check_rm_export.py /tmp/rm-smollm2-hf

and the same with `kiln reward score --model runs/rm-smollm2 --prompt ... --response ... --json`.
"""
import sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d)
m = AutoModelForSequenceClassification.from_pretrained(d, dtype=torch.float32).eval()
torch.set_num_threads(1)
for resp in ["The capital of France is Paris.", "I don't know, figure it out yourself."]:
    msgs = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": resp}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    # kiln's sequence: through the assistant's end-of-turn token (the template adds a newline after it)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    last = (ids[0] == eot).nonzero()[-1].item()
    ids = ids[:, : last + 1]
    with torch.no_grad():
        print(resp, m(input_ids=ids).logits[0, 0].item(), ids.shape[1])
