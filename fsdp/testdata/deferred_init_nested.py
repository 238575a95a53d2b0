"""What PyTorch 2.13's FSDP1 does with a meta-device model and a param_init_fn, for
//fsdp:deferred_init_test: NestedModel (models/testdata/reference_models.py) built under
`torch.device("meta")`, wrapped on CPU/Gloo with units at NestedModel.wrap's modules (block1.bias_module0,
block1, block2.1.bias_module0, block2.1.bias_module1, block2.1, block2.2) by an auto-wrap policy,
plus the root. param_init_fn allocates each module's own tensors (to_empty) and fills each with
uniform(-0.5, 0.5) drawn from a generator seeded by FqnSeed(its FQN), as the C++ test does.
Rank 0 prints, one line each,
  call <module fqn>              each param_init_fn call, in order ("<root>" for the model)
  state <key> <hex bytes>        each full state dict entry, its float32 bytes
Run: tools/python fsdp/testdata/deferred_init_nested.py (it starts torchrun with 2 ranks).
"""

import functools
import os
import sys
import warnings

import torch

import rank_launch

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "models", "testdata"))

UNITS = ["block1.bias_module0", "block1", "block2.1.bias_module0", "block2.1.bias_module1",
         "block2.1", "block2.2"]


def fqn_seed(fqn):
    """The seed of a tensor's values: a polynomial hash of its FQN (fsdp::FqnSeed, fsdp/deferred_init.h)."""
    h = 0
    for c in fqn.encode():
        h = (h * 131 + c) % 2147483647
    return h


def rank_main():
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    from reference_models import NestedModel

    dist.init_process_group("gloo")
    with torch.device("meta"):
        model = NestedModel()
    names = {m: name for name, m in model.named_modules()}
    units = {model.get_submodule(name) for name in UNITS}
    calls = []

    def param_init_fn(module):
        name = names[module]
        calls.append(name or "<root>")
        module.to_empty(device=torch.device("cpu"), recurse=False)
        with torch.no_grad():
            for key, t in list(module.named_parameters(recurse=False)) + list(
                    module.named_buffers(recurse=False)):
                fqn = f"{name}.{key}" if name else key
                t.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(fqn_seed(fqn)))

    policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: m in units)
    fsdp = FSDP(model, auto_wrap_policy=policy, param_init_fn=param_init_fn,
                device_id=torch.device("cpu"))
    lines = [f"call {c}" for c in calls]
    for key, v in fsdp.state_dict().items():
        lines.append(f"state {key} {v.contiguous().numpy().tobytes().hex()}")
    rank_launch.finish(dist, lines)


if __name__ == "__main__":
    rank_launch.main(__file__, rank_main)
