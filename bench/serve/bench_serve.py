#!/usr/bin/env python3
"""Serving throughput: `kiln serve` against llama.cpp's `llama-server`, side by side.

For each concurrency level C, each server is started with C slots (kiln `--max-batch C`,
llama-server `-np C`), the same threads and a 1,024-token context per slot, warmed up with one
request, then sent max(2C, 8) streaming chat requests (greedy, `max_tokens` N) by C clients at
once. Reported per server and level: aggregate generated tokens/s (all completion tokens over
the wall time), median and p90 time to first token, and requests that failed.

    python3 bench/serve/bench_serve.py --model GGUF [--kiln target/release/kiln]
        [--llama-server .cache/llama-cpp/bin/llama-server] [--threads 2]
        [--levels 1,4,16,64] [--max-tokens 64] [--json out.json]

Only the standard library: http.client reads the server-sent events.
"""
import argparse
import concurrent.futures
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain photosynthesis to a child.",
    "List five fruits and their colours.",
    "What is the difference between weather and climate?",
    "Give me three tips for learning to cook.",
    "Describe a cat to someone who has never seen one.",
    "Why is the sky blue?",
    "Write a haiku about autumn leaves.",
    "What does a librarian do?",
    "Summarise the story of Cinderella in three sentences.",
    "How do bees make honey?",
]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_ready(port, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become ready")


def one_request(port, model, prompt, max_tokens):
    """Streams one chat completion; returns (ttft_s, completion_tokens, ok)."""
    body = json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    })
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        r.read()
        return None, 0, False
    ttft, tokens, chunks = None, None, 0
    while True:
        line = r.readline()
        if not line:
            break
        line = line.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        for ch in chunk.get("choices", []):
            if ch.get("delta", {}).get("content"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    c.close()
    return ttft, tokens if tokens is not None else chunks, True


def run_level(port, model, level, max_tokens):
    n = max(2 * level, 8)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    one_request(port, model, "Hello", 8)  # warm-up
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(level) as pool:
        results = list(pool.map(lambda p: one_request(port, model, p, max_tokens), prompts))
    wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in results if r[0] is not None)
    tokens = sum(r[1] for r in results)
    return {
        "requests": n,
        "failed": sum(1 for r in results if not r[2]),
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "tok_per_s": round(tokens / wall, 1),
        "ttft_median_s": round(statistics.median(ttfts), 3) if ttfts else None,
        "ttft_p90_s": round(ttfts[int(0.9 * (len(ttfts) - 1))], 3) if ttfts else None,
    }


def start(kind, args, level, port):
    if kind == "kiln":
        cmd = [args.kiln, "--threads", str(args.threads), "serve", "--model", args.model,
               "--name", "m", "--port", str(port), "--max-batch", str(level),
               "--max-queue", "1024", "--ctx", str(args.ctx)]
    else:
        cmd = [args.llama_server, "-m", args.model, "--port", str(port), "-t", str(args.threads),
               "-tb", str(args.threads), "-np", str(level), "-c", str(args.ctx * level), "-cb",
               "--alias", "m", "--no-webui"]
    log = open(os.devnull, "w")
    return subprocess.Popen(cmd, stdout=log, stderr=log)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--kiln", default="target/release/kiln")
    ap.add_argument("--llama-server", default=".cache/llama-cpp/bin/llama-server")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--json")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    flags = ""
    try:
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split(":")[1]
        flags = " ".join(f for f in flags.split() if f.startswith(("avx", "fma", "f16c", "amx")))
    except (OSError, StopIteration):
        pass
    print(f"# {time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}  "
          f"{os.cpu_count()} cores  flags: {flags}")
    print(f"# model {args.model}, {args.threads} threads, greedy, max_tokens {args.max_tokens}")
    rows = []
    for level in levels:
        row = {"concurrency": level}
        for kind in ("kiln", "llama-server"):
            port = free_port()
            proc = start(kind, args, level, port)
            try:
                wait_ready(port, proc)
                row[kind] = run_level(port, "m", level, args.max_tokens)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        k, l = row["kiln"], row["llama-server"]
        row["ratio"] = round(k["tok_per_s"] / l["tok_per_s"], 2) if l["tok_per_s"] else None
        rows.append(row)
        print(f"C={level:3d}  kiln {k['tok_per_s']:7.1f} tok/s ttft {k['ttft_median_s']} s (p90 {k['ttft_p90_s']})"
              f" fail {k['failed']}  |  llama-server {l['tok_per_s']:7.1f} tok/s ttft {l['ttft_median_s']} s"
              f" (p90 {l['ttft_p90_s']}) fail {l['failed']}  |  ratio {row['ratio']}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "flags": flags, "model": args.model,
                       "threads": args.threads, "max_tokens": args.max_tokens, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
