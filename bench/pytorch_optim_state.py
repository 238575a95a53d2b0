"""PyTorch's optimizer-state dicts on BenchTransformer's twin: optim_state_benchmark's reference.

Run under torchrun (optim_state_benchmark starts it through `python -m torch.distributed.run`):

  torchrun --standalone --nproc_per_node=2 bench/pytorch_optim_state.py --iterations=3

The model is pytorch_fsdp_step.py's twin (BenchTransformer's shapes), wrapped as the C++
benchmark wraps its model (one unit per layer, then the root), with Adam (lr 1e-4) after one
step. For FSDP1 (FULL_SHARD, device_id=cpu) and FSDP2 (fully_shard), each timed between barriers
(the slowest rank counts), means over --iterations calls, and rank 0's peak RSS during the calls
(VmHWM after resetting it through /proc/self/clear_refs, as bench/rank_util.cc does):
  full      the full optimizer state dict on rank 0, offloaded to the CPU:
            FSDP1 FSDP.optim_state_dict under FULL_STATE_DICT with
            FullOptimStateDictConfig(rank0_only=True, offload_to_cpu=True);
            FSDP2 get_optimizer_state_dict(full_state_dict=True, cpu_offload=True), which
            DCP's recipes use (every rank receives the full dict: FSDP2 has no rank0_only).
  sharded   the sharded optimizer state dict: FSDP1 under SHARDED_STATE_DICT; FSDP2
            get_optimizer_state_dict() (DTensors).
  load      loading that sharded dict: FSDP1 optim_state_dict_to_load + optim.load_state_dict;
            FSDP2 set_optimizer_state_dict.
Rank 0 prints one line per wrapper and operation:
  PYTORCH_OPTIM_STATE wrapper=fsdp1 op=full ms=.. peak_rss=.. base_rss=..
"""

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_fsdp_step import (BenchTransformerTwin, rank_batch, train_step,  # noqa: E402
                               wrap_fsdp1, wrap_fsdp2)


def rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def timed(fn, iterations):
    """Mean seconds per call (between barriers), rank's peak RSS during them, RSS before."""
    base = rss("VmRSS")
    reset_peak()
    total = 0.0
    for _ in range(iterations):
        dist.barrier()
        start = time.perf_counter()
        result = fn()
        dist.barrier()
        total += time.perf_counter() - start
        del result
    return total / iterations, rss("VmHWM"), base


def fsdp1_ops(model, optim):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import (FullOptimStateDictConfig, FullStateDictConfig,
                                        ShardedOptimStateDictConfig, ShardedStateDictConfig,
                                        StateDictType)

    def full():
        FSDP.set_state_dict_type(model, StateDictType.FULL_STATE_DICT,
                                 FullStateDictConfig(rank0_only=True, offload_to_cpu=True),
                                 FullOptimStateDictConfig(rank0_only=True, offload_to_cpu=True))
        return FSDP.optim_state_dict(model, optim)

    def sharded():
        FSDP.set_state_dict_type(model, StateDictType.SHARDED_STATE_DICT, ShardedStateDictConfig(),
                                 ShardedOptimStateDictConfig())
        return FSDP.optim_state_dict(model, optim)

    saved = sharded()

    def load():
        FSDP.set_state_dict_type(model, StateDictType.SHARDED_STATE_DICT, ShardedStateDictConfig(),
                                 ShardedOptimStateDictConfig())
        optim.load_state_dict(FSDP.optim_state_dict_to_load(model, optim, saved))

    return {"full": full, "sharded": sharded, "load": load}


def fsdp2_ops(model, optim):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    def full():
        return get_optimizer_state_dict(
            model, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def sharded():
        return get_optimizer_state_dict(model, optim)

    saved = sharded()

    def load():
        set_optimizer_state_dict(model, optim, saved)

    return {"full": full, "sharded": sharded, "load": load}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--wrappers", default="fsdp1,fsdp2")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (the C++ ranks')")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    src, tgt = rank_batch(rank, seq=8, batch=2)
    for name in args.wrappers.split(","):
        wrap, ops = {"fsdp1": (wrap_fsdp1, fsdp1_ops), "fsdp2": (wrap_fsdp2, fsdp2_ops)}[name]
        model = wrap(BenchTransformerTwin())
        optim = torch.optim.Adam(model.parameters(), lr=1e-4)
        train_step(model, optim, src, tgt)
        for op, fn in ops(model, optim).items():
            seconds, peak, base = timed(fn, args.iterations)
            if rank == 0:
                print(f"PYTORCH_OPTIM_STATE wrapper={name} op={op} ms={seconds * 1e3:.3f} "
                      f"peak_rss={peak} base_rss={base}", flush=True)
        del model, optim
    dist.barrier()
    dist.destroy_process_group()
    # PyTorch ranks sometimes abort at exit after finishing (README): leave at once.
    os._exit(0)


if __name__ == "__main__":
    main()
