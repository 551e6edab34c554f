#!/usr/bin/env python3
"""A load run of `kiln serve` on loopback: N streaming chat requests, C at a time, every one
must complete (no error); the server's resident memory is read after a warm-up (the first
--warm fraction of the requests, default 30%: the slots' caches and the allocator reach their
working size) and at the end, and must stay flat (growth under --max-growth, default 5%).

    python3 bench/serve/load_serve.py --model GGUF [--kiln target/release/kiln]
        [--requests 1000] [--concurrency 64] [--max-tokens 16]
"""
import argparse
import concurrent.futures
import http.client
import json
import subprocess
import sys
import time

from bench_serve import free_port, wait_ready

PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.", "Why is the sky blue?",
           "List five fruits.", "How do bees make honey?", "Explain gravity in one sentence."]


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def stream(port, i, max_tokens):
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                       "max_tokens": max_tokens, "temperature": 1.0, "seed": i, "stream": True})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        return False
    done = False
    for line in r:
        if line.strip() == b"data: [DONE]":
            done = True
    c.close()
    return done


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--kiln", default="target/release/kiln")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-growth", type=float, default=0.05)
    ap.add_argument("--warm", type=float, default=0.3)
    a = ap.parse_args()
    port = free_port()
    server = subprocess.Popen([a.kiln, "serve", "--model", a.model, "--name", "m", "--port", str(port),
                               "--max-batch", str(a.concurrency), "--max-queue", str(4 * a.concurrency),
                               "--ctx", "512"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, server, timeout=60)
        warm = max(int(a.requests * a.warm), a.concurrency)
        t0 = time.time()
        with concurrent.futures.ThreadPoolExecutor(a.concurrency) as pool:
            first = list(pool.map(lambda i: stream(port, i, a.max_tokens), range(warm)))
            rss_warm = rss_mb(server.pid)
            rest = list(pool.map(lambda i: stream(port, i, a.max_tokens), range(warm, a.requests)))
        rss_end = rss_mb(server.pid)
        ok = first + rest
        failed = ok.count(False)
        growth = (rss_end - rss_warm) / rss_warm
        print(f"{a.requests} streaming requests, {a.concurrency} at a time, in {time.time() - t0:.0f} s: "
              f"{len(ok) - failed} completed, {failed} failed; RSS {rss_warm:.0f} MB after {warm}, "
              f"{rss_end:.0f} MB after {a.requests} ({100 * growth:+.1f}%)")
        return 0 if failed == 0 and growth < a.max_growth and server.poll() is None else 1
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    sys.exit(main())
