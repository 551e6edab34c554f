#!/usr/bin/env python3
"""Fuzzes `kiln serve`'s request parser and SSE writer: N malformed or hostile requests
(invalid JSON and UTF-8, wrong types, huge numbers, enormous n / max_tokens / stop lists, deep
nesting, odd schemas and tools, oversized bodies, streams cut off by the client) against a
running server. Every answer must be a 4xx or a 200; afterwards the server must still answer,
with no sequence left running. Not part of CI (a bench-style run):

    python3 bench/serve/fuzz_serve.py --model GGUF [--kiln target/release/kiln] [--cases 100000]
"""
import argparse
import http.client
import json
import os
import random
import subprocess
import sys
import time

from bench_serve import free_port, wait_ready

ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages",
             "/v1/embeddings", "/v1/models", "/v1/nope", "/metrics"]
WEIRD = [None, True, False, 0, -1, 1, 2**31, 2**64, -2**63, 1e308, -1e308, 0.5, "", "x", "🔥" * 50,
         [], {}, [1, 2], {"a": 1}, "\u0000", "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace")]
FIELDS = ["model", "messages", "prompt", "input", "temperature", "top_p", "top_k", "min_p", "n", "max_tokens",
          "max_completion_tokens", "stop", "seed", "logprobs", "top_logprobs", "stream", "stream_options",
          "frequency_penalty", "presence_penalty", "repetition_penalty", "response_format", "tools",
          "tool_choice", "echo", "suffix", "encoding_format", "dimensions", "system", "stop_sequences",
          "max_output_tokens", "instructions", "logit_bias"]


def deep(depth):
    v = 1
    for _ in range(depth):
        v = [v] if random.random() < 0.5 else {"a": v}
    return v


def schema(depth=0):
    kinds = ["string", "number", "integer", "boolean", "null", "object", "array", "weird"]
    k = random.choice(kinds if depth < 4 else kinds[:5])
    if k == "object":
        return {"type": "object", "properties": {f"p{i}": schema(depth + 1) for i in range(random.randint(0, 4))}}
    if k == "array":
        return {"type": "array", "items": schema(depth + 1), "maxItems": random.choice([0, 1, 3, -1, "x"])}
    if k == "weird":
        return random.choice([{"pattern": "a+"}, {"anyOf": []}, {"$ref": "#/nowhere"}, {"enum": []}, [], 7,
                              {"type": ["string", "string"]}, {"oneOf": [{}]}])
    return {"type": k}


def valid(model):
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}


def case(model):
    r = random.random()
    if r < 0.08:
        return os.urandom(random.randint(0, 300))  # random bytes, mostly invalid UTF-8/JSON
    if r < 0.14:
        text = json.dumps(valid(model))
        return text[: random.randint(0, len(text) - 1)].encode()  # truncated JSON
    if r < 0.16:
        d = random.randint(100, 100_000)  # nesting deeper than any parser should follow
        return ('{"model": "m", "messages": ' + "[" * d + "1" + "]" * d + "}").encode()
    if r < 0.165:
        return b'{"model": "' + b"x" * (5 << 20) + b'"}'  # over --max-body
    body = valid(model)
    for _ in range(random.randint(1, 4)):
        f = random.choice(FIELDS)
        pick = random.random()
        if pick < 0.5:
            body[f] = random.choice(WEIRD)
        elif pick < 0.6:
            body[f] = deep(random.randint(1, 40))
        elif f == "stop":
            body[f] = ["s"] * random.choice([5, 100, 10000])
        elif f in ("n", "max_tokens", "top_logprobs", "dimensions"):
            body[f] = random.choice([10**9, 2**63 - 1, 10**30, -5, 0])
        elif f == "response_format":
            body[f] = {"type": "json_schema", "json_schema": {"schema": schema()}}
        elif f == "tools":
            body[f] = [{"type": random.choice(["function", "x"]), "function": {"name": random.choice(["f", "", 3]),
                                                                            "parameters": schema()}}]
        elif f == "messages":
            body[f] = [{"role": random.choice(["user", "tool", "robot", 5]),
                        "content": random.choice(["x", [{"type": "image_url"}], [{"type": "text"}], 9, None]),
                        "tool_calls": random.choice([None, "x", [{"function": {"name": "f", "arguments": "{bad"}}]])}
                       for _ in range(random.randint(0, 3))]
        else:
            body[f] = random.choice(WEIRD)
    if random.random() < 0.1:
        body["stream"] = True
    return json.dumps(body).encode()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--kiln", default="target/release/kiln")
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    random.seed(a.seed)
    port = free_port()
    server = subprocess.Popen([a.kiln, "serve", "--model", a.model, "--name", "m", "--port", str(port),
                               "--max-batch", "4", "--max-queue", "8", "--ctx", "512"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, server, timeout=60)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        statuses = {}
        t0 = time.time()
        for i in range(a.cases):
            body = case("m")
            path = random.choice(ENDPOINTS[:5]) if random.random() < 0.95 else random.choice(ENDPOINTS)
            method = "POST" if random.random() < 0.97 else "GET"
            try:
                try:
                    conn.request(method, path, body, {"Content-Type": "application/json"})
                    resp = conn.getresponse()
                except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                    # The server closed the kept-alive connection after the previous answer
                    # (as it does after an oversized or unread body): send again on a new one.
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                    conn.request(method, path, body, {"Content-Type": "application/json"})
                    resp = conn.getresponse()
                if random.random() < 0.05 and b'"stream": true' in body:
                    resp.read(10)  # a client that goes away mid-stream
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                else:
                    resp.read()
                    if resp.getheader("connection", "").lower() == "close":
                        conn.close()
                        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            except (http.client.HTTPException, OSError) as e:
                if server.poll() is not None:
                    print(f"case {i}: the server died ({server.returncode}) on {body[:200]!r}")
                    return 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                statuses["conn-error"] = statuses.get("conn-error", 0) + 1
                if os.environ.get("FUZZ_DEBUG"):
                    print(type(e).__name__, e, len(body), body[:80])
                continue
            statuses[resp.status] = statuses.get(resp.status, 0) + 1
            if resp.status >= 500 and resp.status != 503:
                print(f"case {i}: status {resp.status} on {body[:300]!r}")
                return 1
            if (i + 1) % 10_000 == 0:
                print(f"{i + 1} cases, {time.time() - t0:.0f} s, statuses {dict(sorted(statuses.items(), key=str))}",
                      flush=True)
        # Afterwards: alive, nothing running, and a normal request served.
        time.sleep(1)
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request("GET", "/metrics")
        metrics = c.getresponse().read().decode()
        running = [l for l in metrics.splitlines() if l.startswith("kiln_requests_running ")]
        c.request("POST", "/v1/chat/completions", json.dumps(valid("m")), {"Content-Type": "application/json"})
        final = c.getresponse()
        final.read()
        ok = server.poll() is None and running == ["kiln_requests_running 0"] and final.status == 200
        print(f"{a.cases} cases in {time.time() - t0:.0f} s: statuses {dict(sorted(statuses.items(), key=str))}; "
              f"server alive {server.poll() is None}, {running[0] if running else 'no gauge'}, "
              f"a normal request after: {final.status}")
        return 0 if ok else 1
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    sys.exit(main())
