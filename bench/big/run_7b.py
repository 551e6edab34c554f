#!/usr/bin/env python3
"""Issue 26's 7B runs on this machine, each stage resumable (results kept in --out):

    .cache/venv-ref/bin/python bench/big/make_mistral7b.py .cache/big/mistral-7b-shape
    .cache/venv-ref/bin/python bench/big/run_7b.py [--stages generate,greedy,llama_cpp]

- generate: `kiln generate --temperature 0.7 --top-p 0.9` on the bf16 directory as stored and
  with `--quantize q8_0`: peak RSS (from /usr/bin/time), load seconds, time to first token
  (load + prefill) and decode tokens/s;
- greedy: kiln's first 8 greedy tokens against transformers' bf16 greedy
  (`greedy_transformers.py`, run in its own process after kiln's);
- llama_cpp: llama.cpp's `convert_hf_to_gguf.py` (from the llama-cpp-python 0.3.36 sdist) to
  a bf16 GGUF and to Q8_0, `llama-bench -p 128 -n 32`, against `kiln bench generate` on the
  same GGUF and on the HF directory; each GGUF is deleted after use (disk);
- sft: one LoRA r16 step (batch 1 x 512 tokens, activation checkpointing) with the base frozen
  in bf16 as stored (two steps run; the second is the step time);
- qlora: `kiln export --type q4_k_m` (streamed, its peak RSS recorded), then the same step
  with `--base-quantized` on that file;
- peft: PyTorch + PEFT on the same shape (`peft_step.py`, bf16 base, gradient checkpointing).
"""

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
KILN = os.path.join(ROOT, "target", "release", "kiln")
PY = os.path.join(ROOT, ".cache", "venv-ref", "bin", "python")
LLAMA = os.path.join(ROOT, ".cache", "llama-cpp")
PROMPT = "The capital of France is"


def sh(cmd, **kw):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def timed(cmd):
    """Runs cmd under /usr/bin/time; returns (stdout, stderr, peak RSS in MB)."""
    r = sh(["/usr/bin/time", "-f", "PEAK_RSS_KB=%M"] + cmd)
    peak = int(re.search(r"PEAK_RSS_KB=(\d+)", r.stderr).group(1))
    return r.stdout, r.stderr, peak / 1024


def log_field(text, key):
    m = re.search(key + r'="?([0-9.]+)', text)
    return float(m.group(1)) if m else None


def stage_generate(a, res):
    for name, extra in [("bf16", []), ("q8_0", ["--quantize", "q8_0"])]:
        key = f"generate_{name}"
        if key in res:
            continue
        _, err, peak = timed([KILN, "generate", "--model", a.model, "--prompt", PROMPT, "--max-new-tokens",
                              "32", "--temperature", "0.7", "--top-p", "0.9", "--seed", "1"] + extra)
        load, prefill = log_field(err, "secs"), log_field(err, "prefill_s")
        res[key] = {
            "peak_rss_mb": round(peak),
            "load_s": load,
            "first_token_s": round(load + prefill, 2),
            "prefill_tok_per_s": log_field(err, "prefill_tok_per_s"),
            "decode_tok_per_s": log_field(err, "decode_tok_per_s"),
            "weights": re.search(r'weights="(.*?)" context', err).group(1).replace('\\"', '"'),
        }
        save(a, res)


def stage_greedy(a, res):
    if "greedy" in res:
        return
    prompt_file = os.path.join(a.work, "prompt.txt")
    with open(prompt_file, "w") as f:
        f.write(PROMPT + "\n")
    out, _, _ = timed([KILN, "generate", "--model", a.model, "--prompt-file", prompt_file,
                       "--max-new-tokens", "8", "--temperature", "0"])
    kiln = json.loads(out.splitlines()[0])["tokens"]
    out, _, _ = timed([PY, os.path.join(ROOT, "bench", "big", "greedy_transformers.py"), a.model,
                       "--prompt", PROMPT, "--tokens", "8"])
    hf = json.loads(out.strip().splitlines()[-1])
    res["greedy"] = {"kiln": kiln, "transformers": hf["new_ids"], "equal": kiln == hf["new_ids"],
                     "transformers_peak_rss_mb": hf["peak_rss_mb"],
                     "transformers_generate_s": hf["generate_s"]}
    save(a, res)


def llama_bench(gguf, a):
    r = sh([os.path.join(LLAMA, "bin", "llama-bench"), "-m", gguf, "-p", "128", "-n", "32", "-t",
            str(a.threads), "-r", str(a.reps), "-o", "json"])
    runs = json.loads(r.stdout)
    pp = next(x["avg_ts"] for x in runs if x["n_prompt"] > 0 and x["n_gen"] == 0)
    tg = next(x["avg_ts"] for x in runs if x["n_gen"] > 0 and x["n_prompt"] == 0)
    return {"pp128": round(pp, 2), "tg32": round(tg, 2)}


def kiln_bench(model, a, weights="native"):
    r = sh([KILN, "--threads", str(a.threads), "bench", "generate", "--model", model, "--weights",
            weights, "--json", "--prompt-tokens", "128", "--new-tokens", "32", "--runs", str(a.reps)])
    j = json.loads(r.stdout.strip().splitlines()[-1])
    return {"pp128": round(j["prefill_tokens_per_s"], 2), "tg32": round(j["decode_tokens_per_s"], 2),
            "weights": j.get("weights")}


def stage_llama_cpp(a, res):
    convert = os.path.join(LLAMA, "src", "convert_hf_to_gguf.py")
    for outtype, kiln_weights in [("bf16", "native"), ("q8_0", "q8_0")]:
        key = f"llama_cpp_{outtype}"
        if key in res:
            continue
        gguf = os.path.join(a.work, f"mistral-7b-shape-{outtype}.gguf")
        if not os.path.exists(gguf):
            sh([PY, convert, a.model, "--outtype", outtype, "--outfile", gguf])
        entry = {"llama_bench": llama_bench(gguf, a), "kiln_gguf": kiln_bench(gguf, a),
                 "kiln_hf_dir": kiln_bench(a.model, a, kiln_weights)}
        os.remove(gguf)
        res[key] = entry
        save(a, res)


SFT_SETTINGS = ["--lora-rank", "16", "--set", "train.batch_size=1", "--set", "train.seq_len=512",
                "--set", "train.steps=2", "--set", "sft.val_fraction=0", "--set", "train.log_every=1",
                "--set", "train.activation_checkpointing=true"]


def kiln_sft_step(a, model, run, extra=()):
    data = os.path.join(ROOT, ".cache", "sft-data", "alpaca_en_demo.json")
    _, _, peak = timed([KILN, "sft", "--model", model, "--data", data, "--out", run, "--overwrite"]
                       + SFT_SETTINGS + list(extra))
    rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if '"grad_norm"' in l]
    times = [round(512 / r["tokens_per_s"], 1) for r in rows]  # one 512-token row per step
    return {"peak_rss_mb": round(peak), "rows": rows, "step_times": times}


def stage_sft(a, res):
    if "sft_bf16" not in res:
        res["sft_bf16"] = kiln_sft_step(a, a.model, os.path.join(a.work, "sft7b"))
        save(a, res)


def stage_qlora(a, res):
    if "qlora_q4_k_m" in res:
        return
    gguf = os.path.join(a.work, "mistral-7b-shape-q4_k_m.gguf")
    _, err, peak = timed([KILN, "export", "--model", a.model, "--format", "gguf", "--type", "q4_k_m",
                          "--out", gguf])
    entry = {"export_peak_rss_mb": round(peak), "gguf_bytes": os.path.getsize(gguf)}
    entry.update(kiln_sft_step(a, gguf, os.path.join(a.work, "qlora7b"), ["--base-quantized"]))
    res["qlora_q4_k_m"] = entry
    save(a, res)


def stage_peft(a, res):
    if "peft_bf16" in res:
        return
    out, _, peak = timed([PY, os.path.join(ROOT, "bench", "big", "peft_step.py"), a.model,
                          "--rank", "16", "--tokens", "512", "--steps", "2"])
    r = json.loads(out.strip().splitlines()[-1])
    r["peak_rss_mb_time"] = round(peak)
    res["peft_bf16"] = r
    save(a, res)


def save(a, res):
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res), file=sys.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, ".cache", "big", "mistral-7b-shape"))
    ap.add_argument("--work", default=os.path.join(ROOT, ".cache", "big"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "big", "mistral-7b-shape.json"))
    ap.add_argument("--stages", default="generate,greedy,llama_cpp")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    res = json.load(open(a.out)) if os.path.exists(a.out) else {}
    cpu = open("/proc/cpuinfo").read()
    flags = sorted({f for f in re.search(r"flags\s*:(.*)", cpu).group(1).split()
                    if f.startswith(("avx", "fma", "f16c"))})
    res.setdefault("machine", {"date": datetime.date.today().isoformat(), "cpu_flags": flags,
                               "cores": os.cpu_count(), "platform": platform.platform()})
    for stage in a.stages.split(","):
        globals()[f"stage_{stage}"](a, res)


if __name__ == "__main__":
    main()
