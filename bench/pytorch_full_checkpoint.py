"""PyTorch's full checkpoint save and load on BenchTransformer's twin: full_checkpoint_benchmark's
reference.

Run under torchrun (full_checkpoint_benchmark starts it through `python -m torch.distributed.run`):

  torchrun --standalone --nproc_per_node=2 bench/pytorch_full_checkpoint.py --api=fsdp1 \\
      --out_dir=/tmp/x [--d_model=512 --ffn=2048]

The model is pytorch_fsdp_step.py's twin (BenchTransformer's shapes; --d_model/--ffn for the
larger sizes), Adam lr 1e-4 after one step, gradients dropped, as the C++ job. What a PyTorch FSDP
user runs for a full checkpoint (rank 0 writes model.pt and optim.pt):
  fsdp1  save: FSDP.state_dict + FSDP.optim_state_dict under FULL_STATE_DICT
               (FullStateDictConfig(rank0_only=True): its offload_to_cpu=True fails on CPU in
               2.13; FullOptimStateDictConfig(rank0_only=True, offload_to_cpu=True)), then
               torch.save of each on rank 0;
         load: torch.load of both on rank 0 (model.pt on every rank: FSDP1 loads a full model
               state dict on every rank), model.load_state_dict, FSDP.optim_state_dict_to_load
               (rank0_only) and optim.load_state_dict.
  fsdp2  save: get_state_dict(model, optim, StateDictOptions(full_state_dict=True,
               cpu_offload=True)), then torch.save of each on rank 0;
         load: torch.load of both on every rank, set_state_dict(..., StateDictOptions(
               full_state_dict=True)) (broadcast_from_rank0=True, rank 0 reading alone, hangs
               on CPU/Gloo in 2.13).
Each operation between barriers; rank 0's VmHWM during it (reset through /proc/self/clear_refs
right before, as bench/rank_util.cc does). Rank 0 prints one line:
  PYTORCH_FULL_CKPT api=.. save_ms=.. save_peak=.. load_ms=.. load_peak=.. base_rss=..
"""

import argparse
import gc
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_fsdp_step import (BenchTransformerTwin, add_run_args, finish,  # noqa: E402
                               rank_batch, start, train_step, wrap_fsdp1, wrap_fsdp2)
from pytorch_optim_state import reset_peak, rss  # noqa: E402


def measured(fn):
    """Seconds of fn() between barriers and this rank's peak RSS during it."""
    gc.collect()
    dist.barrier()
    reset_peak()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start, rss("VmHWM")


def fsdp1_ops(model, optim, out_dir, rank):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType

    # offload_to_cpu=True for the model fails on CPU in 2.13 ("setStorage: ... out of bounds for
    # storage of size 0"); the tensors are on the CPU already.
    FSDP.set_state_dict_type(model, StateDictType.FULL_STATE_DICT,
                             FullStateDictConfig(rank0_only=True),
                             FullOptimStateDictConfig(rank0_only=True, offload_to_cpu=True))

    def save():
        msd = model.state_dict()
        osd = FSDP.optim_state_dict(model, optim)
        if rank == 0:
            torch.save(msd, os.path.join(out_dir, "model.pt"))
            torch.save(osd, os.path.join(out_dir, "optim.pt"))

    def load():
        msd = torch.load(os.path.join(out_dir, "model.pt"), weights_only=True)
        osd = torch.load(os.path.join(out_dir, "optim.pt"), weights_only=True) if rank == 0 else {}
        model.load_state_dict(msd)
        del msd
        optim.load_state_dict(FSDP.optim_state_dict_to_load(model, optim, osd))

    return save, load


def fsdp2_ops(model, optim, out_dir, rank):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                         set_state_dict)

    def save():
        msd, osd = get_state_dict(model, optim,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save(msd, os.path.join(out_dir, "model.pt"))
            torch.save(osd, os.path.join(out_dir, "optim.pt"))

    def load():
        # broadcast_from_rank0=True hangs on CPU/Gloo in 2.13 (measured here): every rank reads.
        msd = torch.load(os.path.join(out_dir, "model.pt"), weights_only=True)
        osd = torch.load(os.path.join(out_dir, "optim.pt"), weights_only=True)
        set_state_dict(model, optim, model_state_dict=msd, optim_state_dict=osd,
                       options=StateDictOptions(full_state_dict=True))

    return save, load


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--api", choices=["fsdp1", "fsdp2"], required=True)
    p.add_argument("--out_dir", required=True)
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--iterations", type=int, default=1)
    add_run_args(p)
    args = p.parse_args()
    rank = start(args)
    wrap = wrap_fsdp1 if args.api == "fsdp1" else wrap_fsdp2
    model = wrap(BenchTransformerTwin(args.d_model, args.ffn))
    optim = torch.optim.Adam(model.parameters(), lr=1e-4)
    src, tgt = rank_batch(rank, args.seq, args.batch)
    train_step(model, optim, src, tgt)  # Adam's state
    optim.zero_grad(set_to_none=True)
    out_dir = os.path.join(args.out_dir, args.api)
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
    ops = fsdp1_ops if args.api == "fsdp1" else fsdp2_ops
    save, load = ops(model, optim, out_dir, rank)
    gc.collect()
    base = rss("VmRSS")
    totals = dict(save=0.0, save_peak=0, load=0.0, load_peak=0)
    for _ in range(args.iterations):
        seconds, peak = measured(save)
        totals["save"] += seconds
        totals["save_peak"] = max(totals["save_peak"], peak)
        seconds, peak = measured(load)
        totals["load"] += seconds
        totals["load_peak"] = max(totals["load_peak"], peak)
    if rank == 0:
        n = args.iterations
        print(f"PYTORCH_FULL_CKPT api={args.api} save_ms={totals['save'] / n * 1e3:.3f} "
              f"save_peak={totals['save_peak']} load_ms={totals['load'] / n * 1e3:.3f} "
              f"load_peak={totals['load_peak']} base_rss={base}", flush=True)
        shutil.rmtree(out_dir, ignore_errors=True)
    finish()


if __name__ == "__main__":
    main()
