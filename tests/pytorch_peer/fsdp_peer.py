"""The PyTorch side of the live-peer conformance suite: trains a reference model with real
PyTorch FSDP (FSDP1 = FullyShardedDataParallel, FSDP2 = fully_shard) on CPU over Gloo, exactly
as examples/train does (same model, seeds, per-step batch on every rank, optimizer, wrapping),
prints per-step losses and writes/loads full checkpoints through FSDP's own state-dict APIs.

Run under torchrun (the world size comes from the environment):
  PY=tools/python
  $PY -m torch.distributed.run --standalone --nproc_per_node=2 tests/pytorch_peer/fsdp_peer.py \
      --models_dir models/testdata --model nested --optimizer adam --lr 0.01 --steps 5 \
      --fsdp 1 --sharding_strategy full_shard --wrap wrap
Or let the script launch torchrun itself (exit code 77 survives then):
  $PY tests/pytorch_peer/fsdp_peer.py --nproc_per_node=2 --models_dir models/testdata ...
--fsdp 0 trains the unwrapped model (no process group needed; plain `$PY fsdp_peer.py ...` works):
the one-process oracle, also for --model dummy, which examples/testdata/pytorch_train.py lacks.

Rank 0 prints `step=<i> loss=<%.9g> loss_hex=<float.hex>` per step (the loss as a Python float,
i.e. the float32 loss widened to double), `--loss_log FILE` gets `<step> <%.9g>` lines like
examples/train's. `--steps N` is the number of steps to run, after the loaded steps_done when
--load is given (as examples/train: steps_done .. steps_done+N-1); pytorch_train.py's STEPS is
the total instead.

Checkpoints (rank 0 writes, pytorch_train.py's layout): DIR/model.pt (full model state dict),
DIR/optim.pt ({"state": {FQN: {...}}, "param_groups": [{..., "params": [FQN, ...]}]}) and
DIR/progress.txt (steps_done=K). Written after step K-1 with --save_after K, or after the last
step when --save_after is 0. They come from FSDP1's FULL_STATE_DICT model.state_dict() and
FSDP.optim_state_dict (rank0_only, offload_to_cpu), or FSDP2's get_model_state_dict /
get_optimizer_state_dict with StateDictOptions(full_state_dict=True, cpu_offload=True).
--save_format dcp writes a torch.distributed.checkpoint directory instead (dcp.save of
get_state_dict's sharded dicts, every rank its own shards, under --dcp_layout's keys; rank 0 adds
DIR/progress.txt). --load DIR loads a full checkpoint (FSDP1: load_state_dict under FULL_STATE_DICT +
FSDP.optim_state_dict_to_load; FSDP2: set_model_state_dict / set_optimizer_state_dict with
full_state_dict=True), draws and drops the batches of the steps done, and trains on.

--dump_grads DIR (FSDP1 or --fsdp 0) trains nothing: every rank runs --backwards K forward and
backward passes (no optimizer step, no zero_grad in between) on inputs drawn per rank and per
pass (manual_seed(grad_dump_seed(k, rank)), then the model's batch), and writes what FSDP
reduced: DIR/rank<r>.txt lists, one line each,
  unit fqns=<FQN,...> numel=<n> file=<name>      each FSDP unit's flat gradient as it is after
                                                 the passes (FSDP1 without use_orig_params: this
                                                 rank's padded shard; file=none: no gradient)
  local pass=<k> fqn=<FQN> numel=<n> file=<name> the unwrapped model's gradient of pass k on this
                                                 rank's input alone (what goes into the reduction)
  (--no_sync: every pass but the last runs under FSDP.no_sync(), so the last reduces them all)
  clip total_norm=<x> float32_bits=<hex>         with --clip_grad_norm MAX,P: what
                                                 FSDP.clip_grad_norm_(MAX, P) returned (the unit
                                                 gradients above are then the clipped ones)
with raw little-endian float32 files beside it. --nested_dims IN0,OUT0,IN1,OUT1 builds
NestedModel with block0 = BlockB(IN0, OUT0) and block1 = BlockB(IN1, OUT1) (PyTorch 1.13's
test file: 5,7,7,7; 2.x: 5,3,3,7), so a caller can match the C++ model it built.
--sharding_strategy=hybrid_shard|hybrid_shard_zero2 with --shard_group_size K shards over K-rank
groups of a (world / K, K) device mesh and replicates across them (MakeHybridShardGroups' layout).
--mixed_precision PARAM[,REDUCE[,BUFFER]] (bf16, fp16, fp32; an empty field leaves that dtype
unset) wraps with FSDP1's MixedPrecision or FSDP2's MixedPrecisionPolicy, as examples/train's
flag of that name does with ours. --backward_prefetch none|backward_pre|backward_post,
--forward_prefetch and --limit_all_gathers true|false are FSDP1's arguments of those names
(examples/train's flags; FSDP1 only).

Exit codes: 0 ok; 77 with `SKIP: <reason>` on stdout for a configuration PyTorch 2.13 cannot run
on CPU (measured, see README.md); 2 for bad flags. Under a bare torchrun a skip exits 1 (torchrun
reports any failing rank as 1): look for the `SKIP:` line, or use --nproc_per_node.
"""

import argparse
import datetime
import os
import sys
import time

import warnings

import torch

# FSDP1's state_dict_type deprecation and Gloo's default-device notes, once per rank per call.
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*_get_pg_default_device.*")
warnings.filterwarnings("ignore", message=".*barrier.*device.*")

SKIP_EXIT = 77

# The modules each wrapping makes FSDP units of, inner first (models/nested_model.h,
# models/transformer.h layer_slots()); the bool is whether the root is a unit too.
WRAPPINGS = {
    ("nested", "wrap"): (
        [
            "block1.bias_module0",
            "block1",
            "block2.1.bias_module0",
            "block2.1.bias_module1",
            "block2.1",
            "block2.2",
        ],
        False,
    ),
    ("nested", "wrap_alt"): (["block0.bias_module0", "block0"], False),
    # NestedModel.wrap's units under a root unit (FSDP.clip_grad_norm_ needs a root).
    ("nested", "wrap_root"): (
        [
            "block1.bias_module0",
            "block1",
            "block2.1.bias_module0",
            "block2.1.bias_module1",
            "block2.1",
            "block2.2",
        ],
        True,
    ),
    ("nested", "none"): ([], True),
    ("transformer", "layers"): (
        [
            "transformer.encoder.layers.0",
            "transformer.encoder.layers.1",
            "transformer.decoder.layers.0",
            "transformer.decoder.layers.1",
        ],
        True,
    ),
    ("transformer", "none"): ([], True),
    ("dummy", "none"): ([], True),
}
DEFAULT_WRAP = {"nested": "wrap", "transformer": "layers", "dummy": "none"}


def skip(reason):
    """Every rank exits 77; rank 0 says why (the ranks meet the same condition)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"SKIP: {reason}", flush=True)
    sys.stdout.flush()
    if torch.distributed.is_initialized():
        # Else torchrun may kill rank 0 (after another rank's exit) before it has printed.
        try:
            torch.distributed.barrier()
        except Exception:  # noqa: BLE001
            pass
    os._exit(SKIP_EXIT)  # no teardown


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models_dir", required=True, help="models/testdata (reference_models.py)")
    p.add_argument("--model", default="nested", choices=["nested", "transformer", "dummy"])
    p.add_argument(
        "--optimizer", default="adam", choices=["adam", "adamw", "sgd", "adagrad", "rmsprop"]
    )
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--param_groups", type=int, default=1, choices=[1, 2])
    p.add_argument("--fsdp", type=int, default=1, choices=[0, 1, 2], help="0: unwrapped model")
    p.add_argument(
        "--sharding_strategy",
        default="full_shard",
        choices=["full_shard", "shard_grad_op", "no_shard", "hybrid_shard", "hybrid_shard_zero2"],
    )
    p.add_argument(
        "--shard_group_size",
        type=int,
        default=0,
        help="hybrid_shard*: ranks per shard group (a (world/K, K) mesh: replicate, shard)",
    )
    p.add_argument("--use_orig_params", action="store_true", help="FSDP1 only")
    p.add_argument("--wrap", default="", help="nested: wrap|wrap_alt|none; transformer: layers|none")
    p.add_argument("--save_after", "--save_at_step", type=int, default=0, dest="save_after")
    p.add_argument("--save_dir", "--save", default="", dest="save_dir")
    p.add_argument(
        "--save_format",
        default="full",
        choices=["full", "dcp"],
        help="dcp: dcp.save of get_state_dict's sharded dicts (FSDP1, FSDP2), + progress.txt",
    )
    p.add_argument(
        "--dcp_layout",
        default="torchtitan",
        choices=["torchtitan", "tutorial"],
        help='{"model", "optimizer"} or {"app": {"model", "optim"}}',
    )
    p.add_argument("--load", default="", help="a full checkpoint, or a DCP directory")
    p.add_argument("--compare_full", default="",
                   help="with a DCP --load: rank 0 compares its dcp_to_torch_save with this "
                        "full checkpoint of the same state")
    p.add_argument("--loss_log", default="")
    p.add_argument(
        "--nproc_per_node",
        type=int,
        default=0,
        help="launch torchrun with this many ranks on this script (exit 77 if a rank skipped)",
    )
    p.add_argument("--dump_grads", default="", help="write the reduced gradients here and stop")
    p.add_argument("--backwards", type=int, default=1, help="--dump_grads: backward passes")
    p.add_argument(
        "--no_sync",
        action="store_true",
        help="--dump_grads: every pass but the last under FSDP's no_sync() (root unit)",
    )
    p.add_argument(
        "--clip_grad_norm",
        default="",
        help="--dump_grads: MAX_NORM,NORM_TYPE: FSDP.clip_grad_norm_ after the passes (root unit)",
    )
    p.add_argument("--nested_dims", default="", help="IN0,OUT0,IN1,OUT1 of block0 and block1")
    p.add_argument(
        "--mixed_precision",
        default="",
        help="PARAM[,REDUCE[,BUFFER]] dtypes (bf16, fp16, fp32): FSDP1's MixedPrecision, FSDP2's "
        "MixedPrecisionPolicy(param_dtype, reduce_dtype) (examples/train's --mixed_precision)",
    )
    p.add_argument(
        "--backward_prefetch",
        default="backward_pre",
        choices=["none", "backward_pre", "backward_post"],
        help="FSDP1's backward_prefetch (examples/train's flag)",
    )
    p.add_argument("--forward_prefetch", action="store_true", help="FSDP1's forward_prefetch")
    p.add_argument(
        "--limit_all_gathers",
        default="true",
        choices=["true", "false"],
        help="FSDP1's limit_all_gathers",
    )
    p.add_argument("--timeout_s", type=int, default=120, help="collective timeout, seconds")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = p.parse_args(argv)
    args.wrap = args.wrap or DEFAULT_WRAP[args.model]
    if (args.model, args.wrap) not in WRAPPINGS:
        p.error(f"--wrap={args.wrap} is not valid for --model={args.model}")
    if args.param_groups == 2 and args.model != "nested":
        p.error("--param_groups=2 is NestedModel's param_group0/param_group1 only")
    if args.save_after < 0:
        p.error("--save_after is negative")
    if args.nested_dims:
        try:
            args.nested_dims = [int(d) for d in args.nested_dims.split(",")]
        except ValueError:
            args.nested_dims = []
        if len(args.nested_dims) != 4 or args.model != "nested":
            p.error("--nested_dims takes IN0,OUT0,IN1,OUT1, with --model nested")
    try:
        args.mixed_precision = parse_mixed_precision(args.mixed_precision)
    except ValueError as e:
        p.error(f"--mixed_precision: {e}")
    if args.sharding_strategy.startswith("hybrid") and args.shard_group_size < 1:
        p.error("--sharding_strategy=hybrid_shard* needs --shard_group_size")
    if args.dump_grads and (args.fsdp == 2 or args.use_orig_params or args.backwards < 1):
        p.error("--dump_grads: FSDP1 without --use_orig_params (or 0), --backwards >= 1")
    return args


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_mixed_precision(text):
    """'bf16', 'bf16,fp32', ',bf16', 'bf16,bf16,bf16' -> (param, reduce, buffer) dtypes or None;
    '' -> None (no mixed precision)."""
    if not text or text == "none":
        return None
    fields = text.split(",")
    if len(fields) > 3 or any(f and f not in DTYPES for f in fields):
        raise ValueError(f"{text!r}: PARAM[,REDUCE[,BUFFER]] of {sorted(DTYPES)}")
    fields += [""] * (3 - len(fields))
    return tuple(DTYPES[f] if f else None for f in fields)


def oracle():
    """examples/testdata/pytorch_train.py, the one-process oracle, as a module."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                    "examples", "testdata"))
    import pytorch_train  # noqa: E402

    return pytorch_train


def make_optimizer(name, lr, params):
    # The oracle's optimizers, hyper-parameters included.
    return oracle().make_optimizer(name, lr, params)


def nested_model(rm, dims):
    """rm.NestedModel, or with block0 = BlockB(dims[0], dims[1]) and block1 = BlockB(dims[2],
    dims[3]): built as NestedModel.__init__ builds, in the same order (each block seeds the
    generator itself; `bias` is drawn from where block1 left it)."""
    if not dims:
        return rm.NestedModel()
    model = rm.NestedModel.__new__(rm.NestedModel)
    torch.nn.Module.__init__(model)
    model.block0 = rm.BlockB(dims[0], dims[1])
    model.block1 = rm.BlockB(dims[2], dims[3])
    model.bias = torch.nn.Parameter(torch.randn((5,)))
    model.block2 = torch.nn.Sequential(rm.BlockA(dims[3], 9), rm.BlockA(9, 9), rm.BlockB(9, 5))
    model.relu = torch.nn.ReLU()
    return model


def build_model(rm, name, nested_dims=None):
    """Returns (model, next_batch, loss_fn): next_batch() draws one step's inputs (a tuple) from
    the default generator as examples/train does; loss_fn(model, inputs) is the step's loss."""
    if name == "nested":
        model = nested_model(rm, nested_dims)
        return model, lambda: (torch.randn((8, 5)),), lambda m, x: m(*x).sum()
    if name == "transformer":
        model = rm.TransformerWithSharedParams(rank=0)  # eval(): dropout off
        return model, model.get_input, lambda m, x: model.get_loss(x, m(*x))
    model = rm.TestDummyModel()
    return model, lambda: (torch.rand(8, 8),), lambda m, x: m(*x).sum()


def hybrid_mesh(args):
    """HYBRID_SHARD's 2-D mesh: (world / K) replicas of K-rank shard groups (MakeHybridShardGroups)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = torch.distributed.get_world_size()
    k = args.shard_group_size
    if world % k:
        print(f"peer: --shard_group_size={k} does not divide the world size {world}", flush=True)
        sys.exit(2)
    return init_device_mesh("cpu", (world // k, k), mesh_dim_names=("replicate", "shard"))


def wrap_fsdp1(model, units, wrap_root, args):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import BackwardPrefetch, ShardingStrategy

    kwargs = dict(
        sharding_strategy={
            "full_shard": ShardingStrategy.FULL_SHARD,
            "shard_grad_op": ShardingStrategy.SHARD_GRAD_OP,
            "no_shard": ShardingStrategy.NO_SHARD,
            "hybrid_shard": ShardingStrategy.HYBRID_SHARD,
            "hybrid_shard_zero2": ShardingStrategy._HYBRID_SHARD_ZERO2,
        }[args.sharding_strategy],
        use_orig_params=args.use_orig_params,
        device_id=torch.device("cpu"),  # without it FSDP1 refuses CPU
        backward_prefetch={
            "none": None,
            "backward_pre": BackwardPrefetch.BACKWARD_PRE,
            "backward_post": BackwardPrefetch.BACKWARD_POST,
        }[args.backward_prefetch],
        forward_prefetch=args.forward_prefetch,
        limit_all_gathers=args.limit_all_gathers == "true",
    )
    if args.sharding_strategy.startswith("hybrid"):
        kwargs["device_mesh"] = hybrid_mesh(args)
    if args.mixed_precision:
        from torch.distributed.fsdp import MixedPrecision

        param, reduce, buffer = args.mixed_precision
        kwargs["mixed_precision"] = MixedPrecision(
            param_dtype=param, reduce_dtype=reduce, buffer_dtype=buffer
        )
    for path in units:  # inner first, in place, so names do not change
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, FSDP(getattr(parent, attr), **kwargs))
    return FSDP(model, **kwargs) if wrap_root else model


def wrap_fsdp2(model, units, wrap_root, args):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = torch.distributed.get_world_size()
    if args.sharding_strategy.startswith("hybrid"):
        mesh = hybrid_mesh(args)
    elif args.sharding_strategy == "no_shard":
        # NO_SHARD's FSDP2 form: HSDP replicating over every rank with shards of one rank.
        mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world,))
    kwargs = dict(
        mesh=mesh, reshard_after_forward=args.sharding_strategy in ("full_shard", "hybrid_shard")
    )
    if args.mixed_precision:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        param, reduce, buffer = args.mixed_precision
        if buffer is not None:
            skip("FSDP2's MixedPrecisionPolicy has no buffer_dtype")
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce)
    for path in units:
        fully_shard(model.get_submodule(path), **kwargs)
    if wrap_root:
        fully_shard(model, **kwargs)
    return model


def inner(model):
    """The user's module (FSDP1 wraps the root in a FullyShardedDataParallel)."""
    return getattr(model, "module", model) if type(model).__name__ == "FullyShardedDataParallel" \
        else model


def make_params(model, args):
    if args.param_groups == 1:
        return list(model.parameters())
    m = inner(model)
    g0, g1 = m.param_group0(), m.param_group1()
    if not g0 or not g1:
        skip(
            "--param_groups=2 needs block1/block2/block0's parameters, but with the root wrapped "
            "and use_orig_params off FSDP1 flattens them all into the root's FlatParameter "
            f"(param_group0 has {len(g0)} tensors, param_group1 {len(g1)}; torch.optim accepts "
            "the empty groups, so the run would train nothing)"
        )
    return [{"params": g0}, {"params": g1, "weight_decay": 0.9}]


# --- checkpoints ----------------------------------------------------------------------------


def plain_full_state(model, optim):
    """pytorch_train.py's save_full_checkpoint layout, for the unwrapped model."""
    return oracle().full_state(model, optim)


def plain_load(model, optim, msd, osd):
    model.load_state_dict(msd)
    names = {}
    for name, param in model.named_parameters():
        names.setdefault(id(param), name)
    index = {}
    for group in optim.param_groups:
        for p in group["params"]:
            index[names[id(p)]] = len(index)
    state = {index[k]: v for k, v in osd["state"].items()}
    groups = []
    for group in osd["param_groups"]:
        group = dict(group)
        group["params"] = [index[k] for k in group["params"]]
        groups.append(group)
    optim.load_state_dict({"state": state, "param_groups": groups})


def fsdp1_state_dict_type(model, rank0_only):
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # offload_to_cpu must be False for both on CPU in 2.13 (the tensors are on the CPU anyway):
    # - FullStateDictConfig(offload_to_cpu=True): model.state_dict() raises "setStorage: sizes
    #   [49], strides [1], storage offset 0, and itemsize 4 requiring a storage size of 196 are
    #   out of bounds for storage of size 0" (and the ranks then hang in the next collective).
    # - FullOptimStateDictConfig(offload_to_cpu=True) (its default) with use_orig_params=True:
    #   _allgather_orig_param_states gathers every state name into one reused buffer and skips
    #   the clone when offloading, and .cpu() of a CPU tensor is the tensor itself, so every
    #   state of an FSDP-managed parameter aliases that buffer: Adam's exp_avg comes out equal
    #   to exp_avg_sq.
    FSDP.set_state_dict_type(
        model,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
    )


def full_state(model, optim, args):
    """(model state dict, FQN-keyed optimizer state dict), full on rank 0."""
    if args.fsdp == 0:
        return plain_full_state(model, optim)
    if args.fsdp == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        fsdp1_state_dict_type(model, rank0_only=True)
        msd = model.state_dict()
        try:
            osd = FSDP.optim_state_dict(model, optim)
        except RuntimeError as e:  # every rank raises it, before any collective
            if "is not in the optimizer state" in str(e):
                skip(f"FSDP.optim_state_dict: {str(e).splitlines()[0][:200]}...")
            raise
        return msd, osd
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(
        model, optim, options=opts
    )


def save_dcp(model, optim, args):
    """dcp.save of each rank's shards, nested as torchtitan or the DCP tutorial nest them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optim)
    if args.dcp_layout == "torchtitan":
        state = {"model": msd, "optimizer": osd}
    else:  # what the tutorial's AppState.state_dict() returns, under "app"
        state = {"app": {"model": msd, "optim": osd}}
    dcp.save(state, checkpoint_id=args.save_dir)


def save_checkpoint(model, optim, args, rank, steps_done):
    start = time.monotonic()
    if args.save_format == "dcp":
        save_dcp(model, optim, args)
    else:
        msd, osd = full_state(model, optim, args)
        if rank == 0:
            os.makedirs(args.save_dir, exist_ok=True)
            torch.save(msd, os.path.join(args.save_dir, "model.pt"))
            torch.save(osd, os.path.join(args.save_dir, "optim.pt"))
    if rank == 0:
        with open(os.path.join(args.save_dir, "progress.txt"), "w") as f:
            f.write(f"steps_done={steps_done}\n")
        print(
            f"peer: saved {args.save_format} {args.save_dir} ({steps_done} steps done) in "
            f"{time.monotonic() - start:.2f} s",
            flush=True,
        )
    if args.fsdp:
        torch.distributed.barrier()


def load_checkpoint(model, optim, args):
    """Loads --load's checkpoint on every rank; returns its steps_done."""
    steps_done = 0
    with open(os.path.join(args.load, "progress.txt")) as f:
        for line in f:
            if line.startswith("steps_done="):
                steps_done = int(line.strip().split("=", 1)[1])
    if os.path.exists(os.path.join(args.load, ".metadata")):
        load_dcp_checkpoint(model, optim, args)
        return steps_done
    msd = torch.load(os.path.join(args.load, "model.pt"), weights_only=True)
    osd = torch.load(os.path.join(args.load, "optim.pt"), weights_only=True)
    if args.fsdp == 0:
        plain_load(model, optim, msd, osd)
    elif args.fsdp == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        fsdp1_state_dict_type(model, rank0_only=False)
        model.load_state_dict(msd)
        optim.load_state_dict(FSDP.optim_state_dict_to_load(model, optim, osd))
    else:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, msd, options=opts)
        set_optimizer_state_dict(model, optim, osd, options=opts)
    return steps_done


def load_dcp_checkpoint(model, optim, args):
    """A torch.distributed.checkpoint directory in torchtitan's layout, loaded as torchtitan
    resumes: the state dicts of the job's own model and optimizer, filled by dcp.load in place
    (each rank reading the chunks its shards overlap), then set."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optim)
    state = {"model": msd, "optimizer": osd}
    dcp.load(state, checkpoint_id=args.load, no_dist=not args.fsdp)
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def compare_dcp_with_full(dcp_dir, full_dir):
    """dcp_to_torch_save of DCP_DIR against the full checkpoint FULL_DIR (model.pt, optim.pt)
    of the same state: every tensor bit for bit, the same keys and param_groups."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(dcp_dir, os.path.join(tmp, "converted.pt"))
        conv = torch.load(os.path.join(tmp, "converted.pt"), weights_only=True)
    msd = torch.load(os.path.join(full_dir, "model.pt"), weights_only=True)
    osd = torch.load(os.path.join(full_dir, "optim.pt"), weights_only=True)
    pairs = [(f"model.{k}", conv["model"].get(k), v) for k, v in msd.items()]
    for fqn, st in osd["state"].items():
        for name, v in st.items():
            pairs.append((f"optimizer.state.{fqn}.{name}",
                          conv["optimizer"]["state"].get(fqn, {}).get(name), v))
    differ = [key for key, got, want in pairs
              if not isinstance(got, torch.Tensor) or got.dtype != want.dtype
              or got.shape != want.shape
              or not torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))]
    keys_equal = (set(conv["model"]) == set(msd)
                  and set(conv["optimizer"]["state"]) == set(osd["state"]))

    def groups(gs):
        return [{k: (sorted(v) if k == "params" else v) for k, v in g.items()} for g in gs]

    same_groups = groups(conv["optimizer"]["param_groups"]) == groups(osd["param_groups"])
    print(f"dcp_vs_full: {len(pairs)} tensors, {len(differ)} differ {differ[:5]}, keys "
          f"{'equal' if keys_equal else 'differ'}, param_groups "
          f"{'equal' if same_groups else 'differ'}", flush=True)


# --- reduced gradients (--dump_grads) ----------------------------------------------------------


def grad_dump_seed(k, rank):
    """The seed of backward pass k's input on `rank` (the C++ side draws the same)."""
    return 1000 + 100 * k + rank


def write_tensor(dir_, name, tensor):
    with open(os.path.join(dir_, name), "wb") as f:
        f.write(tensor.detach().contiguous().to(torch.float32).numpy().tobytes())


def dump_grads(model, plain, next_batch, loss_fn, args, rank):
    """--dump_grads: runs the passes on the FSDP model and, pass by pass, on `plain` (the same
    model unwrapped), and writes both as the module docstring says."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp._common_utils import clean_tensor_name

    os.makedirs(args.dump_grads, exist_ok=True)
    lines = []
    for k in range(args.backwards):
        torch.manual_seed(grad_dump_seed(k, rank))
        inputs = next_batch()
        if args.no_sync and k < args.backwards - 1:
            with model.no_sync():
                loss_fn(model, inputs).backward()
        else:
            loss_fn(model, inputs).backward()
        plain.zero_grad(set_to_none=True)
        loss_fn(plain, inputs).backward()
        for fqn, param in plain.named_parameters():
            if param.grad is None:
                continue
            name = f"rank{rank}_pass{k}_{fqn}.bin"
            write_tensor(args.dump_grads, name, param.grad.reshape(-1))
            lines.append(f"local pass={k} fqn={fqn} numel={param.numel()} file={name}")
    if args.clip_grad_norm:
        max_norm, norm_type = args.clip_grad_norm.split(",")
        total = model.clip_grad_norm_(float(max_norm), float(norm_type))
        bits = total.to(torch.float32).reshape(1).numpy().tobytes().hex()
        lines.append(f"clip total_norm={total.item()!r} float32_bits={bits}")
    units = [(n, m) for n, m in model.named_modules() if isinstance(m, FSDP)]
    for i, (path, unit) in enumerate(units):
        handle = unit._handle
        if handle is None:
            continue
        flat = handle.flat_param
        prefix = clean_tensor_name(path) + "." if path else ""
        fqns = ",".join(prefix + clean_tensor_name(f) for f in flat._fqns)
        if flat.grad is None:
            lines.append(f"unit fqns={fqns} numel=0 file=none")
            continue
        name = f"rank{rank}_unit{i}.bin"
        write_tensor(args.dump_grads, name, flat.grad)
        lines.append(f"unit fqns={fqns} numel={flat.grad.numel()} file={name}")
    with open(os.path.join(args.dump_grads, f"rank{rank}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"peer: rank {rank} wrote {len(units)} units' gradients to {args.dump_grads}", flush=True)


# --- main -----------------------------------------------------------------------------------


def launch(args, argv):
    """Runs this script under torchrun --standalone with --nproc_per_node ranks, echoing its
    output. torchrun turns a rank's exit code 77 into 1, so this maps a failed run that printed
    `SKIP:` back to 77."""
    import subprocess

    rest, skip_next = [], False
    for a in argv:
        if skip_next:
            skip_next = False
        elif a == "--nproc_per_node":
            skip_next = True
        elif not a.startswith("--nproc_per_node="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={args.nproc_per_node}", os.path.abspath(__file__)] + rest
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    skipped = False
    for line in proc.stdout:
        skipped |= line.startswith("SKIP:") or "(exitcode: 77)" in line
        sys.stdout.write(line)
        sys.stdout.flush()
    rc = proc.wait()
    sys.exit(SKIP_EXIT if rc != 0 and skipped else rc)


def main(argv):
    args = parse_args(argv)
    if args.nproc_per_node and "RANK" not in os.environ:
        launch(args, argv)
    t0 = time.monotonic()
    sys.path.insert(0, os.path.abspath(args.models_dir))
    import reference_models as rm  # noqa: E402

    torch.set_num_threads(args.threads)
    rank = 0
    if args.fsdp:
        if "RANK" not in os.environ:
            raise SystemExit("--fsdp 1|2 runs under torchrun (RANK/WORLD_SIZE unset)")
        torch.distributed.init_process_group(
            "gloo", timeout=datetime.timedelta(seconds=args.timeout_s)
        )
        rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size() if args.fsdp else 1

    model, next_batch, loss_fn = build_model(rm, args.model, args.nested_dims)
    plain = build_model(rm, args.model, args.nested_dims)[0] if args.dump_grads else None
    units, wrap_root = WRAPPINGS[(args.model, args.wrap)]
    if args.fsdp == 1:
        model = wrap_fsdp1(model, units, wrap_root, args)
    elif args.fsdp == 2:
        if args.use_orig_params:
            print("peer: --use_orig_params has no meaning for FSDP2 (always original params)")
        model = wrap_fsdp2(model, units, wrap_root, args)
    if args.dump_grads:
        dump_grads(model, plain, next_batch, loss_fn, args, rank)
        if args.fsdp:
            torch.distributed.barrier()
        sys.stdout.flush()
        os._exit(0)  # as at the end of main
    optim = make_optimizer(args.optimizer, args.lr, make_params(model, args))

    first_step = load_checkpoint(model, optim, args) if args.load else 0
    if args.compare_full and rank == 0:
        compare_dcp_with_full(args.load, args.compare_full)
    if rank == 0:
        print(
            f"peer: torch={torch.__version__} model={args.model} fsdp={args.fsdp} "
            f"world_size={world} strategy={args.sharding_strategy} "
            f"use_orig_params={int(args.use_orig_params)} wrap={args.wrap} "
            f"optimizer={args.optimizer} lr={args.lr} param_groups={args.param_groups} "
            f"first_step={first_step}",
            flush=True,
        )
    log = open(args.loss_log, "w") if args.loss_log and rank == 0 else None
    torch.manual_seed(0)
    for _ in range(first_step):  # a resumed run draws and drops the batches already used
        next_batch()
    last = None
    for step in range(first_step, first_step + args.steps):
        optim.zero_grad()
        loss = loss_fn(model, next_batch())
        loss.backward()
        optim.step()
        last = loss.item()
        if rank == 0:
            print(f"step={step} loss={last:.9g} loss_hex={float.hex(last)}", flush=True)
            if log:
                log.write(f"{step} {last:.9g}\n")
                log.flush()
        if args.save_dir and args.save_after > 0 and step + 1 == args.save_after:
            save_checkpoint(model, optim, args, rank, step + 1)
    if args.save_dir and args.save_after == 0:
        save_checkpoint(model, optim, args, rank, first_step + args.steps)
    if log:
        log.close()
    if rank == 0:
        print(
            f"peer: done, {args.steps} steps, final loss {last!r}, "
            f"{time.monotonic() - t0:.2f} s after start-up",
            flush=True,
        )
    if args.fsdp:
        # Ranks sometimes abort at exit, after all the work ("terminate called without an active
        # exception", SIGABRT, in FSDP1 and FSDP2 runs, with or without destroy_process_group
        # after a barrier), which makes torchrun fail the job: leave at once after a barrier.
        torch.distributed.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
