"""lm-evaluation-harness-style scoring with transformers: the reference kiln's `kiln eval
--task` is compared with, on the same model and documents (accuracy) and the same machine
(documents/s).

Reads OLMo request files as `kiln eval` does (documents in ascending doc_id, the first
--limit, OLMo's doc_id >= 1000000 copies skipped) and scores each choice as
lm-evaluation-harness's HF backend does (`_encode_pair`: trailing context whitespace moved
into the continuation, continuation tokens cut from encode(context + continuation); inputs cut
from the left to the window; sum of the continuation's log-probabilities; acc and per-character
acc_norm; for LAMBADA greedy last-word accuracy and perplexity). One document's choices go through the model as one right-padded batch; there is no
prefix sharing (lm-evaluation-harness has none).

    .cache/venv-ref/bin/python bench/eval/hf_eval.py --model HF_DIR \
        --requests .cache/eval/hellaswag/rc_0shot/requests.jsonl.gz --limit 200 --threads 2
"""
import argparse
import gzip
import json
import math
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--requests", required=True)
p.add_argument("--limit", type=int)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
torch.set_num_threads(a.threads)

docs = {}
with gzip.open(a.requests, "rt") as f:
    for line in f:
        r = json.loads(line)
        if r["doc_id"] >= 1_000_000:
            continue
        d = docs.setdefault(r["doc_id"], {"choices": {}, "gold": r["label"]})
        d["choices"][r["idx"]] = (r["request"]["context"], r["request"]["continuation"])
ids = sorted(docs)[: a.limit]

model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
model.eval()
tok = AutoTokenizer.from_pretrained(a.model)
window = model.config.max_position_embeddings
pad = tok.pad_token_id if tok.pad_token_id is not None else 0


def encode_pair(context, continuation):
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ctx = tok(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx):]


def mean_stderr(xs):
    m = sum(xs) / len(xs)
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs))


acc, acc_norm, word_lls = [], [], []
t0 = time.time()
for i in ids:
    d = docs[i]
    choices = [d["choices"][k] for k in sorted(d["choices"])]
    items = []
    for context, continuation in choices:
        ctx, cont = encode_pair(context, continuation)
        inp = (ctx + cont)[-(window + 1):][:-1]
        items.append((inp, cont))
    width = max(len(inp) for inp, _ in items)
    batch = torch.tensor([inp + [pad] * (width - len(inp)) for inp, _ in items])
    mask = torch.tensor([[1] * len(inp) + [0] * (width - len(inp)) for inp, _ in items])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=batch, attention_mask=mask).logits.float(), -1)
    lls, greedy = [], []
    for row, (inp, cont) in enumerate(items):
        span = logp[row, len(inp) - len(cont): len(inp)]
        lls.append(span.gather(1, torch.tensor(cont)[:, None]).sum().item())
        greedy.append(bool((span.argmax(-1) == torch.tensor(cont)).all()))
    if isinstance(d["gold"], list):  # LAMBADA: one continuation, the last word
        acc.append(float(greedy[0]))
        word_lls.append(lls[0])
        continue
    best = max(range(len(lls)), key=lambda k: (lls[k], -k))
    lens = [len(c[1][1:] if c[1].startswith(" ") else c[1]) for c in choices]
    best_norm = max(range(len(lls)), key=lambda k: (lls[k] / lens[k], -k))
    acc.append(float(best == d["gold"]))
    acc_norm.append(float(best_norm == d["gold"]))
secs = time.time() - t0
m, s = mean_stderr(acc)
out = {"n": len(ids), "acc": m, "acc_stderr": s, "seconds": secs, "docs_per_s": len(ids) / secs,
       "threads": a.threads, "torch": torch.__version__}
if acc_norm:
    out["acc_norm"], out["acc_norm_stderr"] = mean_stderr(acc_norm)
else:
    out["perplexity"] = math.exp(-sum(word_lls) / len(word_lls))
print(json.dumps(out))
