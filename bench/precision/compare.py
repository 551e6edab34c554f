"""Compare two runs' curves (f32 and bf16 mixed precision): train loss at every logged step
both reached, validation loss at every evaluation both reached.

Usage: python3 bench/precision/compare.py runs/10m-2000-f32 runs/10m-2000-bf16
"""

import json
import sys


def rows(run):
    with open(f"{run}/metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def by_step(rs, key):
    return {r["step"]: r[key] for r in rs if r.get(key) is not None}


def main():
    a_dir, b_dir = sys.argv[1], sys.argv[2]
    a, b = rows(a_dir), rows(b_dir)
    for key in ["loss", "val_loss"]:
        x, y = by_step(a, key), by_step(b, key)
        common = sorted(set(x) & set(y))
        if not common:
            print(f"{key}: no step in common")
            continue
        gaps = [y[s] - x[s] for s in common]
        print(f"{key}: {len(common)} steps in common (up to {common[-1]}); "
              f"mean |gap| {sum(map(abs, gaps)) / len(gaps):.4f}, max |gap| {max(map(abs, gaps)):.4f}, "
              f"mean signed gap {sum(gaps) / len(gaps):+.4f}; at step {common[-1]}: "
              f"{x[common[-1]]:.4f} vs {y[common[-1]]:.4f}")
        if key == "val_loss":
            for s in common:
                print(f"  step {s}: {x[s]:.4f} vs {y[s]:.4f}")
    for run, rs in [(a_dir, a), (b_dir, b)]:
        tps = sorted(r["tokens_per_s"] for r in rs if r.get("tokens_per_s"))
        if tps:
            print(f"{run}: median tokens/s {tps[len(tps) // 2]:.0f} over {len(tps)} logged steps")


if __name__ == "__main__":
    main()
