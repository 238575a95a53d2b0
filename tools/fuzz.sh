#!/usr/bin/env bash
# Runs each libFuzzer target (Bazel targets tagged "fuzz", see checkpoint/fuzz/README.md) for
# SECONDS seconds, one after the other, and fails if any of them finds a crash, a leak, an
# out-of-memory or a timeout.
#
#   bash tools/fuzz.sh [SECONDS] [//pkg:target ...]     (default: 60 s, every fuzz target)
#
# The targets are built with --config=fuzz (Debian's clang, -fsanitize=fuzzer,address) in an output
# base of their own (FSDP_FUZZ_OUTPUT_BASE, default ~/.cache/fsdp-cpp/bazel-fuzz), so the gcc
# build's analysis cache is left alone. Target //p:NAME_fuzz starts from the seeds in
# checkpoint/testdata/fuzz_corpus/NAME/ (read only) and keeps what it learns in
# FSDP_FUZZ_DIR/NAME/corpus (default ~/.cache/fsdp-cpp/fuzz); a finding is written to
# FSDP_FUZZ_DIR/NAME/artifacts/ and its reproduction command printed. Dictionary: the first of
# <package>/NAME.dict, then NAME with trailing _parts removed (torch_load_pickle -> torch_load).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true
# One output base per checkout: Bazel refuses an output base that belongs to another workspace
# (CI's fresh clone would otherwise find no targets).
workspace_id=$(pwd -P | md5sum | cut -c1-12)
output_base=${FSDP_FUZZ_OUTPUT_BASE:-$HOME/.cache/fsdp-cpp/bazel-fuzz-$workspace_id}
work=${FSDP_FUZZ_DIR:-$HOME/.cache/fsdp-cpp/fuzz}
bazel_=(bazel --output_base="$output_base")
build_flags=(--config=fuzz --symlink_prefix=/ --jobs="${FSDP_FUZZ_JOBS:-2}")

if (($# == 0)); then
  # Every package of the checkout, without the convenience symlinks bazel-*: //... would walk
  # bazel-<checkout name>/external too, whose packages do not load. Directories holding no
  # package (train_out/ of run_main.sh, ...) are left out: `//dir/...` of one fails the query.
  universe=""
  for dir in */; do
    dir=${dir%/}
    [[ "$dir" == bazel-* || -L "$dir" ]] && continue
    [[ -n $(find "$dir" \( -name BUILD.bazel -o -name BUILD \) -print -quit) ]] || continue
    universe+="${universe:+ + }//$dir/..."
  done
  query_log=$(mktemp)
  mapfile -t targets < <("${bazel_[@]}" query --noshow_progress \
    "attr(tags, '\\bfuzz\\b', kind('cc_binary', $universe))" 2>"$query_log")
else
  targets=("$@")
fi
if ((${#targets[@]} == 0)); then
  echo "fuzz: no fuzz targets found" >&2
  [[ -n "${query_log:-}" ]] && cat "$query_log" >&2
  exit 1
fi

echo "fuzz: building ${targets[*]}"
"${bazel_[@]}" build "${build_flags[@]}" "${targets[@]}"
bin=$("${bazel_[@]}" info "${build_flags[@]}" bazel-bin 2>/dev/null)

failed=()
for target in "${targets[@]}"; do
  pkg=${target#//}
  pkg=${pkg%%:*}
  binary_name=${target##*:}
  name=${binary_name%_fuzz}
  seeds=checkpoint/testdata/fuzz_corpus/$name
  corpus=$work/$name/corpus
  artifacts=$work/$name/artifacts
  mkdir -p "$corpus" "$artifacts"
  dict_flag=()
  stem=$name
  while :; do
    if [[ -f $pkg/$stem.dict ]]; then
      dict_flag=(-dict="$pkg/$stem.dict")
      break
    fi
    [[ $stem == *_* ]] || break
    stem=${stem%_*}
  done
  seed_dirs=()
  [[ -d $seeds ]] && seed_dirs=("$seeds")
  echo "fuzz: $target for ${seconds}s (seeds: ${seed_dirs[*]:-none}, corpus: $corpus)"
  # -rss_limit_mb: the whole process; -malloc_limit_mb: any one allocation (inputs are at most
  # 16 KiB, so a larger allocation means a size from the file was trusted).
  start=$(date +%s)
  if "$bin/$pkg/$binary_name" -max_total_time="$seconds" -rss_limit_mb=2048 \
      -malloc_limit_mb=256 -timeout=10 -max_len=16384 -print_final_stats=1 \
      -artifact_prefix="$artifacts/" "${dict_flag[@]}" "$corpus" "${seed_dirs[@]}" \
      >"$work/$name/log" 2>&1; then
    echo "fuzz: $target clean after $(($(date +%s) - start))s:" \
      "$(grep -E '^stat::number_of_executed_units' "$work/$name/log" | awk '{print $2}') runs"
  else
    echo "fuzz: $target FOUND A PROBLEM; last lines of $work/$name/log:" >&2
    tail -n 40 "$work/$name/log" >&2
    echo "fuzz: reproduce with: $bin/$pkg/$binary_name $artifacts/<file>" >&2
    failed+=("$target")
  fi
done

if ((${#failed[@]})); then
  echo "fuzz: failed: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: all ${#targets[@]} targets clean"
