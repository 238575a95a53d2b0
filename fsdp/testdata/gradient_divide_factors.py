"""Oracle for fsdp/gradient_divide_test.cc: PyTorch FSDP1's gradient divide factors.

Usage: tools/python gradient_divide_factors.py MAX_WORLD_SIZE

Runs FSDP1's own `_init_process_group_state` (what `FullyShardedDataParallel.__init__` calls)
for a group of each size from 1 to MAX_WORLD_SIZE and each sharding strategy without hybrid
sharding, and prints one line per case:
  factors strategy=<name> world_size=<n> predivide=<float.hex> postdivide=<float.hex>
The group is a stand-in with rank() and size(), which is all that function asks of it.
"""

import sys
import types
import warnings

warnings.filterwarnings("ignore")

from torch.distributed.fsdp import ShardingStrategy  # noqa: E402
from torch.distributed.fsdp import _init_utils  # noqa: E402


class Group:
    def __init__(self, size):
        self._size = size

    def rank(self):
        return 0

    def size(self):
        return self._size


def main():
    max_world_size = int(sys.argv[1])
    for strategy in (
        ShardingStrategy.FULL_SHARD,
        ShardingStrategy.SHARD_GRAD_OP,
        ShardingStrategy.NO_SHARD,
    ):
        for world_size in range(1, max_world_size + 1):
            state = types.SimpleNamespace()
            _init_utils._init_process_group_state(state, Group(world_size), strategy, None)
            print(
                f"factors strategy={strategy.name} world_size={world_size} "
                f"predivide={float.hex(float(state._gradient_predivide_factor))} "
                f"postdivide={float.hex(float(state._gradient_postdivide_factor))}",
                flush=True,
            )


if __name__ == "__main__":
    main()
