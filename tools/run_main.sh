#!/usr/bin/env bash
# README command 1: set up what is missing, then run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
# --demo: train the character LM on 2 ranks, save a sharded checkpoint halfway, resume it on 3
# ranks with another wrapping, compare the losses and draw train_out/loss_curve.png.
exec bazel run -c opt //examples:train -- --demo "$@"
