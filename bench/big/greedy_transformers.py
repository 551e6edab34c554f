"""transformers' bf16 greedy tokens on an HF directory, for comparison with kiln's:

    python greedy_transformers.py DIR --prompt "..." [--tokens 8]

Prints one JSON line: the prompt's ids, the new ids, seconds to load, and peak RSS.
Runs the model as the reference recipe does (`torch_dtype=torch.bfloat16`), on CPU.
"""

import argparse
import json
import resource
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--tokens", type=int, default=8)
    a = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(a.dir)
    model = AutoModelForCausalLM.from_pretrained(a.dir, torch_dtype=torch.bfloat16)
    model.eval()
    load_s = time.time() - t0
    ids = tok(a.prompt, return_tensors="pt").input_ids
    t0 = time.time()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=a.tokens, do_sample=False, min_new_tokens=a.tokens)
    gen_s = time.time() - t0
    print(
        json.dumps(
            {
                "prompt_ids": ids[0].tolist(),
                "new_ids": out[0, ids.shape[1]:].tolist(),
                "load_s": round(load_s, 1),
                "generate_s": round(gen_s, 1),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
