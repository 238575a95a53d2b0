#!/usr/bin/env bash
# (Re)writes the seed files of the torch.save reader's fuzz targets from the torch.save files
# that checkpoint/testdata/make_torch_save_files.py makes with tools/python
# (PyTorch 2.13), valid and damaged, except those over 16 KiB (small seeds fuzz faster):
#   fuzz_corpus/torch_load/seed_*         the files themselves (//checkpoint/fuzz:torch_load_fuzz);
#   fuzz_corpus/torch_load_pickle/seed_*  each zip file's data.pkl with its storage sizes, in
#                                         torch_load_pickle_fuzz's input format.
# Regression inputs (regress_*) in the corpus directories are left alone.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=checkpoint/testdata/fuzz_corpus/torch_load
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tools/python checkpoint/testdata/make_torch_save_files.py "$tmp" >/dev/null
mkdir -p "$out"
rm -f "$out"/seed_*
for f in "$tmp"/*.pt; do
  if (($(stat -c %s "$f") <= 16384)); then cp "$f" "$out/seed_$(basename "$f")"; fi
done
echo "$(ls "$out" | wc -l) files, $(du -sk "$out" | cut -f1) KiB in $out"

out=checkpoint/testdata/fuzz_corpus/torch_load_pickle
mkdir -p "$out"
rm -f "$out"/seed_*
tools/python - "$tmp" "$out" <<'PY'
import os, struct, sys, zipfile
src, out = sys.argv[1:]
for name in sorted(os.listdir(src)):
    path = os.path.join(src, name)
    if not name.endswith(".pt") or os.path.getsize(path) > 16384 or not zipfile.is_zipfile(path):
        continue
    with zipfile.ZipFile(path) as z:
        pickles = [i for i in z.infolist() if i.filename.endswith("/data.pkl")]
        if len(pickles) != 1:
            continue
        prefix = pickles[0].filename[:-len("data.pkl")]
        sizes = []
        while prefix + "data/%d" % len(sizes) in z.namelist():
            sizes.append(z.getinfo(prefix + "data/%d" % len(sizes)).file_size)
        if len(sizes) > 32 or any(s > 0xFFFF for s in sizes):
            continue
        blob = bytes([len(sizes)]) + b"".join(struct.pack("<H", s) for s in sizes)
        with open(os.path.join(out, "seed_" + name[:-3] + ".bin"), "wb") as f:
            f.write(blob + z.read(pickles[0]))
PY
echo "$(ls "$out" | wc -l) files, $(du -sk "$out" | cut -f1) KiB in $out"
