"""Runs fsdp_peer.py over a list of configurations (one torchrun at a time) and compares each
run's per-step losses and checkpoint with the unwrapped model's (fsdp_peer.py --fsdp 0, itself
checked against examples/testdata/pytorch_train.py where that script has the model).

Usage (from the repository root):
  $PY tests/pytorch_peer/run_matrix.py OUT_DIR [--only SUBSTRING] [--steps 5] [--save_after 3]
Prints one table row per configuration and writes OUT_DIR/table.md; logs in OUT_DIR/logs/.
"""

import argparse
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PEER = os.path.join(HERE, "fsdp_peer.py")
COMPARE = os.path.join(HERE, "compare_checkpoints.py")
ORACLE = os.path.join(ROOT, "examples", "testdata", "pytorch_train.py")
MODELS = os.path.join(ROOT, "models", "testdata")

# (fsdp, world, model, wrap, optimizer, groups, strategy, use_orig_params)
CONFIGS = [
    (1, 2, "nested", "wrap", "adam", 1, "full_shard", False),
    (1, 2, "nested", "wrap", "adam", 2, "full_shard", False),
    (1, 3, "nested", "wrap", "adagrad", 2, "full_shard", False),
    (1, 4, "nested", "wrap", "rmsprop", 1, "full_shard", False),
    (1, 2, "nested", "wrap", "sgd", 1, "shard_grad_op", False),
    (1, 3, "nested", "wrap", "adamw", 2, "no_shard", False),
    (1, 2, "nested", "wrap_alt", "adam", 2, "full_shard", True),
    (1, 3, "nested", "none", "adam", 1, "full_shard", False),
    (1, 2, "nested", "none", "adam", 2, "full_shard", True),
    (1, 2, "nested", "none", "adam", 2, "full_shard", False),
    (1, 4, "nested", "wrap", "sgd", 2, "shard_grad_op", True),
    (1, 2, "transformer", "layers", "adam", 1, "full_shard", False),
    (1, 3, "transformer", "layers", "sgd", 1, "full_shard", True),
    (1, 4, "transformer", "none", "adamw", 1, "no_shard", False),
    (1, 2, "dummy", "none", "adam", 1, "full_shard", False),
    (1, 3, "dummy", "none", "rmsprop", 1, "shard_grad_op", True),
    (2, 2, "nested", "wrap", "adam", 1, "full_shard", False),
    (2, 2, "nested", "wrap", "adam", 2, "full_shard", False),
    (2, 3, "nested", "wrap", "adagrad", 2, "full_shard", False),
    (2, 4, "nested", "wrap", "rmsprop", 1, "full_shard", False),
    (2, 2, "nested", "wrap", "sgd", 1, "shard_grad_op", False),
    (2, 3, "nested", "wrap", "adamw", 2, "no_shard", False),
    (2, 2, "nested", "wrap_alt", "adam", 2, "full_shard", False),
    (2, 3, "nested", "none", "adam", 1, "full_shard", False),
    (2, 2, "nested", "none", "adam", 2, "full_shard", False),
    (2, 4, "nested", "wrap", "sgd", 2, "no_shard", False),
    (2, 2, "transformer", "layers", "adam", 1, "full_shard", False),
    (2, 3, "transformer", "layers", "sgd", 1, "shard_grad_op", False),
    (2, 4, "transformer", "none", "adamw", 1, "full_shard", False),
    (2, 2, "dummy", "none", "adam", 1, "full_shard", False),
    (2, 3, "dummy", "none", "rmsprop", 1, "no_shard", False),
]

STEP = re.compile(r"^step=(\d+) loss=\S+ loss_hex=(\S+)$", re.M)


def run(cmd, log):
    start = time.monotonic()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    with open(log) as f:
        text = f.read()
    return rc, time.monotonic() - start, text


def losses(text):
    return {int(s): float.fromhex(h) for s, h in STEP.findall(text)}


def compare(a, b):
    out = subprocess.run(
        [sys.executable, COMPARE, a, b, "--ignore_param_order", "--quiet"],
        capture_output=True,
        text=True,
    ).stdout
    line = [x for x in out.splitlines() if x.startswith("COMPARE:")]
    return (line[-1] if line else "COMPARE: failed to run"), out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--only", default="")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--save_after", type=int, default=3)
    args = p.parse_args()
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    rows = []
    refs = {}

    def reference(model, opt, groups):
        key = (model, opt, groups)
        if key in refs:
            return refs[key]
        name = f"ref_{model}_{opt}_g{groups}"
        d = os.path.join(args.out, name)
        rc, _, text = run(
            [sys.executable, PEER, "--models_dir", MODELS, "--model", model, "--optimizer", opt,
             "--param_groups", str(groups), "--fsdp", "0", "--steps", str(args.steps),
             "--save_after", str(args.save_after), "--save_dir", d],
            os.path.join(args.out, "logs", name + ".log"),
        )
        assert rc == 0, name
        note = ""
        if model != "dummy":  # check the oracle against pytorch_train.py
            od = d + "_pytorch_train"
            orc, _, otext = run(
                [sys.executable, ORACLE, MODELS, model, opt, "0.01", str(args.steps),
                 str(groups), str(args.save_after), od, "2"],
                os.path.join(args.out, "logs", name + "_pytorch_train.log"),
            )
            mine = re.findall(r"^step=\d+ loss=\S+", text, re.M)
            theirs = re.findall(r"^step=\d+ loss=\S+", otext, re.M)
            summary, _ = compare(od, d)
            note = "oracle=" + ("same" if orc == 0 and mine == theirs and "EQUAL" in summary
                                else f"DIFFERENT({summary})")
        refs[key] = (d, losses(text), note)
        print(f"{name}: {note}", flush=True)
        return refs[key]

    for fsdp, world, model, wrap, opt, groups, strategy, orig in CONFIGS:
        name = f"f{fsdp}_ws{world}_{model}_{wrap}_{opt}_g{groups}_{strategy}" + (
            "_orig" if orig else "")
        if args.only and args.only not in name:
            continue
        ref_dir, ref_losses, _ = reference(model, opt, groups)
        d = os.path.join(args.out, name)
        cmd = [sys.executable, PEER, f"--nproc_per_node={world}", "--models_dir", MODELS,
               "--model", model,
               "--wrap", wrap, "--optimizer", opt, "--param_groups", str(groups), "--fsdp",
               str(fsdp), "--sharding_strategy", strategy, "--steps", str(args.steps),
               "--save_after", str(args.save_after), "--save_dir", d]
        if orig:
            cmd.append("--use_orig_params")
        rc, secs, text = run(cmd, os.path.join(args.out, "logs", name + ".log"))
        if rc == 77:
            row = f"| {name} | SKIP | {secs:.1f} | {text[text.find('SKIP:'):].splitlines()[0]} |"
        elif rc != 0:
            err = [x for x in text.splitlines() if "Error" in x]
            row = f"| {name} | FAIL rc={rc} | {secs:.1f} | {err[-1] if err else ''} |"
        else:
            got = losses(text)
            diffs = [abs(got[s] - ref_losses[s]) for s in ref_losses if s in got]
            same = len(got) == len(ref_losses) and all(got[s] == ref_losses[s] for s in got)
            summary, _ = compare(ref_dir, d)
            row = (f"| {name} | ok | {secs:.1f} | losses "
                   f"{'bit-equal' if same else f'max diff {max(diffs):.3g}'}; {summary[9:]} |")
        rows.append(row)
        print(row, flush=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("| config | runs | wall s | vs unwrapped |\n|---|---|---|---|\n")
        f.write("\n".join(rows) + "\n")
        for key, (_, _, note) in refs.items():
            f.write(f"\nreference {key}: {note}")
        f.write("\n")


if __name__ == "__main__":
    main()
