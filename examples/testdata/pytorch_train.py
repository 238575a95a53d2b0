"""The oracle for examples/train_test: trains a reference model in plain PyTorch (one process,
no FSDP) exactly as `train` does, and prints `step=<i> loss=<loss>` lines.

Usage: tools/python pytorch_train.py MODELS_TESTDATA_DIR MODEL OPTIMIZER LR STEPS [GROUPS
       [SAVE_AFTER SAVE_DIR PROTOCOL]]
GROUPS=2 (nested only) uses the PyTorch test's param_group0 and param_group1, the second with
weight_decay=0.9. With SAVE_AFTER=K it writes, after K steps, the full checkpoint a PyTorch FSDP
user writes: SAVE_DIR/model.pt (model.state_dict()) and SAVE_DIR/optim.pt (the optimizer state
keyed by parameter names, as FSDP.full_optim_state_dict lays it out), with torch.save's pickle
protocol PROTOCOL, plus SAVE_DIR/progress.txt (steps_done=K) for examples/train --load; then it
trains on. --clip_grad_norm=MAX (anywhere) clips with torch.nn.utils.clip_grad_norm_ before each
step, as train --clip_grad_norm does; --grad_accum=K runs K micro-batches per step, each loss
divided by K, as train --grad_accum does.
"""

import os
import sys

import torch


def make_optimizer(name, lr, params):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    raise SystemExit(f"unknown optimizer {name!r}")


def main():
    # --clip_grad_norm=MAX and --grad_accum=K anywhere (see the module docstring).
    flags = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
    sys.argv = [a for a in sys.argv if not a.startswith("--")]
    max_norm = float(flags.get("clip_grad_norm", 0))
    grad_accum = int(flags.get("grad_accum", 1))
    models_dir, model_name, optimizer, lr, steps = sys.argv[1:6]
    groups = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    sys.path.insert(0, models_dir)
    import reference_models as rm  # noqa: E402

    torch.set_num_threads(1)
    if model_name in ("nested", "nested_1.13"):
        model = rm.NestedModel(dims="1.13" if model_name == "nested_1.13" else "2.x")
        step_loss = lambda: model(torch.randn((8, 5))).sum()  # noqa: E731
    elif model_name == "transformer":
        model = rm.TransformerWithSharedParams(rank=0)

        def step_loss():
            inputs = model.get_input()
            return model.get_loss(inputs, model(*inputs))
    else:
        raise SystemExit(f"unknown model {model_name!r}")
    params = list(model.parameters())
    if groups == 2:
        params = [
            {"params": model.param_group0()},
            {"params": model.param_group1(), "weight_decay": 0.9},
        ]
    optim = make_optimizer(optimizer, float(lr), params)
    save_after = int(sys.argv[7]) if len(sys.argv) > 7 else -1
    torch.manual_seed(0)
    for step in range(int(steps)):
        optim.zero_grad()
        if grad_accum == 1:
            loss = step_loss()
            loss.backward()
        else:
            loss = 0.0
            for _ in range(grad_accum):
                micro = step_loss() / grad_accum
                micro.backward()
                loss += micro.detach().double()
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optim.step()
        print(f"step={step} loss={loss.item():.9g}")
        if step + 1 == save_after:
            save_full_checkpoint(model, optim, sys.argv[8], int(sys.argv[9]), save_after)


def full_state(model, optim):
    """(model state dict, optimizer state dict keyed by parameter names): FSDP's full layout."""
    names = {}
    for name, param in model.named_parameters():  # each tensor once, under its first name
        names.setdefault(id(param), name)
    raw = optim.state_dict()
    ids = [id(p) for group in optim.param_groups for p in group["params"]]
    state = {names[ids[i]]: value for i, value in raw["state"].items()}
    groups = []
    for group in raw["param_groups"]:
        group = dict(group)
        group["params"] = [names[ids[i]] for i in group["params"]]
        groups.append(group)
    return model.state_dict(), {"state": state, "param_groups": groups}


def save_full_checkpoint(model, optim, directory, protocol, steps_done):
    os.makedirs(directory, exist_ok=True)
    model_state, optim_state = full_state(model, optim)
    torch.save(model_state, os.path.join(directory, "model.pt"), pickle_protocol=protocol)
    torch.save(optim_state, os.path.join(directory, "optim.pt"), pickle_protocol=protocol)
    with open(os.path.join(directory, "progress.txt"), "w") as f:
        f.write(f"steps_done={steps_done}\n")


if __name__ == "__main__":
    main()
