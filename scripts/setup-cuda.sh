#!/usr/bin/env bash
# A CUDA 13.0 build toolchain from PyPI wheels, for `cargo build --features cuda` on a machine
# without a GPU or NVIDIA's apt repository (the binary then runs on an H100/H200 whose driver
# is CUDA 13.0). Not part of .ci/run: about 1.2 GB of wheels and 6-7 minutes of nvcc.
#
#   scripts/setup-cuda.sh [DEST]          (default .cache/cuda)
#   . .cache/cuda/env.sh && cargo build --release --features cuda --target-dir target-cuda
#
# - Wheels pinned to the CUDA 13.0 family (PTX from a newer nvcc is rejected by a 13.0 driver)
#   and checked against scripts/cuda-requirements.txt's sha256s (pip --require-hashes).
# - candle-kernels' build looks for CUDA_ROOT/lib64 and cudarc links -lcuda -lcudart -lcublas
#   -lcublasLt -lcurand -lnvrtc -lnccl: unversioned symlinks, and a link-time libcuda stub
#   (SONAME libcuda.so.1, every cu* entry point of cuda.h) since the driver library exists
#   only on the GPU machine.
# - CUDA_COMPUTE_CAP=90 (no nvidia-smi here): sm_90a, H100/H200 only.
set -euo pipefail
ROOT_DIR="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$(mkdir -p "${1:-$ROOT_DIR/.cache/cuda}" && cd "${1:-$ROOT_DIR/.cache/cuda}" && pwd)"
SITE="$DEST/site"
CUDA="$SITE/nvidia/cu13"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$CUDA/bin/nvcc" ]; then
  echo "setup-cuda: installing the CUDA 13.0 wheels into $SITE (about 1.2 GB)"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes \
    --target "$SITE" -r "$ROOT_DIR/scripts/cuda-requirements.txt"
fi
[ -x "$CUDA/bin/nvcc" ] || { echo "setup-cuda: ERROR: no nvcc at $CUDA/bin" >&2; exit 1; }

# Layout the build scripts expect.
[ -e "$CUDA/lib64" ] || ln -s lib "$CUDA/lib64"
for so in "$CUDA"/lib/lib*.so.*; do
  name="$(basename "$so")"
  case "$name" in *.alt.so*|libnvrtc-builtins*) continue ;; esac
  [ -e "$CUDA/lib/${name%%.so.*}.so" ] || ln -s "$name" "$CUDA/lib/${name%%.so.*}.so"
done
NCCL="$SITE/nvidia/nccl"
for h in "$NCCL"/include/*.h; do
  [ -e "$CUDA/include/$(basename "$h")" ] || ln -s "$h" "$CUDA/include/$(basename "$h")"
done
[ -e "$CUDA/lib/libnccl.so.2" ] || ln -s "$NCCL/lib/libnccl.so.2" "$CUDA/lib/libnccl.so.2"
[ -e "$CUDA/lib/libnccl.so" ] || ln -s libnccl.so.2 "$CUDA/lib/libnccl.so"

# The link-time driver stub: every `CUresult cu*(` declared by cuda.h (plain, internal-API
# and per-thread-stream spellings), each a function returning an error.
STUB="$CUDA/lib/stubs/libcuda.so"
if [ ! -e "$STUB" ]; then
  mkdir -p "$(dirname "$STUB")"
  work="$(mktemp -d)"
  for flags in "" "-D__CUDA_API_VERSION_INTERNAL" "-DCUDA_API_PER_THREAD_DEFAULT_STREAM"; do
    cc -E -P $flags -I "$CUDA/include" "$CUDA/include/cuda.h"
  done | tr '\n' ' ' | grep -oE 'CUresult +cu[A-Za-z0-9_]+ *\(' \
    | sed -E 's/^CUresult +//; s/ *\($//' | sort -u > "$work/symbols"
  count="$(wc -l < "$work/symbols")"
  [ "$count" -gt 300 ] || { echo "setup-cuda: ERROR: only $count driver symbols in cuda.h" >&2; exit 1; }
  sed 's/.*/int &(void) { return 999; }/' "$work/symbols" > "$work/stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB" "$work/stub.c"
  rm -rf "$work"
fi

cat > "$DEST/env.sh" <<ENV
export CUDA_ROOT="$CUDA" CUDA_HOME="$CUDA" CUDA_PATH="$CUDA" NVCC="$CUDA/bin/nvcc"
export PATH="$CUDA/bin:\$PATH" CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
export LD_LIBRARY_PATH="$CUDA/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
ENV
echo "setup-cuda: $("$CUDA/bin/nvcc" --version | tail -1); . $DEST/env.sh before cargo build --features cuda"
