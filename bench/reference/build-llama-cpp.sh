#!/usr/bin/env bash
# Builds llama.cpp's llama-bench, llama-quantize and llama-simple from the llama-cpp-python
# 0.3.36 sdist (which vendors llama.cpp 0c1e57098) into .cache/llama-cpp/bin, for the
# quantised-kernel benchmarks (docs/benchmarks.md). About 10 minutes on 2 cores; a second
# run is a no-op. Needs a C/C++ compiler; cmake and ninja come from PyPI into a venv.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=.cache/llama-cpp
SDIST=llama_cpp_python-0.3.36.tar.gz
SHA=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
mkdir -p "$DEST"
if [ -x "$DEST/bin/llama-bench" ] && [ -x "$DEST/bin/llama-quantize" ]; then
  echo "llama.cpp already built in $DEST/bin" >&2
  exit 0
fi
if [ ! -f "$DEST/$SDIST" ]; then
  python3 -m pip download --no-deps llama-cpp-python==0.3.36 -d "$DEST"
fi
echo "$SHA  $DEST/$SDIST" | sha256sum -c - >&2
[ -x "$DEST/venv/bin/cmake" ] || { python3 -m venv "$DEST/venv" && "$DEST/venv/bin/pip" install -q cmake ninja; }
rm -rf "$DEST/src" && mkdir -p "$DEST/src"
tar -xzf "$DEST/$SDIST" -C "$DEST/src" --strip-components=3 llama_cpp_python-0.3.36/vendor/llama.cpp
PATH="$PWD/$DEST/venv/bin:$PATH"
# GGML_NATIVE: tuned for this CPU (AVX-512, VNNI), as llama.cpp users build it.
cmake -S "$DEST/src" -B "$DEST/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$DEST/build" --target llama-bench llama-quantize llama-simple -j "$(nproc)" >&2
mkdir -p "$DEST/bin"
cp "$DEST"/build/bin/llama-{bench,quantize,simple} "$DEST/bin/"
echo "built $DEST/bin/llama-bench, llama-quantize, llama-simple" >&2
