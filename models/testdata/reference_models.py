"""Oracle for models/models_test.cc: builds one reference model in PyTorch and dumps it.

Usage: tools/python reference_models.py MODEL OUTPUT_JSON

The models are re-stated here (not imported) from PyTorch's
test/distributed/fsdp/test_fsdp_optim_state.py and
torch/testing/_internal/common_fsdp.py (TransformerWithSharedParams, built with
torch.nn.Transformer itself), so the file needs neither torch.distributed nor FSDP. Seeds and
construction order follow those definitions; the C++ test does the same things in the same
order and expects identical numbers.

Output JSON:
  parameters           named_parameters() in order (shared tensors once), each
                       {name, shape, dtype, requires_grad, values (flat, row-major)}
  all_parameter_names  every registered parameter name, shared tensors under each name
                       (LibTorch's named_parameters() order)
  buffers              named_buffers(), same fields as parameters
  inputs               the forward inputs, same fields
  output               the forward output
  loss                 get_loss(inputs, output) where the model defines it, else null
  param_groups         NestedModel only: names of param_group0() and param_group1()
"""

import json
import sys

import torch
import torch.nn as nn


# --- test_fsdp_optim_state.py, PyTorch 2.x (1.13's dimensions with dims="1.13") --------------


class Bias(nn.Module):
    def __init__(self, dim):
        super().__init__()
        torch.manual_seed(0)
        self.bias = nn.Parameter(torch.randn((dim,)))

    def forward(self, x):
        return x + self.bias


class BlockA(nn.Module):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        torch.manual_seed(0)
        self.bias_module0 = Bias(out_dim)
        self.weight = nn.Parameter(torch.randn((in_dim, out_dim)))
        self.bias_module1 = Bias(out_dim)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.bias_module1(self.relu(self.bias_module0(x @ self.weight)))


class BlockB(nn.Module):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.randn((in_dim, out_dim)))
        self.bias_module0 = Bias(out_dim)
        self.bias_module1 = Bias(out_dim)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.bias_module1(self.relu(self.bias_module0(x @ self.weight)))


class NestedModel(nn.Module):
    def __init__(self, dims="2.x"):
        super().__init__()
        hidden = {"2.x": 3, "1.13": 7}[dims]
        self.block0 = BlockB(5, hidden)
        self.block1 = BlockB(hidden, 7)
        self.bias = nn.Parameter(torch.randn((5,)))
        self.block2 = nn.Sequential(BlockA(7, 9), BlockA(9, 9), BlockB(9, 5))
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.block0(x))
        x = self.relu(self.block1(x))
        x = self.relu(self.block2(x))
        return x + self.bias

    def param_group0(self):
        return list(self.block1.parameters())

    def param_group1(self):
        return list(self.block2.parameters()) + list(self.block0.parameters())


# --- later versions of test_fsdp_optim_state.py ---------------------------------------------


class TestDummyModel(nn.Module):
    def __init__(self, no_grad=False):
        super().__init__()
        torch.manual_seed(0)
        self.net1 = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.net1[0].weight.requires_grad = not no_grad
        self.net1[0].bias.requires_grad = not no_grad
        self.net2 = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.net3 = nn.Linear(32, 64)
        self.net4 = nn.Sequential(nn.ReLU(), nn.Linear(64, 8))

    def forward(self, x):
        return self.net4(self.net3(self.net2(self.net1(x))))


class UnusedFirstLayerModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(5, 5)
        self.lin2 = nn.Linear(5, 5)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.lin2(x))


class DenseModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net1 = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.net2 = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.net3 = nn.Linear(32, 64)
        self.net4 = nn.Sequential(nn.ReLU(), nn.Linear(64, 8))

    def forward(self, x):
        return self.net4(self.net3(self.net2(self.net1(x))))


class FakeMPModel(nn.Module):
    """Without FSDP and collectives: one rank's view, the all-reduce a no-op."""

    def __init__(self, rank):
        super().__init__()
        self.rank = rank
        torch.manual_seed(0)
        self.dense = DenseModel()
        if rank == 0:
            self.sparse0 = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        else:
            self.sparse1 = nn.Sequential(nn.Linear(8, 8), nn.ReLU())

    def forward(self, x):
        sparse = self.sparse0(x) if self.rank == 0 else self.sparse1(x)
        return self.dense(sparse)


class SimpleModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net1 = nn.Sequential(nn.Linear(2, 4), nn.ReLU())

    def forward(self, x):
        return self.net1(x)


# --- common_fsdp.py, PyTorch 1.13 (deterministic=True, add_bn=True, on CPU) -----------------


class TransformerWithSharedParams(nn.Module):
    def __init__(self, rank=0):
        super().__init__()
        self.rank = rank
        torch.manual_seed(0)
        d_vocab, d_model = 23, 16
        self.embed_tokens = nn.Embedding(d_vocab, d_model)
        self.transformer = nn.Transformer(
            d_model=d_model,
            num_encoder_layers=2,
            num_decoder_layers=2,
            dim_feedforward=8,
            dropout=0.1,
        )
        self.output_proj = nn.Linear(d_model, d_vocab)
        self.output_proj.weight = self.embed_tokens.weight
        self.register_buffer("vocab_bias", self.embed_tokens.weight.new_ones((d_model,)))
        self.register_buffer(
            "long_buffer", torch.zeros_like(self.vocab_bias, dtype=torch.long)
        )
        self.bs = 2
        self.bn = nn.BatchNorm1d(self.bs)
        self.eval()

    def get_input(self):
        torch.manual_seed(1 + self.rank)
        src = torch.arange(12).view(6, self.bs)
        tgt = torch.arange(self.bs * 4).view(4, self.bs)
        return (src, tgt)

    def forward(self, src_ids, tgt_ids):
        src = self.embed_tokens(src_ids)
        src = src + self.vocab_bias + self.long_buffer.type_as(src)
        tgt = self.bn(self.embed_tokens(tgt_ids))
        return self.output_proj(self.transformer(src, tgt))

    def get_loss(self, inputs, output):
        _, tgt = inputs
        return nn.functional.cross_entropy(
            output.view(-1, output.size(-1)), tgt.view(-1), reduction="sum"
        )


# --- models/char_lm.h: the main job's character-level language model ------------------------


class CharTransformerLM(nn.Module):
    def __init__(self, vocab_size, context, d_model, nhead, num_layers, dim_feedforward, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed_tokens = nn.Embedding(vocab_size, d_model)
        self.pos_embed = nn.Parameter(torch.empty(context, d_model))
        with torch.no_grad():
            self.embed_tokens.weight.normal_(0.0, 0.02)
            self.pos_embed.normal_(0.0, 0.02)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout=0.0)
        self.encoder = nn.TransformerEncoder(
            layer, num_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False
        )
        for p in self.encoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        self.output_proj = nn.Linear(d_model, vocab_size)
        self.output_proj.weight = self.embed_tokens.weight

    def forward(self, ids):
        length = ids.size(0)
        x = self.embed_tokens(ids) + self.pos_embed[:length].unsqueeze(1)
        mask = torch.triu(torch.full((length, length), float("-inf")), diagonal=1)
        return self.output_proj(self.encoder(x, mask=mask))


# --- building and dumping -------------------------------------------------------------------


def build(name):
    """Returns (model, inputs, loss_fn or None, extra dict), mirroring models_test.cc."""
    extra = {}
    if name.startswith("nested"):
        model = NestedModel(dims="1.13" if name == "nested_1.13" else "2.x")
        if name == "nested_unmanaged_in_fsdp":
            model.block2[2].register_parameter("unmanaged_param", nn.Parameter(torch.randn(5, 5)))
        elif name == "nested_unmanaged_in_root":
            model.register_parameter("unmanaged_param", nn.Parameter(torch.randn(5, 5)))
        names = {id(p): n for n, p in model.named_parameters()}
        extra["param_groups"] = [
            [names[id(p)] for p in model.param_group0()],
            [names[id(p)] for p in model.param_group1()],
        ]
        torch.manual_seed(0)  # as _step_model does before get_input
        inputs = (torch.randn((8, 5)),)
        return model, inputs, lambda inp, out: out.sum(), extra
    if name == "transformer":
        model = TransformerWithSharedParams(rank=0)
        return model, model.get_input(), model.get_loss, extra
    if name in ("test_dummy", "test_dummy_no_grad"):
        model = TestDummyModel(no_grad=(name == "test_dummy_no_grad"))
        torch.manual_seed(0)
        return model, (torch.rand(8, 8),), None, extra
    if name == "unused_first_layer":
        torch.manual_seed(0)
        model = UnusedFirstLayerModel()
        torch.manual_seed(0)
        return model, (torch.randn(2, 5),), None, extra
    if name == "dense":
        torch.manual_seed(0)
        model = DenseModel()
        torch.manual_seed(0)
        return model, (torch.rand(5, 8),), None, extra
    if name in ("fake_mp_rank0", "fake_mp_rank1"):
        model = FakeMPModel(rank=int(name[-1]))
        torch.manual_seed(0)
        return model, (torch.rand(5, 8),), None, extra
    if name == "simple":
        model = SimpleModel()
        torch.manual_seed(0)
        return model, (torch.rand(3, 2),), None, extra
    if name == "char_lm":
        model = CharTransformerLM(
            vocab_size=11, context=8, d_model=16, nhead=4, num_layers=2, dim_feedforward=32
        )
        torch.manual_seed(0)
        ids = torch.randint(0, 11, (8, 3))
        # Next-token loss over the first 7 positions (causal: they ignore the 8th token).
        loss_fn = lambda inp, out: nn.functional.cross_entropy(  # noqa: E731
            out[:-1].reshape(-1, 11), inp[0][1:].reshape(-1)
        )
        return model, (ids,), loss_fn, extra
    raise SystemExit(f"unknown model {name!r}")


def dump_tensor(name, tensor):
    t = tensor.detach()
    return {
        "name": name,
        "shape": list(t.shape),
        "dtype": str(t.dtype).replace("torch.", ""),
        "requires_grad": bool(tensor.requires_grad),
        "values": t.reshape(-1).tolist(),
    }


def all_parameter_names(model):
    names = []
    for module_name, module in model.named_modules():
        for param_name, param in module._parameters.items():
            if param is not None:
                names.append(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    name, out_path = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    # PyTorch 2.x runs an eval-mode transformer layer under no_grad through a fused "fast path"
    # kernel; LibTorch's C++ modules have no such path. Keep to the composite one.
    torch.backends.mha.set_fastpath_enabled(False)
    model, inputs, loss_fn, extra = build(name)
    with torch.no_grad():
        output = model(*inputs)
        loss = loss_fn(inputs, output).item() if loss_fn is not None else None
    result = {
        "model": name,
        "parameters": [dump_tensor(n, p) for n, p in model.named_parameters()],
        "all_parameter_names": all_parameter_names(model),
        "buffers": [dump_tensor(n, b) for n, b in model.named_buffers()],
        "inputs": [dump_tensor(f"input{i}", t) for i, t in enumerate(inputs)],
        "output": dump_tensor("output", output),
        "loss": loss,
    }
    result.update(extra)
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
