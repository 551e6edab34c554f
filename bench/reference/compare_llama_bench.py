#!/usr/bin/env python3
"""kiln vs llama.cpp's own llama-bench on the GGUF types people download (docs/benchmarks.md).

    cargo build --release && scripts/fetch-test-assets.sh && bench/reference/build-llama-cpp.sh
    python3 bench/reference/compare_llama_bench.py [--threads 2] [--rounds 3] [--batches 1,4,16]
    python3 bench/reference/compare_llama_bench.py --models A.gguf,B.gguf    (any files, as they are)
    python3 bench/reference/compare_llama_bench.py --isa avx2    (after build-llama-cpp.sh avx2)
    python3 bench/reference/compare_llama_bench.py --activations f32,q8    (kiln exact and 8-bit)

`--isa avx2` compares AVX2 with AVX2 on any x86 machine: kiln runs with `--isa avx2` and
llama.cpp is the build without AVX-512 (`build-llama-cpp.sh avx2`, into bin-avx2/).

Runs the shipped SmolLM2-135M-Instruct Q4_1 and makes from it, into .cache/bench/: Q4_K_M with
llama.cpp's `llama-quantize --allow-requantize` (what the issue measured), Q8_0 and F16 with
`kiln export`, and kiln's own Q4_K_M (`kiln export --type q4_k_m`, from the dequantised
weights). For each file it alternates `kiln bench generate --json` and `llama-bench -p N -n M
-t T -o json` `--rounds` times, so both see the same machine load, and keeps each side's best
round. Then kiln's batched decoding on Q4_K_M. Prints markdown tables.

Decode reads (about) every weight once per token, so each decode figure is also shown as the
bytes it moves per second (file size x tokens/s) and as a fraction of the read bandwidth
`kiln bench memory` measures with the same threads (a plain summing loop: a floor of what the
memory gives, so a fraction can pass 1).
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
KILN = os.path.join(ROOT, "target", "release", "kiln")
LLAMA_BIN = os.path.join(ROOT, ".cache", "llama-cpp", "bin")
ASSETS = os.environ.get("KILN_ASSETS", os.path.join(ROOT, ".cache", "assets"))
Q4_1 = os.path.join(ASSETS, "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def run_json(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1] if out.lstrip().startswith("{") else out)


def llama_bin(a):
    return LLAMA_BIN + ("-avx2" if a.isa == "avx2" else "")


def llama_bench(path, a):
    runs = run_json([os.path.join(llama_bin(a), "llama-bench"), "-m", path, "-p", str(a.prompt_tokens),
                     "-n", str(a.new_tokens), "-t", str(a.threads), "-o", "json"])
    pp = next(r["avg_ts"] for r in runs if r["n_prompt"] > 0 and r["n_gen"] == 0)
    tg = next(r["avg_ts"] for r in runs if r["n_gen"] > 0 and r["n_prompt"] == 0)
    return {"pp": pp, "tg": tg}


def kiln_bench(path, a, batch=1, activations="f32"):
    r = run_json([KILN, "--threads", str(a.threads), "--isa", a.isa, "--activations", activations,
                  "bench", "generate", "--model", path, "--json",
                  "--prompt-tokens", str(a.prompt_tokens), "--new-tokens", str(a.new_tokens),
                  "--batch", str(batch)])
    return {"pp": r["prefill_tokens_per_s"], "tg": r["decode_tokens_per_s"], "weights": r.get("weights"),
            "isa": r.get("isa"), "cpu_features": r.get("cpu_features")}


def make_files(cache):
    files = {}
    q4km = os.path.join(cache, "smollm2-q4_k_m-llama.gguf")
    if not os.path.exists(q4km):
        subprocess.run([os.path.join(LLAMA_BIN, "llama-quantize"), "--allow-requantize", Q4_1, q4km,
                        "Q4_K_M", "2"], check=True, capture_output=True)
    files["Q4_1 (as shipped)"] = Q4_1
    files["Q4_K_M (llama-quantize)"] = q4km
    for t, name in [("q4_k_m", "Q4_K_M (kiln export)"), ("q8_0", "Q8_0"), ("f16", "F16")]:
        p = os.path.join(cache, f"smollm2-{t}.gguf")
        if not os.path.exists(p):
            subprocess.run([KILN, "export", "--model", Q4_1, "--format", "gguf", "--type", t, "--out", p],
                           check=True, capture_output=True)
        files[name] = p
    return files


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--isa", default="auto", choices=["auto", "avx2"],
                    help="avx2: kiln forced to AVX2 against llama.cpp built without AVX-512")
    ap.add_argument("--activations", default="f32",
                    help="comma-separated kiln activation modes, one table row each: f32 (exact) and/or q8 "
                         "(8-bit activations with integer dot products, llama.cpp's arithmetic)")
    ap.add_argument("--only", default="", help="comma-separated substrings of the file names to run")
    ap.add_argument("--models", default="",
                    help="comma-separated GGUF files to compare as they are, instead of the SmolLM2 set")
    a = ap.parse_args()
    cache = os.path.join(ROOT, ".cache", "bench")
    os.makedirs(cache, exist_ok=True)
    if a.models:
        files = {os.path.basename(p): p for p in a.models.split(",")}
    else:
        files = make_files(cache)
    if a.only:
        files = {k: v for k, v in files.items() if any(s in k for s in a.only.split(","))}
    probe = kiln_bench(next(iter(files.values())), argparse.Namespace(**{**vars(a), "new_tokens": 1,
                                                                         "prompt_tokens": 16}))
    features = " ".join(probe["cpu_features"] or [])
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} CPUs ({features}), {a.threads} threads, pp{a.prompt_tokens} / tg{a.new_tokens}, "
          f"best of {a.rounds} alternated rounds; kiln kernels {probe['isa']}, llama.cpp from "
          f"{os.path.relpath(llama_bin(a), ROOT)}\n")
    bandwidth = run_json([KILN, "--threads", str(a.threads), "bench", "memory", "--json"])["read_gb_per_s"]
    print(f"read bandwidth (`kiln bench memory`, {a.threads} threads): {bandwidth:.1f} GB/s\n")
    modes = a.activations.split(",")
    print("| file | kiln activations | kiln prefill | llama.cpp prefill | ratio | kiln decode | llama.cpp decode "
          "| ratio | decode GB/s kiln / llama.cpp (fraction of bandwidth) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    q4km = None
    for name, path in files.items():
        best = {side: {"pp": 0, "tg": 0} for side in modes + ["llama.cpp"]}
        for _ in range(a.rounds):
            runs = [(m, kiln_bench(path, a, activations=m)) for m in modes]
            for side, r in runs + [("llama.cpp", llama_bench(path, a))]:
                best[side] = {k: max(best[side][k], r[k]) for k in ("pp", "tg")}
        l = best["llama.cpp"]
        gb = os.path.getsize(path) / 1e9
        for m in modes:
            k = best[m]
            moved = (f"{k['tg'] * gb:.1f} / {l['tg'] * gb:.1f} "
                     f"({k['tg'] * gb / bandwidth:.2f} / {l['tg'] * gb / bandwidth:.2f})")
            print(f"| {name} | {m} | {k['pp']:.0f} | {l['pp']:.0f} | {k['pp'] / l['pp']:.2f} | {k['tg']:.0f} | "
                  f"{l['tg']:.0f} | {k['tg'] / l['tg']:.2f} | {moved} |", flush=True)
        if name.startswith("Q4_K_M (llama"):
            q4km = (path, l["tg"])
    if q4km and a.batches:
        print(f"\nkiln batched decoding on Q4_K_M (llama-quantize), {modes[-1]} activations, "
              "aggregate tokens/s:\n")
        print("| batch | decode tokens/s | vs batch 1 |")
        print("|---:|---:|---:|")
        base = None
        for b in [int(x) for x in a.batches.split(",")]:
            tg = max(kiln_bench(q4km[0], a, b, modes[-1])["tg"] for _ in range(a.rounds))
            base = base or tg
            print(f"| {b} | {tg:.0f} | {tg / base:.2f}x |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
