"""Compares two full checkpoints (DIR/model.pt and DIR/optim.pt, pytorch_train.py's layout:
model state dict; {"state": {FQN: {...}}, "param_groups": [{..., "params": [FQN, ...]}]}).

Usage: python compare_checkpoints.py A_DIR B_DIR [--exact | --rtol R [--atol A]]
         [--ignore_param_order] [--quiet]

Loads every file with torch.load(weights_only=True) and reports every difference: missing and
extra keys (model, optimizer state, per-parameter state entries), param_groups (count,
`params` lists, each hyperparameter, keys only one side has), each tensor's dtype/shape, max
abs difference and whether it is bit-equal; and a scalar `step` on one side against a tensor
`step` on the other (numeric values still compared). progress.txt is compared when both have it.
--exact (the default) asks bit equality of every tensor; --rtol/--atol asks
torch.allclose(a, b, rtol, atol) (atol default 0). Exit 0 only if equal under the mode, 1 if
not, 2 on a file that does not load.

Last line, for grep:
  COMPARE: result=EQUAL|DIFFERENT mode=exact|rtol=R,atol=A tensors=N bit_equal=N max_abs_diff=X
           max_rel_diff=X key_diffs=N group_diffs=N
"""

import argparse
import math
import os
import sys

import torch


class Report:
    def __init__(self, exact, rtol, atol, quiet):
        self.exact, self.rtol, self.atol, self.quiet = exact, rtol, atol, quiet
        self.tensors = self.bit_equal = self.key_diffs = self.group_diffs = 0
        self.failures = 0
        self.max_diff = 0.0
        self.max_rel = 0.0  # max |a-b| / max(|a|, |b|) over floating tensors

    def say(self, msg):
        print(msg)

    def key(self, msg):
        self.key_diffs += 1
        self.failures += 1
        self.say(f"KEY {msg}")

    def group(self, msg):
        self.group_diffs += 1
        self.failures += 1
        self.say(f"GROUP {msg}")

    def tensor(self, where, a, b):
        self.tensors += 1
        if a.dtype != b.dtype or a.shape != b.shape:
            self.failures += 1
            self.say(f"TENSOR {where}: dtype/shape {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
            return
        bits = a.numel() == 0 or (
            torch.equal(a, b)
            and (not a.is_floating_point() or torch.equal(torch.signbit(a), torch.signbit(b)))
        )
        if a.is_floating_point() or a.is_complex():
            d = (a.double() - b.double()).abs()
            diff = d.max().item() if a.numel() else 0.0
            scale = torch.maximum(a.double().abs(), b.double().abs())
            rel = (d / scale.clamp_min(1e-30)).max().item() if a.numel() else 0.0
            self.max_rel = max(self.max_rel, rel)
        else:
            diff = float((a.long() - b.long()).abs().max().item()) if a.numel() else 0.0
        if math.isnan(diff):
            diff = math.inf if not torch.equal(a.isnan(), b.isnan()) else 0.0
        self.max_diff = max(self.max_diff, diff)
        if bits:
            self.bit_equal += 1
            ok = True
        elif self.exact:
            ok = False
        else:
            ok = torch.allclose(a.double(), b.double(), rtol=self.rtol, atol=self.atol,
                                equal_nan=True)
        if not ok:
            self.failures += 1
        if not bits or not self.quiet:
            tag = "equal" if bits else ("close" if ok else "DIFFERS")
            self.say(f"TENSOR {where}: {tag} max_abs_diff={diff:.3g} shape={list(a.shape)}")

    def value(self, where, a, b):
        """A non-tensor value (or tensor vs scalar)."""
        ta, tb = isinstance(a, torch.Tensor), isinstance(b, torch.Tensor)
        if ta and tb:
            return self.tensor(where, a, b)
        if ta or tb:
            self.say(
                f"NOTE {where}: {type(a).__name__} vs {type(b).__name__} "
                f"({a!r} vs {b!r})"
            )
            va = a.item() if ta and a.numel() == 1 else a
            vb = b.item() if tb and b.numel() == 1 else b
            if va != vb:
                self.failures += 1
                self.say(f"VALUE {where}: {va!r} != {vb!r}")
            return
        if isinstance(a, dict) and isinstance(b, dict):
            return self.mapping(where, a, b)
        if a != b:
            self.failures += 1
            self.say(f"VALUE {where}: {a!r} != {b!r}")

    def mapping(self, where, a, b):
        for k in sorted(set(a) | set(b), key=str):
            if k not in b:
                self.key(f"{where}[{k!r}] only in A")
            elif k not in a:
                self.key(f"{where}[{k!r}] only in B")
            else:
                self.value(f"{where}[{k!r}]", a[k], b[k])


def load(path):
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001
        print(f"LOAD {path}: {type(e).__name__}: {e}")
        sys.exit(2)


def compare_groups(r, ga, gb):
    if len(ga) != len(gb):
        r.group(f"param_groups: {len(ga)} groups vs {len(gb)}")
    for i, (a, b) in enumerate(zip(ga, gb)):
        pa, pb = list(a.get("params", [])), list(b.get("params", []))
        if pa != pb:
            if sorted(map(str, pa)) == sorted(map(str, pb)):
                (r.say if r.ignore_order else r.group)(
                    f"ORDER param_groups[{i}].params: same names, other order: {pa} vs {pb}"
                )
            else:
                r.group(
                    f"param_groups[{i}].params: only in A {sorted(set(pa) - set(pb))}, "
                    f"only in B {sorted(set(pb) - set(pa))}"
                )
        for k in sorted((set(a) | set(b)) - {"params"}):
            if k not in b:
                r.group(f"param_groups[{i}][{k!r}]={a[k]!r} only in A")
            elif k not in a:
                r.group(f"param_groups[{i}][{k!r}]={b[k]!r} only in B")
            elif isinstance(a[k], torch.Tensor) or isinstance(b[k], torch.Tensor):
                r.value(f"param_groups[{i}][{k!r}]", a[k], b[k])
            elif a[k] != b[k]:
                r.group(f"param_groups[{i}][{k!r}]: {a[k]!r} vs {b[k]!r}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--exact", action="store_true", help="bit equality (the default)")
    p.add_argument("--rtol", type=float, default=None)
    p.add_argument("--atol", type=float, default=0.0)
    p.add_argument(
        "--ignore_param_order",
        action="store_true",
        help="a group's params in another order is a NOTE, not a difference (FSDP1 lists them "
        "in FlatParameter order)",
    )
    p.add_argument("--quiet", action="store_true", help="do not list equal tensors")
    args = p.parse_args()
    exact = args.rtol is None or args.exact
    r = Report(exact, args.rtol or 0.0, args.atol, args.quiet)
    r.ignore_order = args.ignore_param_order

    ma = load(os.path.join(args.a, "model.pt"))
    mb = load(os.path.join(args.b, "model.pt"))
    r.mapping("model", ma, mb)

    oa = load(os.path.join(args.a, "optim.pt"))
    ob = load(os.path.join(args.b, "optim.pt"))
    for k in sorted((set(oa) | set(ob)) - {"state", "param_groups"}):
        r.key(f"optim[{k!r}] only in {'A' if k in oa else 'B'}")
    r.mapping("optim.state", oa.get("state", {}), ob.get("state", {}))
    compare_groups(r, oa.get("param_groups", []), ob.get("param_groups", []))

    pa, pb = os.path.join(args.a, "progress.txt"), os.path.join(args.b, "progress.txt")
    if os.path.exists(pa) and os.path.exists(pb):
        with open(pa) as fa, open(pb) as fb:
            ta, tb = fa.read().strip(), fb.read().strip()
        if ta != tb:
            r.failures += 1
            r.say(f"PROGRESS {ta!r} vs {tb!r}")

    mode = "exact" if exact else f"rtol={args.rtol},atol={args.atol}"
    result = "EQUAL" if r.failures == 0 else "DIFFERENT"
    print(
        f"COMPARE: result={result} mode={mode} tensors={r.tensors} bit_equal={r.bit_equal} "
        f"max_abs_diff={r.max_diff:.3g} max_rel_diff={r.max_rel:.3g} key_diffs={r.key_diffs} group_diffs={r.group_diffs}"
    )
    sys.exit(0 if r.failures == 0 else 1)


if __name__ == "__main__":
    main()
