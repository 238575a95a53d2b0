#!/usr/bin/env bash
# README command 2: set up what is missing, then build and run the whole test suite.
#   1. tools/setup.sh          (apt-get only what is missing)
#   2. bazel test //...        (every GoogleTest target, real rank processes over Gloo)
#   3. the NCCL targets under --config=cuda (built against /usr/local/cuda; their tests skip
#      without a GPU)
#   4. under CI (CI=true) also: the fast targets under AddressSanitizer
#      (tools/sanitizer_test.sh) and each libFuzzer target for FSDP_CI_FUZZ_SECONDS (default
#      30) seconds (tools/fuzz.sh, Debian's clang)
# Ends with one line "tests: N passed, N failed, N skipped" counted over every test case.
set -uo pipefail
cd "$(dirname "$0")/.."

bash tools/setup.sh || exit 1

# CI (CI=true) runs every test again rather than trusting results cached on this machine:
# Bazel does not see the system libraries, so a cached pass could hide a changed machine.
# Compiled objects still come from the disk cache.
test_flags=()
if [[ "${CI:-}" == "true" ]]; then test_flags+=(--nocache_test_results); fi

status=0
bazel test "${test_flags[@]}" //... || status=$?

if [[ -f /usr/local/cuda/include/nccl.h ]]; then
  # The configuration differs, so results of this run land under their own testlogs tree.
  bazel test "${test_flags[@]}" --config=cuda //comm:nccl_communicator_test || status=$?
fi

if [[ "${CI:-}" == "true" ]]; then
  bash tools/sanitizer_test.sh asan "${test_flags[@]}" || status=$?
  bash tools/fuzz.sh "${FSDP_CI_FUZZ_SECONDS:-30}" || status=$?
fi

tools/python tools/test_summary.py "$(bazel info bazel-testlogs 2>/dev/null)" \
  "$(bazel info --config=cuda bazel-testlogs 2>/dev/null)" || status=1
exit "$status"
