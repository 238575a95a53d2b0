"""Writes torch.distributed.checkpoint (DCP) directories with PyTorch 2.13 for
//checkpoint:dcp_reader_test, each with the values a reader must find beside it.

  tools/python checkpoint/testdata/make_dcp_checkpoints.py OUT [--single_process]

OUT/plain: dcp.save (single process, no_dist) of a state dict with tensors of several dtypes
  and shapes, scalar tensors, non-tensor values (int, float, str, list, tuple, None, bool) and
  nested dicts.
OUT/fsdp2: FSDP2 (fully_shard, 2 ranks under torchrun, CPU/Gloo) of a small model with uneven
  row counts, Adam after one step, saved as torchtitan lays it out: {"model": model state dict,
  "optimizer": optimizer state dict} from get_state_dict.

Beside each directory, DIR.expected.pt (torch.save, which our torch_load reads): a dict
{"values": {fqn: value}, "raw": {fqn: bytes}}, the values being the state dict flattened by
DCP's own flatten_state_dict (the FQNs .metadata holds), whole tensors gathered for FSDP2;
"raw" holds every bytes entry's stored bytes as FileSystemReader would hand them over (its
storage_data's file slice). DIR.globals.txt lists the globals the .metadata pickle names (a
pickle.Unpickler's find_class calls), one "module.name" a line.

OUT/tutorial: dcp.save (single process) of a small model and Adam with two parameter groups as the
  DCP tutorial lays them out: {"app": AppState}, whose state_dict() is {"model": ..., "optim": ...}
  from get_state_dict.

OUT/damaged_<what>: copies of OUT/plain whose .metadata PyTorch pickled after one change:
  storage_offset   the storage of "f32" starts beyond its file's end;
  chunk_outside    "f32"'s one chunk is 7 x 7 in a 5 x 7 tensor (size and chunk sizes changed);
  dtype            "f32" recorded as float64;
  shape            "f32" recorded as 7 x 5 (its chunk too), the stored tensor being 5 x 7;
  missing_file     every storage entry names __9_0.distcp, which does not exist;
  hostile          planner_data holds an object whose pickle calls os.system.
"""

import io
import os
import pickle
import subprocess
import sys

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._nested_dict import flatten_state_dict


def record_globals(ckpt_dir):
    names = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            names.add(f"{module}.{name}")
            return super().find_class(module, name)

    with open(os.path.join(ckpt_dir, ".metadata"), "rb") as f:
        metadata = Recorder(f).load()
    with open(ckpt_dir + ".globals.txt", "w") as f:
        f.write("".join(n + "\n" for n in sorted(names)))
    return metadata


def write_expected(ckpt_dir, state_dict):
    metadata = record_globals(ckpt_dir)
    flat, _ = flatten_state_dict(state_dict)
    raw = {}
    for index, info in metadata.storage_data.items():
        if isinstance(metadata.state_dict_metadata[index.fqn],
                      dcp.metadata.BytesStorageMetadata):
            with open(os.path.join(ckpt_dir, info.relative_path), "rb") as f:
                f.seek(info.offset)
                raw[index.fqn] = f.read(info.length)
    if set(flat) != set(metadata.state_dict_metadata):
        raise SystemExit(f"keys differ: {sorted(flat)} vs {sorted(metadata.state_dict_metadata)}")
    torch.save({"values": flat, "raw": raw}, ckpt_dir + ".expected.pt")


def plain(out):
    g = torch.Generator().manual_seed(0)
    state_dict = {
        "f32": torch.randn(5, 7, generator=g),
        "f64": torch.randn(3, 2, 4, generator=g, dtype=torch.float64),
        "f16": torch.randn(9, generator=g).half(),
        "bf16": torch.randn(4, 3, generator=g).bfloat16(),
        "i64": torch.arange(-6, 6, dtype=torch.int64).reshape(3, 4),
        "i32": torch.tensor([[1, -2], [3, 2**31 - 1]], dtype=torch.int32),
        "u8": torch.arange(0, 250, 25, dtype=torch.uint8),
        "b": torch.tensor([True, False, True]),
        "scalar_f32": torch.tensor(2.5),
        "scalar_i64": torch.tensor(-7),
        "empty": torch.zeros(0, 3),
        "int": 42,
        "float": 0.1,
        "str": "hello DCP",
        "list": [1, 2.5, "x"],
        "tuple": (0.9, 0.999),
        "none": None,
        "bool": True,
        "nested": {
            "w": torch.randn(6, 2, generator=g),
            "deeper": {"step": torch.tensor(3.0), "name": "inner", "n": 17},
        },
    }
    ckpt_dir = os.path.join(out, "plain")
    dcp.save(state_dict, checkpoint_id=ckpt_dir, no_dist=True)
    write_expected(ckpt_dir, state_dict)


def tutorial(out):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.checkpoint.stateful import Stateful

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2))
    optim = torch.optim.Adam([{"params": model[0].parameters()},
                              {"params": model[2].parameters(), "lr": 0.1}], lr=0.01)
    model(torch.randn(4, 3)).sum().backward()
    optim.step()

    class AppState(Stateful):
        def state_dict(self):
            model_sd, optim_sd = get_state_dict(model, optim)
            return {"model": model_sd, "optim": optim_sd}

        def load_state_dict(self, state_dict):
            raise NotImplementedError

    ckpt_dir = os.path.join(out, "tutorial")
    dcp.save({"app": AppState()}, checkpoint_id=ckpt_dir, no_dist=True)
    write_expected(ckpt_dir, {"app": AppState().state_dict()})


class _Hostile:
    def __reduce__(self):
        return (os.system, ("echo hostile pickle ran",))


def damaged(out):
    """The damaged_* copies of OUT/plain (see the module's text)."""
    import copy
    import shutil

    src = os.path.join(out, "plain")
    with open(os.path.join(src, ".metadata"), "rb") as f:
        original = pickle.load(f)

    def f32_storage(md):
        return next(v for k, v in md.storage_data.items() if k.fqn == "f32")

    def storage_offset(md):
        f32_storage(md).offset = 10**9

    def chunk_outside(md):
        md.state_dict_metadata["f32"].chunks[0].sizes = torch.Size([7, 7])

    def dtype(md):
        md.state_dict_metadata["f32"].properties.dtype = torch.float64

    def shape(md):
        md.state_dict_metadata["f32"].size = torch.Size([7, 5])
        md.state_dict_metadata["f32"].chunks[0].sizes = torch.Size([7, 5])

    def missing_file(md):
        for info in md.storage_data.values():
            info.relative_path = "__9_0.distcp"

    def hostile(md):
        md.planner_data["evil"] = _Hostile()

    for change in (storage_offset, chunk_outside, dtype, shape, missing_file, hostile):
        dst = os.path.join(out, "damaged_" + change.__name__)
        shutil.copytree(src, dst)
        md = copy.deepcopy(original)
        change(md)
        with open(os.path.join(dst, ".metadata"), "wb") as f:
            pickle.dump(md, f)


def fsdp2(out):
    """One rank of the FSDP2 job (under torchrun)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    # Odd row counts, so that dim-0 shards are uneven (5 rows: 3 + 2) and a 1-row bias has an
    # empty shard on rank 1.
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 7), torch.nn.ReLU(),
        torch.nn.Linear(7, 1))
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1 + rank)
    model(torch.randn(4, 6, generator=g)).sum().backward()
    optim.step()
    model_sd, optim_sd = get_state_dict(model, optim)
    ckpt_dir = os.path.join(out, "fsdp2")
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=ckpt_dir)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full_model, full_optim = get_state_dict(model, optim, options=full)
    if rank == 0:
        write_expected(ckpt_dir, {"model": full_model, "optimizer": full_optim})
    dist.barrier()
    # Ranks sometimes abort at exit after finishing (see tests/pytorch_peer/fsdp_peer.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--fsdp2-rank":
        fsdp2(sys.argv[2])
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    plain(out)
    tutorial(out)
    damaged(out)
    if "--single_process" in sys.argv[2:]:  # no OUT/fsdp2: no torchrun
        return
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", os.path.abspath(__file__), "--fsdp2-rank", out],
                   check=True)


if __name__ == "__main__":
    main()
