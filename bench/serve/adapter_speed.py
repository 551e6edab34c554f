#!/usr/bin/env python3
"""Decode speed of a served LoRA adapter against the base, on one `kiln serve`:
requests for the base model and for the adapter (greedy, 160 tokens), one stream and 8 at once
(all base, all adapter, half and half in one batch). Reports completion tokens/s.

    python3 bench/serve/adapter_speed.py --model GGUF --adapter DIR [--kiln target/release/kiln]
"""
import argparse
import concurrent.futures
import http.client
import json
import subprocess
import sys
import time

from bench_serve import free_port, wait_ready

PROMPTS = ["Write a long story about a dragon.", "Explain how computers work in detail.",
           "Describe the history of Rome."]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--kiln", default="target/release/kiln")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    port = free_port()
    server = subprocess.Popen([a.kiln, "serve", "--model", a.model, "--name", "base", "--adapter",
                               f"lora={a.adapter}", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def run(model, prompt):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": 160, "temperature": 0})
        t0 = time.perf_counter()
        c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = json.loads(c.getresponse().read())
        return r["usage"]["completion_tokens"], time.perf_counter() - t0

    def batch(models):
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(8) as p:
            res = list(p.map(lambda i: run(models[i % len(models)], PROMPTS[i % 3]), range(8)))
        return sum(r[0] for r in res) / (time.perf_counter() - t0)

    try:
        wait_ready(port, server, timeout=60)
        run("base", PROMPTS[0])
        run("lora", PROMPTS[0])
        for rnd in range(a.rounds):
            for model in ["base", "lora"]:
                res = [run(model, p) for p in PROMPTS]
                print(f"round {rnd} {model}: one stream {sum(r[0] for r in res) / sum(r[1] for r in res):.1f} tokens/s")
            print(f"round {rnd}: 8 streams all base {batch(['base']):.1f}, all adapter {batch(['lora']):.1f}, "
                  f"mixed {batch(['base', 'lora']):.1f} tokens/s", flush=True)
    finally:
        server.terminate()
        server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
