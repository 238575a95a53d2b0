"""PyTorch 2.13's own reduce-scatter on CPU (dist.reduce_scatter_tensor over Gloo, what FSDP1
reduces gradients with), for gradient_reduction_peer_test.cc to compare ours with bit for bit.

Run under torchrun:
  tools/python -m torch.distributed.run --standalone --nproc_per_node=3 \\
      tests/pytorch_peer/reduce_scatter_peer.py --out DIR --sizes 1,1001,1048579

For each size n, rank r draws its input as the C++ side does (torch.manual_seed(1234 + r), then
torch.randn(n * world_size) * 100: different on every rank), reduce-scatters it with the SUM op
and writes its output chunk (n float32, raw little-endian) to DIR/ws<W>_n<n>_rank<r>.bin.
"""

import argparse
import datetime
import os
import sys
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")


def main(argv):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--sizes", required=True, help="comma-separated output chunk sizes")
    args = p.parse_args(argv)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    os.makedirs(args.out, exist_ok=True)
    for n in (int(s) for s in args.sizes.split(",")):
        torch.manual_seed(1234 + rank)
        x = torch.randn(n * world) * 100
        out = torch.empty(n)
        dist.reduce_scatter_tensor(out, x)
        with open(os.path.join(args.out, f"ws{world}_n{n}_rank{rank}.bin"), "wb") as f:
            f.write(out.numpy().tobytes())
    dist.barrier()
    print(f"reduce_scatter_peer: rank {rank} of {world} wrote {args.sizes}", flush=True)
    sys.stdout.flush()
    os._exit(0)  # PyTorch ranks sometimes abort at exit (tests/pytorch_peer/README.md)


if __name__ == "__main__":
    main(sys.argv[1:])
