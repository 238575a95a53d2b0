#include "models/transformer.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Generator.h>
#include <c10/util/Exception.h>
#include <torch/nn/functional/loss.h>
#include <torch/nn/init.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/linear.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <cmath>
#include <limits>
#include <mutex>
#include <unordered_set>

namespace fsdp::models {
namespace {

torch::nn::LayerNorm MakeLayerNorm(const TransformerConfig& config) {
  return torch::nn::LayerNorm(
      torch::nn::LayerNormOptions({config.d_model}).eps(config.layer_norm_eps));
}

// Python builds one layer and deep-copies it into every position (_get_clones), so the copies
// draw no random numbers. Our copies are constructed (which draws) with the default CPU
// generator's state saved before and restored after, then take the prototype's values.
template <typename Layer>
Layer CopyWithoutDrawing(const Layer& prototype, const TransformerConfig& config) {
  at::Generator generator = at::detail::getDefaultCPUGenerator();
  torch::Tensor state;
  {
    std::lock_guard<std::mutex> lock(generator.mutex());
    state = generator.get_state();
  }
  Layer copy(config);
  {
    std::lock_guard<std::mutex> lock(generator.mutex());
    generator.set_state(state);
  }
  torch::NoGradGuard no_grad;
  const auto source = prototype->named_parameters();
  for (auto& item : copy->named_parameters()) {
    item.value().copy_(source[item.key()]);
  }
  const auto source_buffers = prototype->named_buffers();
  for (auto& item : copy->named_buffers()) {
    item.value().copy_(source_buffers[item.key()]);
  }
  return copy;
}

}  // namespace

torch::OrderedDict<std::string, torch::Tensor> NamedParametersWithoutDuplicates(
    const torch::nn::Module& module) {
  torch::OrderedDict<std::string, torch::Tensor> unique;
  std::unordered_set<const c10::TensorImpl*> seen;
  for (const auto& item : module.named_parameters()) {
    if (seen.insert(item.value().unsafeGetTensorImpl()).second) {
      unique.insert(item.key(), item.value());
    }
  }
  return unique;
}

MultiheadAttentionImpl::MultiheadAttentionImpl(int64_t embed_dim, int64_t num_heads, double dropout,
                                               bool causal)
    : embed_dim_(embed_dim), num_heads_(num_heads), dropout_(dropout), causal_(causal) {
  TORCH_CHECK(num_heads > 0 && embed_dim % num_heads == 0, "MultiheadAttention: embed_dim ",
              embed_dim, " is not divisible by num_heads ", num_heads);
  in_proj_weight = register_parameter("in_proj_weight", torch::empty({3 * embed_dim, embed_dim}));
  in_proj_bias = register_parameter("in_proj_bias", torch::empty({3 * embed_dim}));
  out_proj = register_module("out_proj", torch::nn::Linear(embed_dim, embed_dim));
  // Python's _reset_parameters, after out_proj's own Linear init.
  torch::NoGradGuard no_grad;
  torch::nn::init::xavier_uniform_(in_proj_weight);
  in_proj_bias.zero_();
  out_proj->bias.zero_();
}

torch::Tensor MultiheadAttentionImpl::forward(const torch::Tensor& query,
                                              const torch::Tensor& key_value) {
  TORCH_CHECK(query.dim() == 3 && key_value.dim() == 3,
              "MultiheadAttention expects [seq, batch, embed] inputs");
  const int64_t tgt_len = query.size(0);
  const int64_t batch = query.size(1);
  const int64_t head_dim = embed_dim_ / num_heads_;

  // In-projection, split as Python's _in_projection_packed splits it.
  torch::Tensor q, k, v;
  if (query.is_same(key_value)) {
    auto qkv = torch::linear(query, in_proj_weight, in_proj_bias).chunk(3, -1);
    q = qkv[0];
    k = qkv[1];
    v = qkv[2];
  } else {
    auto w = in_proj_weight.split_with_sizes({embed_dim_, 2 * embed_dim_});
    auto b = in_proj_bias.split_with_sizes({embed_dim_, 2 * embed_dim_});
    q = torch::linear(query, w[0], b[0]);
    auto kv = torch::linear(key_value, w[1], b[1]).chunk(2, -1);
    k = kv[0];
    v = kv[1];
  }

  // [len, batch, embed] -> [batch * heads, len, head_dim]
  q = q.contiguous().view({tgt_len, batch * num_heads_, head_dim}).transpose(0, 1);
  k = k.contiguous().view({k.size(0), batch * num_heads_, head_dim}).transpose(0, 1);
  v = v.contiguous().view({v.size(0), batch * num_heads_, head_dim}).transpose(0, 1);

  torch::Tensor q_scaled = q / std::sqrt(static_cast<double>(head_dim));
  torch::Tensor scores = torch::bmm(q_scaled, k.transpose(-2, -1));
  if (causal_ && query.is_same(key_value)) {
    scores = scores.masked_fill(
        torch::ones({tgt_len, k.size(1)}, torch::kBool).triu(/*diagonal=*/1),
        -std::numeric_limits<double>::infinity());
  }
  torch::Tensor weights = scores.softmax(-1);
  if (is_training() && dropout_ > 0.0) {
    weights = torch::dropout(weights, dropout_, /*train=*/true);
  }
  torch::Tensor out = torch::bmm(weights, v);
  out = out.transpose(0, 1).contiguous().view({tgt_len * batch, embed_dim_});
  out = torch::linear(out, out_proj->weight, out_proj->bias);
  return out.view({tgt_len, batch, out.size(1)});
}

TransformerEncoderLayerImpl::TransformerEncoderLayerImpl(const TransformerConfig& config) {
  self_attn = register_module("self_attn",
                              MultiheadAttention(config.d_model, config.nhead, config.dropout,
                                                 config.causal));
  linear1 = register_module("linear1", torch::nn::Linear(config.d_model, config.dim_feedforward));
  dropout = register_module("dropout", torch::nn::Dropout(config.dropout));
  linear2 = register_module("linear2", torch::nn::Linear(config.dim_feedforward, config.d_model));
  norm1 = register_module("norm1", MakeLayerNorm(config));
  norm2 = register_module("norm2", MakeLayerNorm(config));
  dropout1 = register_module("dropout1", torch::nn::Dropout(config.dropout));
  dropout2 = register_module("dropout2", torch::nn::Dropout(config.dropout));
}

torch::Tensor TransformerEncoderLayerImpl::forward(torch::Tensor src) {
  torch::Tensor x = norm1(src + dropout1(self_attn(src, src)));
  return norm2(x + dropout2(linear2(dropout(torch::relu(linear1(x))))));
}

TransformerDecoderLayerImpl::TransformerDecoderLayerImpl(const TransformerConfig& config) {
  self_attn = register_module("self_attn",
                              MultiheadAttention(config.d_model, config.nhead, config.dropout,
                                                 config.causal));
  multihead_attn = register_module(
      "multihead_attn", MultiheadAttention(config.d_model, config.nhead, config.dropout));
  linear1 = register_module("linear1", torch::nn::Linear(config.d_model, config.dim_feedforward));
  dropout = register_module("dropout", torch::nn::Dropout(config.dropout));
  linear2 = register_module("linear2", torch::nn::Linear(config.dim_feedforward, config.d_model));
  norm1 = register_module("norm1", MakeLayerNorm(config));
  norm2 = register_module("norm2", MakeLayerNorm(config));
  norm3 = register_module("norm3", MakeLayerNorm(config));
  dropout1 = register_module("dropout1", torch::nn::Dropout(config.dropout));
  dropout2 = register_module("dropout2", torch::nn::Dropout(config.dropout));
  dropout3 = register_module("dropout3", torch::nn::Dropout(config.dropout));
}

torch::Tensor TransformerDecoderLayerImpl::forward(torch::Tensor tgt, torch::Tensor memory) {
  torch::Tensor x = norm1(tgt + dropout1(self_attn(tgt, tgt)));
  x = norm2(x + dropout2(multihead_attn(x, memory)));
  return norm3(x + dropout3(linear2(dropout(torch::relu(linear1(x))))));
}

TransformerEncoderImpl::TransformerEncoderImpl(const TransformerEncoderLayer& prototype,
                                               int64_t num_layers,
                                               const TransformerConfig& config) {
  layers = register_module("layers", SlotList());
  for (int64_t i = 0; i < num_layers; ++i) {
    layers->push_back(CopyWithoutDrawing(prototype, config));
  }
  norm = register_module("norm", MakeLayerNorm(config));
}

torch::Tensor TransformerEncoderImpl::forward(torch::Tensor src) {
  for (size_t i = 0; i < layers->size(); ++i) {
    src = layers->slot(i).forward(src);
  }
  return norm(src);
}

TransformerDecoderImpl::TransformerDecoderImpl(const TransformerDecoderLayer& prototype,
                                               int64_t num_layers,
                                               const TransformerConfig& config) {
  layers = register_module("layers", SlotList());
  for (int64_t i = 0; i < num_layers; ++i) {
    layers->push_back(CopyWithoutDrawing(prototype, config));
  }
  norm = register_module("norm", MakeLayerNorm(config));
}

torch::Tensor TransformerDecoderImpl::forward(torch::Tensor tgt, const torch::Tensor& memory) {
  for (size_t i = 0; i < layers->size(); ++i) {
    tgt = layers->slot(i).forward(tgt, memory);
  }
  return norm(tgt);
}

TransformerImpl::TransformerImpl(const TransformerConfig& config) {
  TransformerEncoderLayer encoder_layer(config);
  encoder = register_module("encoder",
                            TransformerEncoder(encoder_layer, config.num_encoder_layers, config));
  TransformerDecoderLayer decoder_layer(config);
  decoder = register_module("decoder",
                            TransformerDecoder(decoder_layer, config.num_decoder_layers, config));
  // nn.Transformer._reset_parameters.
  torch::NoGradGuard no_grad;
  for (torch::Tensor& p : parameters()) {
    if (p.dim() > 1) torch::nn::init::xavier_uniform_(p);
  }
}

torch::Tensor TransformerImpl::forward(const torch::Tensor& src, const torch::Tensor& tgt) {
  TORCH_CHECK(src.dim() == 3 && tgt.dim() == 3 && src.size(1) == tgt.size(1),
              "Transformer: src and tgt must be [len, batch, d_model] with equal batch");
  return decoder(tgt, encoder(src));
}

void TiedLinearImpl::tie_weight(const torch::Tensor& shared) {
  TORCH_CHECK(shared.sizes() == weight.sizes(), "tie_weight: shape ", shared.sizes(),
              " does not match the weight's ", weight.sizes());
  parameters_["weight"] = shared;
  weight = shared;
}

TransformerWithSharedParamsImpl::TransformerWithSharedParamsImpl(int64_t rank, bool add_bn,
                                                                 bool deterministic)
    : rank_(rank) {
  if (deterministic) torch::manual_seed(0);
  embed_tokens = register_module("embed_tokens", torch::nn::Embedding(kVocab, kModelDim));
  transformer = register_module("transformer", Transformer(TransformerConfig{}));
  output_proj = register_module("output_proj", TiedLinear(kModelDim, kVocab));
  output_proj->tie_weight(embed_tokens->weight);
  vocab_bias = register_buffer("vocab_bias", torch::ones({kModelDim}));
  long_buffer = register_buffer("long_buffer", torch::zeros({kModelDim}, torch::kLong));
  if (add_bn) {
    bn = register_module("bn", torch::nn::BatchNorm1d(kBatch));
  } else {
    bn = register_module("bn", torch::nn::Identity());
  }
  if (deterministic) eval();
}

torch::Tensor TransformerWithSharedParamsImpl::forward(const torch::Tensor& src_ids,
                                                       const torch::Tensor& tgt_ids) {
  torch::Tensor src = embed_tokens(src_ids);
  src = src + vocab_bias + long_buffer.type_as(src);
  torch::Tensor tgt = bn(embed_tokens(tgt_ids));
  return output_proj(transformer(src, tgt));
}

std::pair<torch::Tensor, torch::Tensor> TransformerWithSharedParamsImpl::get_input(
    torch::Device device) const {
  torch::manual_seed(1 + rank_);
  auto options = torch::TensorOptions().dtype(torch::kLong).device(device);
  return {torch::arange(12, options).view({6, kBatch}),
          torch::arange(kBatch * 4, options).view({4, kBatch})};
}

torch::Tensor TransformerWithSharedParamsImpl::get_loss(
    const std::pair<torch::Tensor, torch::Tensor>& input, const torch::Tensor& output) const {
  namespace F = torch::nn::functional;
  return F::cross_entropy(output.view({-1, output.size(-1)}), input.second.view({-1}),
                          F::CrossEntropyFuncOptions().reduction(torch::kSum));
}

std::vector<fsdp::ModuleSlot*> TransformerWithSharedParamsImpl::layer_slots() {
  std::vector<fsdp::ModuleSlot*> slots = transformer->encoder->layers->slots();
  for (fsdp::ModuleSlot* slot : transformer->decoder->layers->slots()) slots.push_back(slot);
  return slots;
}

}  // namespace fsdp::models
