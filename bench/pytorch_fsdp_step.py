"""PyTorch's FSDP step on BenchTransformer's twin: fsdp_step_benchmark's reference.

Run under torchrun (fsdp_step_benchmark starts it through `python -m torch.distributed.run`):

  torchrun --standalone --nproc_per_node=2 bench/pytorch_fsdp_step.py --steps=2 --seq=8 --batch=2

The model has BenchTransformer's shapes (bench/bench_transformer.h, its C++ source
models/transformer.h): Embedding(8192, 512), nn.Transformer(d_model 512, 8 heads, 6 + 6 layers,
dim_feedforward 2048, dropout 0), Linear(512, 8192) not tied; the values are PyTorch's own
initialisation (only the timing is compared). Each rank trains on its own batch of random token
ids (src [seq, batch], tgt [seq + 1, batch]; next-token cross-entropy), Adam lr 1e-4, as the C++
benchmark does. Two wrappings, each timed after one warm-up step (which creates Adam's state):
  FSDP1: FullyShardedDataParallel(FULL_SHARD, device_id=cpu, PyTorch's defaults otherwise:
         BACKWARD_PRE, limit_all_gathers) around every encoder and decoder layer, then the root;
  FSDP2: fully_shard on every layer, then on the root.
Rank 0 prints one line: `PYTORCH_STEP fsdp1_ms=<ms per step> fsdp1_cpu_ms=<rank 0's CPU ms per
step> fsdp1_faults=<rank 0's minor page faults per step>` and the same three for fsdp2.
"""

import argparse
import os
import resource
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

VOCAB, D_MODEL, NHEAD, LAYERS, FFN = 8192, 512, 8, 6, 2048


class BenchTransformerTwin(nn.Module):
    """BenchTransformer's twin; scale_benchmark's smaller models change the width only."""

    def __init__(self, d_model=D_MODEL, dim_feedforward=FFN):
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(VOCAB, d_model)
        self.transformer = nn.Transformer(
            d_model=d_model,
            nhead=NHEAD,
            num_encoder_layers=LAYERS,
            num_decoder_layers=LAYERS,
            dim_feedforward=dim_feedforward,
            dropout=0.0,
        )
        self.output_proj = nn.Linear(d_model, VOCAB)

    def forward(self, src_ids, tgt_ids):
        return self.output_proj(self.transformer(self.embed_tokens(src_ids), self.embed_tokens(tgt_ids)))


def layers(model):
    return list(model.transformer.encoder.layers) + list(model.transformer.decoder.layers)


def wrap_fsdp1(model):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    kwargs = dict(sharding_strategy=ShardingStrategy.FULL_SHARD, device_id=torch.device("cpu"))
    for stack in (model.transformer.encoder.layers, model.transformer.decoder.layers):
        for i in range(len(stack)):
            stack[i] = FSDP(stack[i], **kwargs)
    return FSDP(model, **kwargs)


def wrap_fsdp2(model):
    from torch.distributed.fsdp import fully_shard

    for layer in layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def rank_batch(rank, seq, batch):
    """This rank's token ids as the C++ benchmarks draw theirs: src [seq, batch], tgt [seq + 1, batch]."""
    generator = torch.Generator().manual_seed(1 + rank)
    src = torch.randint(VOCAB, (seq, batch), generator=generator)
    tgt = torch.randint(VOCAB, (seq + 1, batch), generator=generator)
    return src, tgt


def train_step(model, optim, src, tgt):
    """One step as the C++ benchmarks take it: next-token cross-entropy, Adam."""
    logits = model(src, tgt[:-1])
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), tgt[1:].reshape(-1))
    optim.zero_grad()
    loss.backward()
    optim.step()


def time_steps(wrap, args, src, tgt):
    model = wrap(BenchTransformerTwin())
    optim = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        train_step(model, optim, src, tgt)

    step()  # warm-up: Adam's state
    dist.barrier()
    start = time.perf_counter()
    cpu_start = time.process_time()
    faults_start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    cpu = (time.process_time() - cpu_start) / args.steps
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_start) / args.steps
    dist.barrier()
    return seconds, cpu, faults


def add_run_args(p):
    """The arguments the reference scripts share: each rank's batch and intra-op threads."""
    p.add_argument("--seq", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (the C++ ranks')")


def start(args):
    """The C++ ranks' thread count, the Gloo group; returns this rank."""
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    return dist.get_rank()


def finish():
    dist.barrier()
    dist.destroy_process_group()
    # PyTorch ranks sometimes abort at exit after finishing (README): leave at once.
    os._exit(0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=2)
    add_run_args(p)
    args = p.parse_args()
    rank = start(args)
    src, tgt = rank_batch(rank, args.seq, args.batch)
    fields = []
    for name, wrap in (("fsdp1", wrap_fsdp1), ("fsdp2", wrap_fsdp2)):
        seconds, cpu, faults = time_steps(wrap, args, src, tgt)
        fields += [f"{name}_ms={seconds * 1e3:.3f}", f"{name}_cpu_ms={cpu * 1e3:.3f}",
                   f"{name}_faults={faults:.0f}"]
    if rank == 0:
        print("PYTORCH_STEP " + " ".join(fields), flush=True)
    finish()


if __name__ == "__main__":
    main()
