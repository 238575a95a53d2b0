"""The oracle for examples/train_test: trains a reference model in plain PyTorch (one process,
no FSDP) exactly as `train` does, and prints `step=<i> loss=<loss>` lines.

Usage: /usr/bin/python3 pytorch_train.py MODELS_TESTDATA_DIR MODEL OPTIMIZER LR STEPS [GROUPS]
GROUPS=2 (nested only) uses the PyTorch test's param_group0 and param_group1, the second with
weight_decay=0.9.
"""

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
    models_dir, model_name, optimizer, lr, steps = sys.argv[1:6]
    groups = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    sys.path.insert(0, models_dir)
    import reference_models as rm  # noqa: E402

    torch.set_num_threads(1)
    if model_name == "nested":
        model = rm.NestedModel()
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
    torch.manual_seed(0)
    for step in range(int(steps)):
        optim.zero_grad()
        loss = step_loss()
        loss.backward()
        optim.step()
        print(f"step={step} loss={loss.item():.9g}")


if __name__ == "__main__":
    main()
