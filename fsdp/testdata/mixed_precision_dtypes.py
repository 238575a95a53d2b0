"""What PyTorch 2.13's FSDP1 does with buffers under MixedPrecision(bf16, bf16, bf16), for
//fsdp:mixed_precision_test: NormNet's layout (Linear(4, 3), BatchNorm1d(3), Linear(3, 2)) wrapped
as one unit on CPU/Gloo, one training forward. Rank 0 prints, one line each,
  output <dtype>                 the forward's output
  buffer <name> <dtype>          each module buffer after the forward
  state <key> <dtype>            each full state dict entry
Run: tools/python fsdp/testdata/mixed_precision_dtypes.py (it starts torchrun with 2 ranks).
"""

import warnings

import torch

import rank_launch

warnings.filterwarnings("ignore")


class NormNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.input = torch.nn.Linear(4, 3)
        self.norm = torch.nn.BatchNorm1d(3)
        self.out = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.out(self.norm(self.input(x)))


def rank_main():
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    mp = MixedPrecision(
        param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16
    )
    model = FSDP(NormNet(), mixed_precision=mp, device_id=torch.device("cpu"))
    out = model(torch.randn(5, 4))
    lines = [f"output {str(out.dtype).replace('torch.', '')}"]
    for name, b in model.named_buffers():
        name = name.replace("_fsdp_wrapped_module.", "").replace("input.", "in.")
        lines.append(f"buffer {name} {str(b.dtype).replace('torch.', '')}")
    for key, v in model.state_dict().items():
        key = key.replace("input.", "in.")
        lines.append(f"state {key} {str(v.dtype).replace('torch.', '')}")
    rank_launch.finish(dist, lines)


if __name__ == "__main__":
    rank_launch.main(__file__, rank_main)
