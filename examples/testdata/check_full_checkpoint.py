"""Checks a full checkpoint written by `train --save=DIR` against plain PyTorch: loads
DIR/model.pt and DIR/optim.pt with torch.load(weights_only=True) (PyTorch 2.x's default: a
checkpoint needing any global beyond tensors and plain containers is refused), trains the same model for the same steps in
one process, and compares every parameter and every optimizer state entry (by FQN).

Usage: tools/python check_full_checkpoint.py MODELS_TESTDATA_DIR MODEL OPTIMIZER STEPS DIR
Exits 0 when everything matches to 1e-5, else prints the differences and exits 1.
"""

import sys

import torch


def main():
    models_dir, model_name, optimizer, steps, ckpt = sys.argv[1:6]
    sys.path.insert(0, sys.argv[0].rsplit("/", 1)[0])
    sys.path.insert(0, models_dir)
    import pytorch_train  # noqa: E402
    import reference_models as rm  # noqa: E402

    torch.set_num_threads(1)
    model = rm.NestedModel() if model_name == "nested" else rm.TransformerWithSharedParams(0)
    optim = pytorch_train.make_optimizer(optimizer, 0.01, model.parameters())
    torch.manual_seed(0)
    for _ in range(int(steps)):
        optim.zero_grad()
        if model_name == "nested":
            loss = model(torch.randn((8, 5))).sum()
        else:
            inputs = model.get_input()
            loss = model.get_loss(inputs, model(*inputs))
        loss.backward()
        optim.step()

    saved_model = torch.load(f"{ckpt}/model.pt", weights_only=True)
    saved_optim = torch.load(f"{ckpt}/optim.pt", weights_only=True)
    errors = []
    expected_model = model.state_dict()
    if set(saved_model) != set(expected_model):
        errors.append(f"model keys differ: {sorted(set(saved_model) ^ set(expected_model))}")
    for name, value in expected_model.items():
        if name in saved_model and not torch.allclose(saved_model[name], value, atol=1e-5, rtol=1e-5):
            errors.append(f"model.pt[{name!r}] differs")
    name_of = {id(p): n for n, p in model.named_parameters()}
    expected_state = {name_of[id(p)]: s for p, s in optim.state.items()}
    if set(saved_optim["state"]) != set(expected_state):
        errors.append(f"optim.pt state keys differ: {sorted(set(saved_optim['state']) ^ set(expected_state))}")
    for fqn, state in expected_state.items():
        got = saved_optim["state"].get(fqn, {})
        for key, value in state.items():
            if key not in got:
                errors.append(f"optim.pt state[{fqn!r}] lacks {key!r}")
            elif torch.is_tensor(value):
                if not torch.allclose(got[key].float(), value.float(), atol=1e-5, rtol=1e-5):
                    errors.append(f"optim.pt state[{fqn!r}][{key!r}] differs")
            elif got[key] != value:
                errors.append(f"optim.pt state[{fqn!r}][{key!r}] = {got[key]!r}, expected {value!r}")
    groups = saved_optim["param_groups"]
    if len(groups) != 1 or sorted(groups[0]["params"]) != sorted(expected_state):
        errors.append(f"optim.pt param_groups: {groups!r}")
    for key in ("lr", "betas", "eps", "weight_decay", "momentum"):
        if key in optim.param_groups[0] and groups and groups[0].get(key) != optim.param_groups[0][key]:
            errors.append(f"optim.pt param_groups[0][{key!r}] = {groups[0].get(key)!r}")
    for e in errors:
        print(e)
    print("checkpoint matches PyTorch" if not errors else f"{len(errors)} differences")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
