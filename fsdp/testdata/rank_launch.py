"""What fsdp/testdata's PyTorch scripts share: each starts itself under torchrun with 2 ranks,
and rank 0 prints the lines the C++ test compares."""

import os
import subprocess
import sys


def finish(dist, lines):
    """Rank 0 prints `lines`; every rank waits for the others, then leaves at once."""
    if dist.get_rank() == 0:
        print("\n".join(lines), flush=True)
    dist.barrier()
    os._exit(0)  # PyTorch ranks may abort at exit otherwise (README)


def main(script, rank_main, nproc=2):
    """In a rank (RANK set): rank_main(). Otherwise: runs `script` under torchrun."""
    if "RANK" in os.environ:
        rank_main()
    sys.exit(subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc_per_node={nproc}", os.path.abspath(script)]))
