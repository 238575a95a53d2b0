"""Full checkpoints of NestedModel saved from PyTorch 2.13 models that carry wrappers, for
tests/optim_state/full_optim_state_dict_test.cc (FullOptimStateDictKeys).

Usage: tools/python wrapped_checkpoints.py MODELS_TESTDATA_DIR PYTORCH_TRAIN_DIR OUT_DIR HIDDEN

HIDDEN is block0's output (= block1's input) size of the C++ NestedModel the files load into
(7 in PyTorch 1.13's test file, 3 in 2.x's). MODELS_TESTDATA_DIR holds reference_models.py,
PYTORCH_TRAIN_DIR examples/testdata/pytorch_train.py (whose full_state() keys the optimizer
state by parameter names, as FSDP's full_optim_state_dict lays it out).

Every case trains NestedModel (seed 0, the PyTorch test's _step_model: per step one
randn(8, 5) batch, loss = output.sum()) with Adam(lr=1e-3) for 3 steps, then writes
OUT_DIR/<case>/model.pt and optim.pt with torch.save, keyed as the user's code below keys them,
and OUT_DIR/<case>/expected_model.pt and expected_optim.pt: the same values under the names
the parameters had in the unwrapped model, found by tensor identity before any wrapper was
applied (not by editing strings), so they say which value belongs to which parameter.

Cases (the key form each one's files carry, as measured on 2.13):
  checkpoint_wrapper   apply_activation_checkpointing(check_fn=nn.Sequential), as the PyTorch
                       test: block2 becomes a CheckpointWrapper. model.state_dict() is clean (the
                       wrapper's state-dict hook strips its level); the optimizer state keyed by
                       named_parameters() carries "block2._checkpoint_wrapped_module.0.weight".
  torch_compile        torch.compile(model, backend="eager") (dynamo traces each step; the
                       inductor backend gives the same OptimizedModule and keys but takes ~30 s
                       on CPU here): both files "_orig_mod.block0.weight".
  ddp                  DistributedDataParallel on a 1-rank Gloo group: both files
                       "module.block0.weight".
  fsdp1_named_parameters
                       FSDP1 (use_orig_params=True, device_id=cpu) on a 1-rank group, the root
                       and NestedModel.wrap's units wrapped, saved wrongly: both files keyed by
                       named_parameters() ("_fsdp_wrapped_module.block1._fsdp_wrapped_module.
                       bias_module0._fsdp_wrapped_module.bias"). At world size 1 FSDP1 runs
                       NO_SHARD, so each name holds the whole parameter.
  ddp_compile_checkpoint_wrapper
                       torch.compile(DDP(checkpoint-wrapped model)): "_orig_mod.module.block2.
                       _checkpoint_wrapped_module.0.weight".
  user_wrapper         the model held as `net` by a user's own module: "net.block0.weight", a
                       prefix no default strips.
  fsdp1_test_config    the PyTorch test's own configuration: NestedModel.wrap(ignore_modules=
                       True), then checkpoint_wrapper on nn.Sequential, saved with FSDP's
                       FULL_STATE_DICT model.state_dict() and FSDP.full_optim_state_dict
                       (rank0_only=False): clean keys, as that test asserts.
"""

import collections
import os
import sys
import tempfile
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn

warnings.filterwarnings("ignore")  # FSDP1's NO_SHARD-at-world-size-1 and deprecation notes

STEPS = 3


class UnwrappedNames:
    """The names parameters had before wrapping, found by identity: what full_state() needs."""

    def __init__(self, model):
        self._named = list(model.named_parameters())

    def named_parameters(self):
        return iter(self._named)

    def state_dict(self):
        return collections.OrderedDict((n, p.detach()) for n, p in self._named)


class UserWrapper(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


def nested_model(rm, hidden):
    model = rm.NestedModel()
    # Only shapes matter to the loading side (values come from the files).
    model.block0 = rm.BlockB(5, hidden)
    model.block1 = rm.BlockB(hidden, 7)
    return model


def checkpoint_sequentials(model):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
    )

    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, nn.Sequential))


def fsdp1_wrap(model, ignore_modules=False, root=False, use_orig_params=False):
    """NestedModel.wrap of the PyTorch test (inner units first), on the CPU."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    kw = {"device_id": torch.device("cpu"), "use_orig_params": use_orig_params}
    model.block1.bias_module0 = FSDP(model.block1.bias_module0, **kw)
    model.block1 = FSDP(model.block1, **kw)
    model.block2[1].bias_module0 = FSDP(model.block2[1].bias_module0, **kw)
    model.block2[1].bias_module1 = FSDP(model.block2[1].bias_module1, **kw)
    model.block2[1] = FSDP(model.block2[1], **kw)
    ignored = [model.block2[2].bias_module0] if ignore_modules else None
    model.block2[2] = FSDP(model.block2[2], ignored_modules=ignored, **kw)
    return FSDP(model, **kw) if root else model


def train(model):
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.manual_seed(0)
    for _ in range(STEPS):
        optim.zero_grad()
        model(torch.randn((8, 5))).sum().backward()
        optim.step()
    return optim


def save(directory, name, obj):
    os.makedirs(directory, exist_ok=True)
    torch.save(obj, os.path.join(directory, name))


def write_case(out, case, model, optim, unwrapped, model_state=None, optim_state=None):
    """The user's files (full_state() of the wrapped model unless given) and the expected ones
    (full_state() under the unwrapped names; the user's own files when `unwrapped` is None)."""
    from pytorch_train import full_state  # noqa: E402

    user_model, user_optim = full_state(model, optim)
    if model_state is not None:
        user_model = model_state
    if optim_state is not None:
        user_optim = optim_state
    directory = os.path.join(out, case)
    save(directory, "model.pt", user_model)
    save(directory, "optim.pt", user_optim)
    expected_model, expected_optim = (
        (user_model, user_optim) if unwrapped is None else full_state(unwrapped, optim)
    )
    save(directory, "expected_model.pt", expected_model)
    save(directory, "expected_optim.pt", expected_optim)


def main():
    models_dir, train_dir, out, hidden = sys.argv[1:5]
    hidden = int(hidden)
    sys.path[:0] = [models_dir, train_dir]
    import reference_models as rm  # noqa: E402
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP  # noqa: E402
    from torch.distributed.fsdp import StateDictType  # noqa: E402
    from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

    torch.set_num_threads(1)
    store = tempfile.NamedTemporaryFile(prefix="wrapped_checkpoints_store_", delete=False)
    store.close()
    os.unlink(store.name)
    dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)

    model = nested_model(rm, hidden)
    names = UnwrappedNames(model)
    checkpoint_sequentials(model)
    write_case(out, "checkpoint_wrapper", model, train(model), names)

    model = nested_model(rm, hidden)
    compiled = torch.compile(model, backend="eager")
    write_case(out, "torch_compile", compiled, train(compiled), UnwrappedNames(model))

    model = nested_model(rm, hidden)
    ddp = DDP(model)
    write_case(out, "ddp", ddp, train(ddp), UnwrappedNames(model))

    model = nested_model(rm, hidden)
    names = UnwrappedNames(model)
    fsdp = fsdp1_wrap(model, root=True, use_orig_params=True)
    optim = train(fsdp)
    wrong = collections.OrderedDict((n, p.detach()) for n, p in fsdp.named_parameters())
    write_case(out, "fsdp1_named_parameters", fsdp, optim, names, model_state=wrong)

    model = nested_model(rm, hidden)
    names = UnwrappedNames(model)
    checkpoint_sequentials(model)
    stacked = torch.compile(DDP(model), backend="eager")
    write_case(out, "ddp_compile_checkpoint_wrapper", stacked, train(stacked), names)

    model = nested_model(rm, hidden)
    wrapper = UserWrapper(model)
    write_case(out, "user_wrapper", wrapper, train(wrapper), UnwrappedNames(model))

    model = nested_model(rm, hidden)
    wrapped = fsdp1_wrap(model, ignore_modules=True)
    checkpoint_sequentials(model)
    optim = train(wrapped)
    full_osd = FSDP.full_optim_state_dict(wrapped, optim, rank0_only=False)
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT):
        state_dict = wrapped.state_dict()
    # The PyTorch test's assertion (dict_keys compare as sets: the orders differ).
    assert full_osd["state"].keys() == state_dict.keys()
    # FSDP names these itself: the expected files are its own.
    write_case(out, "fsdp1_test_config", wrapped, optim, None, state_dict, full_osd)

    dist.barrier()
    dist.destroy_process_group()
    if os.path.exists(store.name):
        os.unlink(store.name)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
