"""PyTorch's dcp.save and dcp.async_save on BenchTransformer's twin: async_save_benchmark's
reference.

Run under torchrun (async_save_benchmark starts it through `python -m torch.distributed.run`):

  torchrun --standalone --nproc_per_node=2 bench/pytorch_async_save.py --out_dir=/tmp/x

The model is pytorch_fsdp_step.py's twin (BenchTransformer's shapes) under FSDP2 (fully_shard on
every layer, then the root), Adam lr 1e-4 after one step, so the checkpoint holds the same
bytes as the C++ one. The state is what PyTorch's recipes save: {"model": get_model_state_dict,
"optimizer": get_optimizer_state_dict} (sharded, DTensor). Per iteration, as the C++ benchmark
does, each part between barriers:
  1. dcp.save into a fresh directory (synchronous);
  2. dcp.async_save into another (the time until it returns: the training's wait), then one
     training step, then the future's result();
  3. one training step with no save in flight.
async_save gets a Gloo group of its own (process_group=dist.new_group(backend="gloo")), as
PyTorch's documentation advises for background saves; the C++ saver makes its own groups too.
Rank 0 prints one line:
  PYTORCH_ASYNC_SAVE sync_ms=.. blocked_ms=.. step_during_save_ms=.. wait_ms=.. step_ms=..
"""

import argparse
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_fsdp_step import BenchTransformerTwin, rank_batch, train_step, wrap_fsdp2  # noqa: E402


def timed(fn):
    dist.barrier()
    start = time.perf_counter()
    result = fn()
    dist.barrier()
    return time.perf_counter() - start, result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out_dir", required=True)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--seq", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (the C++ ranks')")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    save_group = dist.new_group(backend="gloo")
    src, tgt = rank_batch(rank, args.seq, args.batch)
    model = wrap_fsdp2(BenchTransformerTwin())
    optim = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        train_step(model, optim, src, tgt)

    def state():
        return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optim)}

    step()  # Adam's state
    sync_dir = os.path.join(args.out_dir, "sync")
    async_dir = os.path.join(args.out_dir, "async")
    totals = dict(sync=0.0, blocked=0.0, step_during=0.0, wait=0.0, step=0.0)
    for _ in range(args.iterations):
        if rank == 0:
            shutil.rmtree(sync_dir, ignore_errors=True)
            shutil.rmtree(async_dir, ignore_errors=True)
        dist.barrier()
        seconds, _ = timed(lambda: dcp.save(state(), checkpoint_id=sync_dir))
        totals["sync"] += seconds
        seconds, future = timed(
            lambda: dcp.async_save(state(), checkpoint_id=async_dir, process_group=save_group))
        totals["blocked"] += seconds
        totals["step_during"] += timed(step)[0]
        totals["wait"] += timed(future.result)[0]
        totals["step"] += timed(step)[0]
    if rank == 0:
        ms = {k: v / args.iterations * 1e3 for k, v in totals.items()}
        print(f"PYTORCH_ASYNC_SAVE sync_ms={ms['sync']:.3f} blocked_ms={ms['blocked']:.3f} "
              f"step_during_save_ms={ms['step_during']:.3f} wait_ms={ms['wait']:.3f} "
              f"step_ms={ms['step']:.3f}", flush=True)
        shutil.rmtree(sync_dir, ignore_errors=True)
        shutil.rmtree(async_dir, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()
    # PyTorch ranks sometimes abort at exit after finishing (README): leave at once.
    os._exit(0)


if __name__ == "__main__":
    main()
