#!/usr/bin/env bash
# README command 1: set up what is missing, then run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec bazel run -c opt //examples:train -- "$@"
