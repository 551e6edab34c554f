#!/usr/bin/env bash
# Installs what distributed training needs from Debian's packages: OpenMPI (mpirun, the
# library and its headers) and libclang (the `mpi` crate's bindgen reads mpi.h with it).
# Idempotent: does nothing when mpirun, mpicc and libclang are already there.
#
#   scripts/install-mpi.sh        (as root, or with sudo available)
set -euo pipefail
PKGS="openmpi-bin libopenmpi-dev libclang-dev"
have_all() {
  command -v mpirun >/dev/null && command -v mpicc >/dev/null \
    && ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1
}
if have_all; then
  echo "install-mpi: $(mpirun --version | head -1) and libclang are present"
  exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
echo "install-mpi: apt-get install $PKGS"
if ! $SUDO apt-get install -y --no-install-recommends $PKGS >/tmp/kiln-install-mpi.log 2>&1; then
  $SUDO apt-get update >>/tmp/kiln-install-mpi.log 2>&1
  $SUDO apt-get install -y --no-install-recommends $PKGS >>/tmp/kiln-install-mpi.log 2>&1 || {
    tail -20 /tmp/kiln-install-mpi.log >&2
    echo "install-mpi: ERROR: apt-get install $PKGS failed (log above)" >&2
    exit 1
  }
fi
have_all || { echo "install-mpi: ERROR: installed, but mpirun/mpicc/libclang still missing" >&2; exit 1; }
echo "install-mpi: $(mpirun --version | head -1)"
