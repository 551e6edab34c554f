#!/usr/bin/env python3
"""kiln vs llama.cpp generation speed on SmolLM2-135M, side by side (docs/pretrained.md).

    cargo build --release && scripts/fetch-test-assets.sh
    python3 bench/reference/compare_generate.py [--threads 2] [--rounds 3]

Makes the requantised Q8_0 and F16 files with `kiln export` (into .cache/bench/), then for
each file alternates `kiln bench generate --json` and bench_llama_cpp.py `--rounds` times (so
both see the same machine load) and keeps each side's best round. Also times kiln's dense f32
model (`--weights f32`). Prints a markdown table.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
KILN = os.path.join(ROOT, "target", "release", "kiln")
ASSETS = os.environ.get("KILN_ASSETS", os.path.join(ROOT, ".cache", "assets"))
Q4_1 = os.path.join(ASSETS, "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def run_json(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    a = ap.parse_args()
    cache = os.path.join(ROOT, ".cache", "bench")
    os.makedirs(cache, exist_ok=True)
    files = {"Q4_1 (as shipped)": Q4_1}
    for t in ["q8_0", "f16"]:
        p = os.path.join(cache, f"smollm2-{t}.gguf")
        if not os.path.exists(p):
            subprocess.run([KILN, "export", "--model", Q4_1, "--format", "gguf", "--type", t, "--out", p], check=True)
        files[f"{t.upper()} (requantised)"] = p
    sizes = ["--prompt-tokens", str(a.prompt_tokens), "--new-tokens", str(a.new_tokens)]
    rows = []
    for name, path in files.items():
        best = {"kiln": None, "llama.cpp": None}
        for _ in range(a.rounds):
            k = run_json([KILN, "--threads", str(a.threads), "bench", "generate", "--model", path, "--json", *sizes])
            l = run_json([sys.executable, os.path.join(ROOT, "bench", "reference", "bench_llama_cpp.py"), path,
                          "--threads", str(a.threads), "--json", *sizes])
            for key, r in (("kiln", k), ("llama.cpp", l)):
                b = best[key]
                best[key] = {
                    "pp": max(r["prefill_tokens_per_s"], b["pp"] if b else 0),
                    "tg": max(r["decode_tokens_per_s"], b["tg"] if b else 0),
                }
        rows.append((name, best))
        print(name, json.dumps(best), file=sys.stderr)
    dense = None
    for _ in range(a.rounds):
        r = run_json([KILN, "--threads", str(a.threads), "bench", "generate", "--model", Q4_1, "--weights", "f32", "--json", *sizes])
        dense = max(dense or (0, 0), (r["prefill_tokens_per_s"], r["decode_tokens_per_s"]), key=lambda x: x[1])
    print(f"| weights | kiln prefill | llama.cpp prefill | ratio | kiln decode | llama.cpp decode | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, b in rows:
        k, l = b["kiln"], b["llama.cpp"]
        print(f"| {name} | {k['pp']:.0f} | {l['pp']:.0f} | {k['pp'] / l['pp']:.2f} | {k['tg']:.0f} | {l['tg']:.0f} | {k['tg'] / l['tg']:.2f} |")
    print(f"| f32 (dequantised, kiln's training model) | {dense[0]:.0f} | | | {dense[1]:.0f} | | |")


if __name__ == "__main__":
    main()
