#!/usr/bin/env bash
# (Re)writes the seed files of //checkpoint/fuzz:dcp_metadata_fuzz from the DCP directories
# that checkpoint/testdata/make_dcp_checkpoints.py writes with tools/python (PyTorch 2.13):
# the .metadata of a plain state dict, of FSDP2 model + Adam state saved from 2 ranks, and of
# the damaged copies PyTorch pickled (each refused by a check of its own).
#   fuzz_corpus/dcp_metadata/seed_<name>.metadata
# Regression inputs (regress_*) are left alone.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=checkpoint/testdata/fuzz_corpus/dcp_metadata
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tools/python checkpoint/testdata/make_dcp_checkpoints.py "$tmp" >/dev/null 2>&1
mkdir -p "$out"
rm -f "$out"/seed_*
for d in "$tmp"/*/; do
  name=$(basename "$d")
  if (($(stat -c %s "$d/.metadata") <= 16384)); then cp "$d/.metadata" "$out/seed_$name.metadata"; fi
done
echo "$(ls "$out" | wc -l) files, $(du -sk "$out" | cut -f1) KiB in $out"
