"""PyTorch's dcp.save and dcp.async_save on BenchTransformer's twin: async_save_benchmark's
reference.

Run under torchrun (async_save_benchmark starts it through `python -m torch.distributed.run`):

  torchrun --standalone --nproc_per_node=2 bench/pytorch_async_save.py --out_dir=/tmp/x

The model is pytorch_fsdp_step.py's twin (BenchTransformer's shapes) under FSDP2 (fully_shard on
every layer, then the root), Adam lr 1e-4 after one step, so the checkpoint holds the same
bytes as the C++ one. The state is what PyTorch's recipes save: {"model": get_model_state_dict,
"optimizer": get_optimizer_state_dict} (sharded, DTensor). Per iteration, as the C++ benchmark
does, each part between barriers (rank 0's wall times):
  1. dcp.save into a fresh directory (synchronous);
  2. dcp.async_save with its default stager (the copy happens inside the call), then one
     training step: the call's time (blocked_ms) and the whole (save + step); then the future's
     result() (wait_ms);
  3. dcp.async_save with DefaultStager(StagingOptions(use_async_staging=True)) (pinned and
     shared memory and non-blocking copies off: they need an accelerator), one stager kept for
     the run as PyTorch advises; then forward and backward, staging_completion.result() (the
     wait before the optimizer step), the optimizer step; then upload_completion.result();
  4. one training step with no save in flight (step_ms).
step_extra_ms = (save + its step) - step_ms: what training loses per save, all told.
async_save gets a Gloo group of its own (process_group=dist.new_group(backend="gloo")), as
PyTorch's documentation advises for background saves; the C++ saver makes its own groups too.
Rank 0 prints one line:
  PYTORCH_ASYNC_SAVE sync_ms=.. blocked_ms=.. step_extra_ms=.. wait_ms=.. step_ms=..
    staging_blocked_ms=.. staging_wait_ms=.. staging_step_extra_ms=.. staging_upload_wait_ms=..
"""

import argparse
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_fsdp_step import VOCAB, BenchTransformerTwin, rank_batch, train_step, wrap_fsdp2  # noqa: E402


def timed(fn):
    dist.barrier()
    start = time.perf_counter()
    result = fn()
    dist.barrier()
    return time.perf_counter() - start, result


def clock(fn, into, key):
    """fn()'s time on this rank (no barrier), added to into[key]."""
    start = time.perf_counter()
    result = fn()
    into[key] += time.perf_counter() - start
    return result


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

    def forward_backward():
        logits = model(src, tgt[:-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tgt[1:].reshape(-1))
        optim.zero_grad()
        loss.backward()

    def step():
        train_step(model, optim, src, tgt)

    def state():
        return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optim)}

    step()  # Adam's state
    stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                          use_async_staging=True, use_non_blocking_copy=False))
    dirs = {name: os.path.join(args.out_dir, name) for name in ("sync", "async", "staging")}
    t = dict(sync=0.0, blocked=0.0, with_step=0.0, wait=0.0, step=0.0, staging_blocked=0.0,
             staging_wait=0.0, staging_with_step=0.0, staging_upload_wait=0.0)
    for _ in range(args.iterations):
        if rank == 0:
            for d in dirs.values():
                shutil.rmtree(d, ignore_errors=True)
        dist.barrier()
        t["sync"] += timed(lambda: dcp.save(state(), checkpoint_id=dirs["sync"]))[0]

        def save_then_step():
            future = clock(lambda: dcp.async_save(state(), checkpoint_id=dirs["async"],
                                                  process_group=save_group), t, "blocked")
            step()
            return future

        seconds, future = timed(save_then_step)
        t["with_step"] += seconds
        t["wait"] += timed(future.result)[0]

        def staged_save_then_step():
            response = clock(lambda: dcp.async_save(state(), checkpoint_id=dirs["staging"],
                                                    process_group=save_group, async_stager=stager),
                             t, "staging_blocked")
            forward_backward()
            clock(response.staging_completion.result, t, "staging_wait")
            optim.step()
            return response

        seconds, response = timed(staged_save_then_step)
        t["staging_with_step"] += seconds
        t["staging_upload_wait"] += timed(response.upload_completion.result)[0]
        t["step"] += timed(step)[0]
    stager.close()
    if rank == 0:
        ms = {k: v / args.iterations * 1e3 for k, v in t.items()}
        print(f"PYTORCH_ASYNC_SAVE sync_ms={ms['sync']:.3f} blocked_ms={ms['blocked']:.3f} "
              f"step_extra_ms={ms['with_step'] - ms['step']:.3f} wait_ms={ms['wait']:.3f} "
              f"step_ms={ms['step']:.3f} staging_blocked_ms={ms['staging_blocked']:.3f} "
              f"staging_wait_ms={ms['staging_wait']:.3f} "
              f"staging_step_extra_ms={ms['staging_with_step'] - ms['step']:.3f} "
              f"staging_upload_wait_ms={ms['staging_upload_wait']:.3f}", flush=True)
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()
    # PyTorch ranks sometimes abort at exit after finishing (README): leave at once.
    os._exit(0)


if __name__ == "__main__":
    main()
