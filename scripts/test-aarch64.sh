#!/usr/bin/env bash
# ARM without an ARM machine: cross-compiles kiln's kernels (and their tests) for
# aarch64-unknown-linux-gnu with Debian's cross toolchain and runs the kernel tests under
# qemu-aarch64 (user-mode emulation). Installs what it needs: the apt packages
# gcc-aarch64-linux-gnu, libc6-dev-arm64-cross and qemu-user, and rustup's aarch64 standard
# library. Emulation checks correctness only; no figure measured under qemu says anything about
# speed on real ARM hardware.
#
#   scripts/test-aarch64.sh                 # kiln-kernels' tests
#   scripts/test-aarch64.sh -p kiln-gguf    # other crates, as cargo test arguments
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=aarch64-unknown-linux-gnu
need=()
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need[@]}"
fi
rustup target list --installed | grep -qx "$TARGET" || rustup target add "$TARGET"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(-p kiln-kernels)
cargo test --release --target "$TARGET" "${args[@]}"
