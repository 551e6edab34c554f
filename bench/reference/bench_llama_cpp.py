#!/usr/bin/env python3
"""llama.cpp's prefill and decode tokens/s on a GGUF, measured like `kiln bench generate`.

    pip install llama-cpp-python   # builds llama.cpp from source (about 10 minutes on 2 cores)
    python3 bench/reference/bench_llama_cpp.py MODEL.gguf [--threads 2] [--prompt-tokens 128]
        [--new-tokens 64] [--runs 3] [--json]

pp: one `eval` of a prompt of N fixed token ids into an empty context; tg: N single-token evals
from a one-token prompt (what llama-bench's pp/tg tests time). Median of `--runs` after a
warm-up. Greedy sampling is not part of either measurement.
"""

import argparse
import json
import statistics
import time

from llama_cpp import Llama, __version__


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    llm = Llama(
        a.model,
        n_ctx=max(512, a.prompt_tokens + a.new_tokens + 8),
        n_batch=max(512, a.prompt_tokens),
        n_threads=a.threads,
        n_threads_batch=a.threads,
        verbose=False,
    )
    vocab = llm.n_vocab()
    ids = [1000 + (i * 7919) % (vocab - 1000) for i in range(a.prompt_tokens)]
    pp, tg = [], []
    for run in range(a.runs + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        prefill = time.perf_counter() - t0
        llm.reset()
        t0 = time.perf_counter()
        tok = ids[0]
        for _ in range(a.new_tokens):
            llm.eval([tok])
            tok = int(llm.scores[llm.n_tokens - 1].argmax())
        decode = time.perf_counter() - t0
        if run > 0:
            pp.append(a.prompt_tokens / prefill)
            tg.append(a.new_tokens / decode)
    out = {
        "impl": "llama.cpp",
        "llama_cpp_python": __version__,
        "model": a.model,
        "threads": a.threads,
        "prompt_tokens": a.prompt_tokens,
        "new_tokens": a.new_tokens,
        "prefill_tokens_per_s": statistics.median(pp),
        "decode_tokens_per_s": statistics.median(tg),
    }
    if a.json:
        print(json.dumps(out))
    else:
        print(
            f"llama.cpp (llama-cpp-python {__version__}) {a.model}, {a.threads} threads\n"
            f"  prefill pp{a.prompt_tokens}: {out['prefill_tokens_per_s']:.1f} tokens/s\n"
            f"  decode  tg{a.new_tokens}: {out['decode_tokens_per_s']:.1f} tokens/s"
        )


if __name__ == "__main__":
    main()
