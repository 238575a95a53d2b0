"""Reads a DCP directory that our C++ writer made with PyTorch 2.13 (//checkpoint:dcp_writer_test).

  tools/python checkpoint/testdata/check_dcp_written.py DIR EXPECTED.pt

EXPECTED.pt (written by our full-checkpoint writer, read with weights_only=True) maps every
tensor FQN to its whole value. Prints, one a line:
  items <n> records_equal <k>   items whose torch.save archive has the records torch.save
                                writes in the same order, and the same data.pkl as
                                torch.save of the same value (the serialization id differs)
  mismatch <fqn> <why>          for each item that does not
  tensor <fqn> equal|differs    dcp_to_torch_save's tensor against EXPECTED.pt, bit for bit
  loaded <fqn> equal|differs    dcp.load into zero tensors of the saved shapes (planner_data's
                                nesting), against EXPECTED.pt
  value <fqn> <repr>            each non-tensor value as dcp_to_torch_save returns it
"""

import io
import os
import pickle
import sys
import tempfile
import zipfile

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.metadata import BytesStorageMetadata


def records(blob):
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        names = [i.filename for i in z.infolist()]
        return names, z.read(names[0])


def check_items(ckpt_dir, metadata):
    n = equal = 0
    for index, info in metadata.storage_data.items():
        with open(os.path.join(ckpt_dir, info.relative_path), "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        value = torch.load(io.BytesIO(blob), weights_only=True)
        ref = io.BytesIO()
        torch.save(value, ref)
        got_names, got_pkl = records(blob)
        want_names, want_pkl = records(ref.getvalue())
        n += 1
        if got_names != want_names:
            print(f"mismatch {index.fqn} records {got_names} vs {want_names}")
        elif got_pkl != want_pkl:
            print(f"mismatch {index.fqn} data.pkl {got_pkl!r} vs {want_pkl!r}")
        else:
            equal += 1
    print(f"items {n} records_equal {equal}")


def flatten(d, prefix=""):
    out = {}
    for k, v in (d.items() if isinstance(d, dict) else enumerate(d)):
        key = f"{prefix}{k}"
        if isinstance(v, dict) or (isinstance(v, list) and any(
                isinstance(x, dict) for x in v)):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def same(a, b):
    def raw(t):
        return t.contiguous().reshape(-1).view(torch.uint8)
    return (a.dtype == b.dtype and a.shape == b.shape
            and (a.numel() == 0 or torch.equal(raw(a), raw(b))))


def main():
    ckpt_dir, expected_path = sys.argv[1], sys.argv[2]
    expected = torch.load(expected_path, weights_only=True)
    metadata = dcp.FileSystemReader(ckpt_dir).read_metadata()
    check_items(ckpt_dir, metadata)

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "full.pt")
        dcp_to_torch_save(ckpt_dir, out)
        full = flatten(torch.load(out, weights_only=True))
    for fqn in sorted(full):
        v = full[fqn]
        if isinstance(v, torch.Tensor):
            print(f"tensor {fqn} {'equal' if same(v, expected[fqn]) else 'differs'}")
        else:
            print(f"value {fqn} {v!r}")

    # dcp.load into zero tensors nested as planner_data says (DefaultLoadPlanner reads the
    # overlapping chunks of each).
    state = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            continue
        node = state
        path = metadata.planner_data[fqn]
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = torch.zeros(md.size, dtype=md.properties.dtype)
    dcp.load(state, checkpoint_id=ckpt_dir, no_dist=True)
    for fqn, v in sorted(flatten(state).items()):
        print(f"loaded {fqn} {'equal' if same(v, expected[fqn]) else 'differs'}")


if __name__ == "__main__":
    main()
