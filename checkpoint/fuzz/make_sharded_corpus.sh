#!/usr/bin/env bash
# (Re)writes the seed files of the sharded checkpoint readers' fuzz targets from real sharded
# checkpoints, written by the project's own programs:
#   * examples/train (NestedModel, TestDummyModel; FSDP's flat-parameter layout) at world sizes
#     1-3, FULL_SHARD / SHARD_GRAD_OP, use_orig_params on and off, Adam / SGD / Adagrad state;
#   * tools/ckpt convert --to=sharded of full checkpoints (train's model.pt without its optim.pt:
#     no optimizer part; a 15-parameter Linear with Adam state that tools/python
#     (PyTorch 2.13) saved with torch.save) at world sizes 1-3, with 16- and 64-byte
#     checksum blocks so pieces span several blocks.
# Outputs (regress_* and cov_* files are left alone):
#   fuzz_corpus/sharded_metadata/seed_*.json  each metadata.json as written, or re-serialised
#                                            without indentation when over 16 KiB (the fuzzers'
#                                            -max_len);
#   fuzz_corpus/sharded_data/seed_*.bin      metadata.json (without indentation) and the data
#                                            files, joined by sharded_data_fuzz.cc's separator,
#                                            where the whole stays within 16 KiB.
# Builds //examples:train and //tools:ckpt with $BAZEL (default: bazel).
set -euo pipefail
cd "$(dirname "$0")/../.."
bazel_=(${BAZEL:-bazel})
"${bazel_[@]}" build --symlink_prefix=/ //examples:train //tools:ckpt >&2
bin=$("${bazel_[@]}" info bazel-bin 2>/dev/null)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

train() {  # NAME FLAGS...: a sharded checkpoint of 2 training steps in $tmp/NAME
  local name=$1
  shift
  (cd "$tmp" && "$bin/examples/train" --steps=2 --save="$tmp/$name" "$@" >/dev/null 2>&1)
}
train nested_adam_ws1 --model=nested --world_size=1 --state_dict_type=sharded
train nested_adam_ws2 --model=nested --world_size=2 --state_dict_type=sharded
train nested_adam_ws3 --model=nested --world_size=3 --state_dict_type=sharded
train nested_adam_orig_ws3 --model=nested --world_size=3 --use_orig_params --state_dict_type=sharded
train nested_sgd_ws1 --model=nested --world_size=1 --optimizer=sgd --state_dict_type=sharded
train nested_sgd_orig_ws2 --model=nested --world_size=2 --optimizer=sgd --use_orig_params \
  --state_dict_type=sharded
train nested_sgd_ws3 --model=nested --world_size=3 --optimizer=sgd --state_dict_type=sharded
train dummy_adagrad_sgo_ws2 --model=dummy --world_size=2 --optimizer=adagrad \
  --sharding_strategy=shard_grad_op --state_dict_type=sharded

# No optimizer part: train's full checkpoint without optim.pt, converted.
train nested_full --model=nested --world_size=1 --state_dict_type=full
rm "$tmp/nested_full/optim.pt"
for ws in 1 3; do
  "$bin/tools/ckpt" convert --in="$tmp/nested_full" --out="$tmp/nested_nooptim_ws$ws" \
    --to=sharded --world_size=$ws --block_bytes=64 >/dev/null
done

# A tiny model with Adam state, saved by PyTorch as FSDP's full_optim_state_dict keys it (FQNs).
mkdir -p "$tmp/tiny_full"
tools/python - "$tmp/tiny_full" <<'PY'
import sys, torch
torch.manual_seed(0)
lin = torch.nn.Linear(4, 3)
opt = torch.optim.Adam(lin.parameters(), lr=0.01)
lin(torch.randn(2, 4)).sum().backward()
opt.step()
names = {id(p): n for n, p in lin.named_parameters()}
sd = opt.state_dict()
ids = [names[id(p)] for p in lin.parameters()]
optim = {"state": {ids[k]: v for k, v in sd["state"].items()},
         "param_groups": [dict(g, params=[ids[i] for i in g["params"]]) for g in sd["param_groups"]]}
torch.save(lin.state_dict(), sys.argv[1] + "/model.pt")
torch.save(optim, sys.argv[1] + "/optim.pt")
PY
for ws in 1 2 3; do
  "$bin/tools/ckpt" convert --in="$tmp/tiny_full" --out="$tmp/tiny_adam_ws$ws" --to=sharded \
    --world_size=$ws --block_bytes=16 >/dev/null
done

tools/python - "$tmp" checkpoint/testdata/fuzz_corpus <<'PY'
import glob, json, os, re, sys
tmp, out = sys.argv[1:]
SEP = b"\n#fsdp-fuzz-data-file#\n"  # sharded_data_fuzz.cc's kSeparator
LIMIT = 16384
for sub in ("sharded_metadata", "sharded_data"):
    os.makedirs(os.path.join(out, sub), exist_ok=True)
    for f in glob.glob(os.path.join(out, sub, "seed_*")):
        os.remove(f)
for name in sorted(os.listdir(tmp)):
    path = os.path.join(tmp, name, "metadata.json")
    if not os.path.exists(path):
        continue
    text = open(path, "rb").read()
    compact = json.dumps(json.loads(text), separators=(",", ":")).encode()
    meta = text if len(text) <= LIMIT else compact
    if len(meta) <= LIMIT:
        open(os.path.join(out, "sharded_metadata", "seed_%s.json" % name), "wb").write(meta)
    n = json.loads(text)["world_size"]
    files = [open(os.path.join(tmp, name, "rank-%d-of-%d.safetensors" % (r, n)), "rb").read()
             for r in range(n)]
    blob = SEP.join([compact] + files)
    if len(blob) <= LIMIT:
        open(os.path.join(out, "sharded_data", "seed_%s.bin" % name), "wb").write(blob)
for sub in ("sharded_metadata", "sharded_data"):
    d = os.path.join(out, sub)
    print("%d files, %d bytes in %s" % (len(os.listdir(d)),
          sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)), d))
PY
