#!/usr/bin/env bash
# Throughput of distributed training on this machine: the reference config (bench/dist/
# reference.toml) trained 20 steps by one process x 2 threads, then by `mpirun -np 2` x 1
# thread with each strategy (and FSDP with bf16 compute parameters); prints median tokens/s, step time and rank 0's time in
# collectives over steps 6-20 (bench/dist/summarize.py). Run after `cargo build --release`
# and scripts/install-mpi.sh, on an otherwise idle machine.
set -euo pipefail
K=${KILN:-target/release/kiln}
OUT=runs/dist-bench
CFG=bench/dist/reference.toml
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
rm -rf "$OUT" && mkdir -p "$OUT"
$K --threads 2 pretrain --config $CFG --set train.run_dir=$OUT/one > $OUT/one.log 2>&1
for s in ddp zero1 fsdp; do
    mpirun -np 2 --bind-to none $K --threads 1 pretrain --config $CFG \
        --set train.run_dir=$OUT/$s --set dist.strategy=$s > $OUT/$s.log 2>&1
done
mpirun -np 2 --bind-to none $K --threads 1 pretrain --config $CFG \
    --set train.run_dir=$OUT/fsdp-bf16 --set dist.strategy=fsdp --set dist.param_dtype=bf16 \
    > $OUT/fsdp-bf16.log 2>&1
python3 bench/dist/summarize.py $OUT
