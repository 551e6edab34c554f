"""Summarises bench/dist/run.sh: median tokens/s, step time and communication time per run."""
import json
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1])
print(f"| run | tokens/s | step (ms) | collectives (ms) | final loss |")
print("|---|---:|---:|---:|---:|")
base = None
for name in ["one", "ddp", "zero1", "fsdp", "fsdp-bf16"]:
    rows = [json.loads(l) for l in (out / name / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r and r["step"] > 5]
    tps = statistics.median(r["tokens_per_s"] for r in steps)
    step_ms = statistics.median(2048 / r["tokens_per_s"] * 1e3 for r in steps)
    comm = [r.get("comm_s") for r in steps if r.get("comm_s") is not None]
    comm_ms = f"{statistics.median(comm) * 1e3:,.0f}" if comm else "-"
    label = "1 process x 2 threads" if name == "one" else f"2 ranks x 1 thread, {name}"
    base = base or tps
    print(f"| {label} | {tps:,.0f} ({tps / base:.2f}x) | {step_ms:,.0f} | {comm_ms} | {steps[-1]['loss']:.4f} |")
