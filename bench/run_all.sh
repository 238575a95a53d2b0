#!/bin/bash
# Runs every benchmark binary of bench/ with `bazel run -c opt`, stores each one's Google
# Benchmark JSON as bench/results/<name>.json and renders bench/results/RESULTS.md,
# results.png and scale_benchmark's curves scale.png / scale.svg (bench/render_results.py,
# tools/python).
#
#   bash bench/run_all.sh
#
# Environment:
#   BAZEL_STARTUP_FLAGS  flags before the command, e.g. "--output_base=$HOME/.cache/bazel-mine"
#   BAZEL_FLAGS          extra build flags, e.g. "--jobs=2 --symlink_prefix=/"
#   BENCHMARKS           the benchmarks to run (default: all below; a missing target is skipped,
#                        so checkpoint_benchmark runs once //bench:checkpoint_benchmark exists)
#   <NAME>_ARGS          extra arguments for one benchmark, e.g.
#                        COMM_BENCHMARK_ARGS="--benchmark_min_time=1",
#                        SCALE_BENCHMARK_ARGS="--worlds=1,2,4 --iterations=1"
# Exits non-zero if a benchmark failed (the others still run and are rendered).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=bench/results
mkdir -p "$out"
read -r -a startup <<<"${BAZEL_STARTUP_FLAGS:-}"
read -r -a flags <<<"${BAZEL_FLAGS:-}"
benchmarks=${BENCHMARKS:-"optim_state_benchmark checkpoint_benchmark full_checkpoint_benchmark async_save_benchmark fsdp_step_benchmark comm_benchmark deferred_init_benchmark scale_benchmark"}
failed=()
for name in $benchmarks; do
  if ! bazel "${startup[@]}" query "//bench:$name" >/dev/null 2>&1; then
    echo "run_all: //bench:$name does not exist, skipped"
    continue
  fi
  args_var="$(echo "${name}_ARGS" | tr '[:lower:]' '[:upper:]')"
  read -r -a args <<<"${!args_var:-}"
  echo "run_all: //bench:$name ${args[*]}"
  if ! bazel "${startup[@]}" run -c opt "${flags[@]}" "//bench:$name" -- \
      --benchmark_out="$root/$out/$name.json" --benchmark_out_format=json "${args[@]}"; then
    echo "run_all: //bench:$name failed"
    failed+=("$name")
  fi
done
tools/python bench/render_results.py --out_dir "$out"
if ((${#failed[@]})); then
  echo "run_all: failed: ${failed[*]}"
  exit 1
fi
