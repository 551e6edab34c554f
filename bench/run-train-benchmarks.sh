#!/usr/bin/env bash
# The training-step benchmarks behind docs/benchmarks.md. Run on a quiet machine from the
# repository root after `cargo build --release`; each line prints one JSON object.
set -euo pipefail
K=${KILN:-target/release/kiln}
STEPS=${STEPS:-5}
# kiln (hand-written backward, caching allocator) and the PyTorch twin, back to back.
$K --threads 2 bench train --preset reference --steps "$STEPS" --json --pytorch
# What the hand-written backward saves: the same step through candle's autograd.
$K --threads 2 bench train --preset reference --steps "$STEPS" --json --autograd
# What keeping candle's element-wise ops off its spinning pool saves.
CANDLE_NUM_THREADS=2 $K --threads 2 bench train --preset reference --steps "$STEPS" --json
