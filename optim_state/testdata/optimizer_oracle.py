"""PyTorch oracle for optim_state/optimizer_adapter_test.cc.

Run with the project's Python (PyTorch 2.13):

    tools/python optimizer_oracle.py OUT.json

For every case below, trains a small model with torch.optim for STEPS + 1 steps and writes,
as JSON: the initial parameters, each step's gradients (so the C++ test feeds LibTorch the
very same ones), and the parameters and `optim.state_dict()` after STEPS and STEPS + 1 steps.

The model: Linear(3, 4) -> Tanh -> Linear(4, 2) and a frozen extra parameter (never has a
gradient), in two parameter groups: [0.weight, 0.bias] with the optimizer's defaults and
[2.weight, 2.bias, frozen] with the case's overrides. 0.weight gets no gradient at the first
step, so it gains state one step after the others (state order 1, 2, 3, 0, as Python keeps
it). Group 1 lists every default in the defaults' order, which is how LibTorch's groups read
back (Python would otherwise put the overridden keys first).

Values are tagged so that int/float, tuple/list and None survive JSON:
{"type": "none" | "bool" | "int" | "float" | "str", "value": ...},
{"type": "tuple" | "list", "items": [...]},
{"type": "tensor", "dtype": "float32", "shape": [...], "values": [...]}.
A state dict is {"state": [[id, [[name, value], ...]], ...],
"param_groups": [{"hyper": [[name, value], ...], "params": [ids]}]}; lists keep order.
"""
import json
import sys

import torch
from torch import nn

STEPS = 3

# name -> (optimizer class, constructor defaults, group 1 overrides). Mirrored by kCases in
# optimizer_adapter_test.cc.
CASES = {
    "Adam": (torch.optim.Adam, dict(lr=0.01), dict(lr=0.02, weight_decay=0.1)),
    "AdamAmsgrad": (torch.optim.Adam, dict(lr=0.01, amsgrad=True), dict(weight_decay=0.1)),
    "AdamW": (torch.optim.AdamW, dict(lr=0.01), dict(weight_decay=0.05)),
    "AdamWAmsgrad": (torch.optim.AdamW, dict(lr=0.01, amsgrad=True), dict(lr=0.02)),
    "SGD": (torch.optim.SGD, dict(lr=0.1), dict(lr=0.05, weight_decay=0.1)),
    "SGDMomentum": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1),
                    dict(weight_decay=0.1)),
    "SGDNesterov": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True), dict(lr=0.05)),
    "Adagrad": (torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1),
                dict(weight_decay=0.1)),
    "RMSprop": (torch.optim.RMSprop, dict(lr=0.01), dict(weight_decay=0.1)),
    "RMSpropCenteredMomentum": (torch.optim.RMSprop,
                                dict(lr=0.01, momentum=0.9, centered=True), dict(alpha=0.9)),
}


def encode(value):
    if value is None:
        return {"type": "none"}
    if isinstance(value, bool):
        return {"type": "bool", "value": value}
    if isinstance(value, int):
        return {"type": "int", "value": value}
    if isinstance(value, float):
        return {"type": "float", "value": value}
    if isinstance(value, str):
        return {"type": "str", "value": value}
    if isinstance(value, torch.Tensor):
        return {"type": "tensor", "dtype": str(value.dtype).replace("torch.", ""),
                "shape": list(value.shape), "values": value.detach().flatten().tolist()}
    if isinstance(value, (tuple, list)):
        return {"type": "tuple" if isinstance(value, tuple) else "list",
                "items": [encode(v) for v in value]}
    raise TypeError(f"cannot encode {type(value)}")


def encode_state_dict(sd):
    return {
        "state": [[key, [[name, encode(v)] for name, v in state.items()]]
                  for key, state in sd["state"].items()],
        "param_groups": [{"hyper": [[name, encode(v)] for name, v in group.items()
                                    if name != "params"],
                          "params": list(group["params"])} for group in sd["param_groups"]],
    }


def run_case(cls, defaults, overrides):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    frozen = nn.Parameter(torch.randn(3), requires_grad=False)
    params = [model[0].weight, model[0].bias, model[2].weight, model[2].bias, frozen]
    out = {"initial_params": [encode(p) for p in params]}

    probe = cls([torch.zeros(1, requires_grad=True)], **defaults)
    group1 = {"params": params[2:]}
    for name, value in probe.defaults.items():
        group1[name] = overrides.get(name, value)
    optim = cls([{"params": params[:2]}, group1], **defaults)

    grads = []
    for step in range(STEPS + 1):
        x = torch.randn(5, 3)
        model(x).pow(2).sum().backward()
        if step == 0:
            params[0].grad = None
        grads.append([None if p.grad is None else encode(p.grad) for p in params])
        optim.step()
        optim.zero_grad(set_to_none=True)
        if step + 1 in (STEPS, STEPS + 1):
            suffix = "" if step + 1 == STEPS else "_next"
            out["state_dict" + suffix] = encode_state_dict(optim.state_dict())
            out["params" + suffix] = [encode(p) for p in params]
    out["grads"] = grads
    return out


def main():
    torch.set_num_threads(1)
    result = {"steps": STEPS, "torch_version": torch.__version__,
              "cases": {name: run_case(*spec) for name, spec in CASES.items()}}
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
