#!/usr/bin/env bash
# Installs what fsdp-cpp needs, only what is missing, on Debian 12 or 13. Idempotent and quick
# when everything is there. Run as root (or with sudo available).
#   1. Debian packages (names that exist on both releases), with apt-get.
#   2. The project's Python environment: a venv (not in the checkout) with tools/requirements.txt
#      (torch 2.13.0, CPU build: its LibTorch is what the build links, and its FSDP the live
#      peer of the tests). Where: $FSDP_VENV, else ${XDG_CACHE_HOME:-$HOME/.cache}/fsdp-cpp/venv;
#      tools/python runs it. Made with the first Python 3.11 on PATH (the wheel's version), or
#      $FSDP_PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  bazel-bootstrap      # Bazel 4.2.3, builds offline with the WORKSPACE's local repositories
  g++
  pkg-config           # abseil's link flags (third_party/local_config.bzl)
  libgloo-dev          # Gloo headers for c10d's ProcessGroupGloo (the torch wheel ships none)
  libabsl-dev
  libgtest-dev
  libgmock-dev
  libbenchmark-dev
  nlohmann-json3-dev
  libxxhash-dev
  libzstd-dev
  zlib1g-dev           # deflate for the loss-curve PNG
  clang                # libFuzzer targets: bazel build --config=fuzz, tools/fuzz.sh
  libclang-rt-dev      # libFuzzer and ASan runtimes for that clang
  iproute2             # `ip netns` for comm:multihost_failure_test
  python3-venv         # the venv below, where the Python is Debian's
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "setup: all ${#PACKAGES[@]} Debian packages present"
fi

# The Python environment. A stamp holds the requirements it was made from: when they change,
# the venv is updated; when they match, nothing runs.
venv="${FSDP_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fsdp-cpp/venv}"
stamp="$venv/.fsdp-requirements"
if [[ -x "$venv/bin/python" ]] && cmp -s tools/requirements.txt "$stamp"; then
  echo "setup: Python environment $venv up to date"
else
  python="${FSDP_PYTHON:-}"
  if [[ -z "$python" ]]; then
    for candidate in python3.11 python3; do
      if command -v "$candidate" >/dev/null &&
         [[ $("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])') == 3.11 ]]; then
        python=$(command -v "$candidate")
        break
      fi
    done
  fi
  if [[ -z "$python" ]]; then
    echo "setup: no Python 3.11 on PATH (the torch 2.13.0 wheel is for 3.11); set FSDP_PYTHON" >&2
    exit 1
  fi
  echo "setup: making the Python environment $venv with $python"
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv"
  # --no-deps: the requirements list every package; nothing else may come in (a torch that a
  # dependency asked for could be a CUDA build of several GB).
  "$venv/bin/python" -m pip install -q --no-deps -r tools/requirements.txt
  "$venv/bin/python" -c 'import torch; assert torch.__version__.startswith("2.13.0"), torch.__version__'
  cp tools/requirements.txt "$stamp"
fi

# The CUDA toolkit (nccl.h, libnccl.so) is optional: only --config=cuda builds need it.
if [[ ! -f /usr/local/cuda/include/nccl.h ]]; then
  echo "setup: note: /usr/local/cuda/include/nccl.h not found; --config=cuda builds will fail"
fi
