// TransformerWithSharedParams: the transformer reference model of PyTorch's FSDP tests, for
// checking our FSDP optimizer-state code against PyTorch's on a model with a tied weight and
// one FSDP unit per transformer layer.
//
// Source: torch/testing/_internal/common_fsdp.py of PyTorch 1.13 (class
// TransformerWithSharedParams, built by test_fsdp_optim_state.py through
// TransformerWithSharedParams.init(..., deterministic=True)), and torch/nn/modules/
// transformer.py and activation.py of 1.13 for nn.Transformer and nn.MultiheadAttention.
//
// The transformer is our own set of modules mirroring nn.Transformer's structure, names and
// post-norm math (batch_first=False, ReLU, no masks), because LibTorch's torch::nn::Transformer
// calls its layers directly and FSDP must wrap one unit per layer: each encoder and decoder
// layer sits in an fsdp::ModuleSlot. Construction reproduces Python's random draws in order:
//   1. torch::manual_seed(0) (deterministic); embed_tokens = Embedding(23, 16): normal_.
//   2. One encoder layer: self_attn.out_proj Linear(16, 16) init, then xavier_uniform_ of
//      self_attn.in_proj_weight (biases of the attention zeroed), linear1 Linear(16, 8),
//      linear2 Linear(8, 16). Python deep-copies it into both layers, so both layers start
//      from these values and the copies draw nothing.
//   3. One decoder layer likewise (self_attn, multihead_attn, linear1, linear2), copied twice.
//   4. nn.Transformer._reset_parameters: xavier_uniform_ of every parameter with more than one
//      dimension, in named_parameters() order. Linear biases keep their draws from 2 and 3.
//   5. output_proj = Linear(16, 23) init; its weight is then replaced by embed_tokens.weight.
//   6. buffers vocab_bias = ones(16), long_buffer = zeros(16, int64); bn = BatchNorm1d(2);
//      eval() (deterministic), so every dropout is off.
//
// Tied weight: output_proj.weight IS embed_tokens.weight (one tensor, registered in both
// modules). Python's named_parameters() reports it once, as "embed_tokens.weight"; LibTorch's
// named_parameters() and parameters() report it under both names ("output_proj.weight" too),
// so anything that must see each parameter once (optimizers, FSDP flattening) should use
// NamedParametersWithoutDuplicates(), which yields Python's list.
//
// FSDP wrapping in the test: FSDPInitMode.RECURSIVE wraps the root with
// transformer_auto_wrap_policy over {TransformerEncoderLayer, TransformerDecoderLayer}, i.e.
// one unit per layer_slots() entry (transformer.encoder.layers.0, .1, then
// transformer.decoder.layers.0, .1) plus the root. get_ignored_modules() is `transformer`.
#ifndef FSDP_CPP_MODELS_TRANSFORMER_H_
#define FSDP_CPP_MODELS_TRANSFORMER_H_

#include <torch/nn/module.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>
#include <torch/ordered_dict.h>
#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "fsdp/module_slot.h"
#include "models/slot_containers.h"

namespace fsdp::models {

// nn.Transformer's constructor arguments (defaults: TransformerWithSharedParams' values).
struct TransformerConfig {
  int64_t d_model = 16;
  int64_t nhead = 8;
  int64_t num_encoder_layers = 2;
  int64_t num_decoder_layers = 2;
  int64_t dim_feedforward = 8;
  double dropout = 0.1;
  double layer_norm_eps = 1e-5;
  // Self-attention sees only earlier positions (an additive -inf mask above the diagonal, as
  // nn.Transformer.generate_square_subsequent_mask). Off in TransformerWithSharedParams; on in
  // language models (char_lm.h).
  bool causal = false;
};

// named_parameters() with each tensor reported once, under its first name: Python's
// Module.named_parameters() order and content.
torch::OrderedDict<std::string, torch::Tensor> NamedParametersWithoutDuplicates(
    const torch::nn::Module& module);

// nn.MultiheadAttention with packed q/k/v weights, bias, no bias_k/bias_v, inputs
// [seq, batch, embed]. Parameters: in_proj_weight [3E, E], in_proj_bias [3E], out_proj.
class MultiheadAttentionImpl : public torch::nn::Module {
 public:
  // `causal`: self-attention (query is key_value) masks positions after the query's.
  MultiheadAttentionImpl(int64_t embed_dim, int64_t num_heads, double dropout,
                         bool causal = false);
  // Self-attention when `key_value` is the same tensor as `query` (one packed projection, as
  // Python does for `query is key is value`), encoder-decoder attention otherwise. Returns the
  // attention output only (Python's need_weights=False).
  torch::Tensor forward(const torch::Tensor& query, const torch::Tensor& key_value);

  torch::Tensor in_proj_weight;
  torch::Tensor in_proj_bias;
  torch::nn::Linear out_proj{nullptr};

 private:
  int64_t embed_dim_;
  int64_t num_heads_;
  double dropout_;
  bool causal_;
};
TORCH_MODULE(MultiheadAttention);

// nn.TransformerEncoderLayer, post-norm: x = norm1(x + sa(x)); x = norm2(x + ff(x)).
class TransformerEncoderLayerImpl : public torch::nn::Module {
 public:
  explicit TransformerEncoderLayerImpl(const TransformerConfig& config);
  torch::Tensor forward(torch::Tensor src);

  MultiheadAttention self_attn{nullptr};
  torch::nn::Linear linear1{nullptr};
  torch::nn::Dropout dropout{nullptr};
  torch::nn::Linear linear2{nullptr};
  torch::nn::LayerNorm norm1{nullptr};
  torch::nn::LayerNorm norm2{nullptr};
  torch::nn::Dropout dropout1{nullptr};
  torch::nn::Dropout dropout2{nullptr};
};
TORCH_MODULE(TransformerEncoderLayer);

// nn.TransformerDecoderLayer, post-norm: self-attention, attention over `memory`, feed-forward.
class TransformerDecoderLayerImpl : public torch::nn::Module {
 public:
  explicit TransformerDecoderLayerImpl(const TransformerConfig& config);
  torch::Tensor forward(torch::Tensor tgt, torch::Tensor memory);

  MultiheadAttention self_attn{nullptr};
  MultiheadAttention multihead_attn{nullptr};
  torch::nn::Linear linear1{nullptr};
  torch::nn::Dropout dropout{nullptr};
  torch::nn::Linear linear2{nullptr};
  torch::nn::LayerNorm norm1{nullptr};
  torch::nn::LayerNorm norm2{nullptr};
  torch::nn::LayerNorm norm3{nullptr};
  torch::nn::Dropout dropout1{nullptr};
  torch::nn::Dropout dropout2{nullptr};
  torch::nn::Dropout dropout3{nullptr};
};
TORCH_MODULE(TransformerDecoderLayer);

// nn.TransformerEncoder: `layers` (slots "0", "1", ... holding TransformerEncoderLayerImpl,
// each a copy of `prototype`), then `norm`.
class TransformerEncoderImpl : public torch::nn::Module {
 public:
  TransformerEncoderImpl(const TransformerEncoderLayer& prototype, int64_t num_layers,
                         const TransformerConfig& config);
  torch::Tensor forward(torch::Tensor src);

  SlotList layers{nullptr};
  torch::nn::LayerNorm norm{nullptr};
};
TORCH_MODULE(TransformerEncoder);

// nn.TransformerDecoder: `layers` (slots holding TransformerDecoderLayerImpl), then `norm`.
class TransformerDecoderImpl : public torch::nn::Module {
 public:
  TransformerDecoderImpl(const TransformerDecoderLayer& prototype, int64_t num_layers,
                         const TransformerConfig& config);
  torch::Tensor forward(torch::Tensor tgt, const torch::Tensor& memory);

  SlotList layers{nullptr};
  torch::nn::LayerNorm norm{nullptr};
};
TORCH_MODULE(TransformerDecoder);

// nn.Transformer (encoder, decoder; xavier_uniform_ of every >1-dim parameter at the end).
// forward: src [S, N, E], tgt [T, N, E] -> [T, N, E].
class TransformerImpl : public torch::nn::Module {
 public:
  explicit TransformerImpl(const TransformerConfig& config = {});
  torch::Tensor forward(const torch::Tensor& src, const torch::Tensor& tgt);

  TransformerEncoder encoder{nullptr};
  TransformerDecoder decoder{nullptr};
};
TORCH_MODULE(Transformer);

// torch::nn::Linear whose weight can be replaced by another module's tensor (Python's
// `self.output_proj.weight = self.embed_tokens.weight`). clone() gives an untied copy.
class TiedLinearImpl : public torch::nn::LinearImpl {
 public:
  using torch::nn::LinearImpl::LinearImpl;
  // Registers `shared` as this module's "weight" (same tensor, same position in the order).
  void tie_weight(const torch::Tensor& shared);
};
TORCH_MODULE(TiedLinear);

// The model. Inputs are token ids [T, 2] (batch size 2, sequence first); output is logits
// [T_tgt, 2, 23]. Parameters (Python's named_parameters(), 68 tensors): embed_tokens.weight,
// transformer.encoder.layers.{0,1}.*, transformer.encoder.norm.*,
// transformer.decoder.layers.{0,1}.*, transformer.decoder.norm.*, output_proj.bias, bn.weight,
// bn.bias (LibTorch adds output_proj.weight, the tied duplicate, before output_proj.bias).
class TransformerWithSharedParamsImpl : public torch::nn::Module {
 public:
  static constexpr int64_t kVocab = 23;
  static constexpr int64_t kModelDim = 16;
  static constexpr int64_t kBatch = 2;

  // `rank` only seeds get_input. `add_bn` false puts Identity in place of BatchNorm1d(2).
  // `deterministic` seeds with torch::manual_seed(0) first and ends in eval mode.
  explicit TransformerWithSharedParamsImpl(int64_t rank = 0, bool add_bn = true,
                                           bool deterministic = true);

  torch::Tensor forward(const torch::Tensor& src_ids, const torch::Tensor& tgt_ids);

  // Python's get_input: torch::manual_seed(1 + rank), then src = arange(12).view(6, 2) and
  // tgt = arange(8).view(4, 2) (int64, on `device`).
  std::pair<torch::Tensor, torch::Tensor> get_input(torch::Device device = torch::kCPU) const;
  // Python's get_loss: cross_entropy(output.view(-1, 23), tgt.view(-1), reduction="sum").
  torch::Tensor get_loss(const std::pair<torch::Tensor, torch::Tensor>& input,
                         const torch::Tensor& output) const;

  // The auto-wrap policy's units: encoder layers in order, then decoder layers.
  std::vector<fsdp::ModuleSlot*> layer_slots();
  // Python's get_ignored_modules(): [transformer].
  std::shared_ptr<torch::nn::Module> ignored_module() const { return transformer.ptr(); }

  int64_t rank() const { return rank_; }

  torch::nn::Embedding embed_tokens{nullptr};
  Transformer transformer{nullptr};
  TiedLinear output_proj{nullptr};
  torch::Tensor vocab_bias;   // buffer, ones [16]
  torch::Tensor long_buffer;  // buffer, zeros [16], int64
  fsdp::ModuleSlot bn;        // BatchNorm1d(2), or Identity without add_bn

 private:
  int64_t rank_;
};
TORCH_MODULE(TransformerWithSharedParams);

}  // namespace fsdp::models

#endif  // FSDP_CPP_MODELS_TRANSFORMER_H_
