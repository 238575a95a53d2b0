"""PyTorch 2.13's side of scale_benchmark (and of checkpoint_benchmark's sharded save / load).

Run under torchrun (the C++ benchmarks start it through `python -m torch.distributed.run`):

  torchrun --standalone --nproc_per_node=2 bench/pytorch_scale.py --out_dir=/tmp/x \
      --widths=128,256,512 --iterations=2

For each width (BenchTransformer's twin of pytorch_fsdp_step.py at that d_model, dim_feedforward
4 * d_model, every other shape as BenchTransformer's), wrapped as the C++ benchmarks wrap theirs
(one unit per layer, then the root), Adam (lr 1e-4) after one warm-up training step, each
operation timed between barriers (the slowest rank counts), the mean over --iterations calls:
  step       one training step (forward, next-token cross-entropy, backward, Adam), FSDP1
             FULL_SHARD (device_id=cpu) and FSDP2 fully_shard;
  full       FSDP1 FSDP.optim_state_dict under FULL_STATE_DICT, rank0_only, offload_to_cpu
             (FSDP2 has no rank0_only: every rank would receive the full state);
  sharded    FSDP2 get_optimizer_state_dict() (DTensors);
  load       FSDP2 set_optimizer_state_dict of that dict;
  save       dcp.save({"model": get_model_state_dict, "optimizer": get_optimizer_state_dict})
             into a fresh directory each call, as PyTorch's recipes save FSDP2 models;
  ckpt_load  the state dicts built again, dcp.load of that checkpoint into them, then
             set_model_state_dict and set_optimizer_state_dict.
Memory: each rank's peak RSS during the op's calls (VmHWM, reset through /proc/self/clear_refs
after the inputs are built and malloc_trim, as bench/rank_util.cc does), rank 0's and the largest of all ranks.
Rank 0 prints one line per width, operation and wrapper:
  PYTORCH_SCALE width=512 op=step impl=fsdp2 ms=.. peak_rss_rank0=.. peak_rss_max=.. params=..
"""

import argparse
import ctypes
import gc
import os
import shutil
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_fsdp_step import (BenchTransformerTwin, rank_batch, train_step,  # noqa: E402
                               wrap_fsdp1, wrap_fsdp2)
from pytorch_optim_state import timed  # noqa: E402

FSDP1_OPS = ("step", "full")
FSDP2_OPS = ("step", "sharded", "load", "save", "ckpt_load")


def measured(fn, iterations):
    """Mean seconds per call between barriers, and (rank 0's, the largest rank's) peak RSS.

    Freed memory goes back to the kernel first (gc, malloc_trim), as the C++ side does, so that
    an earlier width's freed heap does not count."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    seconds, peak, _ = timed(fn, iterations)
    peaks = torch.tensor([peak], dtype=torch.int64)
    rank0 = peaks.clone()
    dist.broadcast(rank0, 0)
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    return seconds, int(rank0.item()), int(peaks.item())


def fsdp1_ops(model, optim, step, _):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType

    def full():
        FSDP.set_state_dict_type(model, StateDictType.FULL_STATE_DICT,
                                 FullStateDictConfig(rank0_only=True, offload_to_cpu=True),
                                 FullOptimStateDictConfig(rank0_only=True, offload_to_cpu=True))
        return FSDP.optim_state_dict(model, optim)

    return {"step": (None, step), "full": (None, full)}


def fsdp2_ops(model, optim, step, ckpt_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict,
                                                         set_model_state_dict,
                                                         set_optimizer_state_dict)

    def state():
        return {"model": get_model_state_dict(model),
                "optimizer": get_optimizer_state_dict(model, optim)}

    saved = {"calls": 0}

    def sharded():
        return get_optimizer_state_dict(model, optim)

    def prepare_load():
        saved["optim"] = sharded()

    def load():
        set_optimizer_state_dict(model, optim, saved["optim"])

    def save():  # each call into a fresh directory, as the C++ side saves
        saved["calls"] += 1
        dcp.save(state(), checkpoint_id=os.path.join(ckpt_dir, str(saved["calls"])))

    def ckpt_load():
        loaded = state()
        dcp.load(loaded, checkpoint_id=os.path.join(ckpt_dir, str(saved["calls"])))
        set_model_state_dict(model, loaded["model"])
        set_optimizer_state_dict(model, optim, loaded["optimizer"])

    # op: (what is built before the peak is reset, the timed call)
    return {"step": (None, step), "sharded": (None, sharded), "load": (prepare_load, load),
            "save": (None, save), "ckpt_load": (None, ckpt_load)}


def run_width(args, rank, width, src, tgt):
    ckpt_dir = os.path.join(args.out_dir, f"dcp-w{dist.get_world_size()}-d{width}")
    for impl in args.wrappers.split(","):
        wrap, make_ops, names = {"fsdp1": (wrap_fsdp1, fsdp1_ops, FSDP1_OPS),
                                 "fsdp2": (wrap_fsdp2, fsdp2_ops, FSDP2_OPS)}[impl]
        wanted = [op for op in names if op in args.ops.split(",")]
        if not wanted:
            continue
        model = BenchTransformerTwin(d_model=width, dim_feedforward=4 * width)
        params = sum(p.numel() for p in model.parameters())
        model = wrap(model)
        optim = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step():
            train_step(model, optim, src, tgt)

        step()  # warm-up: Adam's state
        ops = make_ops(model, optim, step, ckpt_dir)
        for op in wanted:
            prepare, fn = ops[op]
            if prepare is not None:
                prepare()
            seconds, peak0, peak_max = measured(fn, args.iterations)
            if rank == 0:
                print(f"PYTORCH_SCALE width={width} op={op} impl={impl} ms={seconds * 1e3:.3f} "
                      f"peak_rss_rank0={peak0} peak_rss_max={peak_max} params={params}",
                      flush=True)
        del model, optim, ops
        if rank == 0:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        dist.barrier()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out_dir", required=True, help="where dcp.save writes (removed after)")
    p.add_argument("--widths", default="512", help="d_model of each model, comma-separated")
    p.add_argument("--ops", default=",".join(sorted(set(FSDP1_OPS + FSDP2_OPS))))
    p.add_argument("--wrappers", default="fsdp1,fsdp2")
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (the C++ ranks')")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    for width in (int(w) for w in args.widths.split(",")):
        # Each rank's batch as the C++ side draws it: 2 sequences of 8 tokens.
        src, tgt = rank_batch(dist.get_rank(), seq=8, batch=2)
        run_width(args, dist.get_rank(), width, src, tgt)
    dist.barrier()
    dist.destroy_process_group()
    # PyTorch ranks sometimes abort at exit after finishing (README): leave at once.
    os._exit(0)


if __name__ == "__main__":
    main()
