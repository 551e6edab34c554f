#!/usr/bin/env bash
# Builds llama.cpp's llama-bench, llama-quantize, llama-simple and llama-server from the llama-cpp-python
# 0.3.36 sdist (which vendors llama.cpp 0c1e57098) into .cache/llama-cpp/bin, for the
# quantised-kernel and serving benchmarks (docs/benchmarks.md). About 10 minutes on 2 cores; a second
# run is a no-op. Needs a C/C++ compiler; cmake and ninja come from PyPI into a venv.
#
#   bench/reference/build-llama-cpp.sh          # tuned for this CPU (GGML_NATIVE), into bin/
#   bench/reference/build-llama-cpp.sh avx2     # AVX2 + FMA + F16C only, into bin-avx2/, so an
#                                               # AVX-512 machine can compare AVX2 with AVX2
set -euo pipefail
cd "$(dirname "$0")/../.."
ISA="${1:-native}"
case "$ISA" in
  native) SUFFIX=""; ISA_FLAGS=(-DGGML_NATIVE=ON) ;;
  avx2) SUFFIX="-avx2"; ISA_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON
    -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF
    -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF) ;;
  *) echo "usage: $0 [native|avx2]" >&2; exit 2 ;;
esac
DEST=.cache/llama-cpp
SDIST=llama_cpp_python-0.3.36.tar.gz
SHA=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
mkdir -p "$DEST"
BIN="$DEST/bin$SUFFIX"
BUILD="$DEST/build$SUFFIX"
if [ -x "$BIN/llama-bench" ] && [ -x "$BIN/llama-quantize" ] && [ -x "$BIN/llama-server" ]; then
  echo "llama.cpp already built in $BIN" >&2
  exit 0
fi
if [ ! -f "$DEST/$SDIST" ]; then
  python3 -m pip download --no-deps llama-cpp-python==0.3.36 -d "$DEST"
fi
echo "$SHA  $DEST/$SDIST" | sha256sum -c - >&2
[ -x "$DEST/venv/bin/cmake" ] || { python3 -m venv "$DEST/venv" && "$DEST/venv/bin/pip" install -q cmake ninja; }
if [ ! -f "$DEST/src/CMakeLists.txt" ]; then
  rm -rf "$DEST/src" && mkdir -p "$DEST/src"
  tar -xzf "$DEST/$SDIST" -C "$DEST/src" --strip-components=3 llama_cpp_python-0.3.36/vendor/llama.cpp
fi
PATH="$PWD/$DEST/venv/bin:$PATH"
# native: tuned for this CPU (AVX-512, VNNI where present), as llama.cpp users build it.
cmake -S "$DEST/src" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release "${ISA_FLAGS[@]}" \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$BUILD" --target llama-bench llama-quantize llama-simple llama-server -j "$(nproc)" >&2
mkdir -p "$BIN"
cp "$BUILD"/bin/llama-{bench,quantize,simple,server} "$BIN/"
echo "built $BIN/llama-bench, llama-quantize, llama-simple, llama-server ($ISA)" >&2
