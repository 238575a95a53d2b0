#!/usr/bin/env bash
# Installs what fsdp-cpp needs on Debian 12, with apt-get, only when something is missing.
# Idempotent and quick when everything is there. Run as root (or with sudo available).
set -euo pipefail

PACKAGES=(
  bazel-bootstrap      # Bazel 4.2.3, builds offline with the WORKSPACE's local repositories
  g++
  libtorch-dev         # LibTorch 1.13.1 with c10d (Gloo)
  libgloo-dev          # Gloo headers for c10d's ProcessGroupGloo
  libabsl-dev
  libgtest-dev
  libgmock-dev
  libbenchmark-dev
  nlohmann-json3-dev
  libxxhash-dev
  libzstd-dev
  zlib1g-dev           # deflate for the loss-curve PNG
  libopenblas0-serial  # LibTorch's BLAS: ~10x Debian's reference libblas3 (single-threaded,
                       # so rank processes do not oversubscribe the cores)
  python3-torch        # reference oracle: /usr/bin/python3 with torch 1.13
  clang-14             # libFuzzer targets: bazel build --config=fuzz, tools/fuzz.sh
  libclang-rt-14-dev   # libFuzzer and ASan runtimes for clang-14
  iproute2             # `ip netns` for comm:multihost_failure_test
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done

if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "setup: all ${#PACKAGES[@]} packages present"
fi

# The CUDA toolkit (nccl.h, libnccl.so) is optional: only --config=cuda builds need it.
if [[ ! -f /usr/local/cuda/include/nccl.h ]]; then
  echo "setup: note: /usr/local/cuda/include/nccl.h not found; --config=cuda builds will fail"
fi
