#include "bench/bench_transformer.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/functional/loss.h>
#include <torch/utils.h>

namespace fsdp::bench {

BenchTransformerImpl::BenchTransformerImpl(const BenchTransformerConfig& config, uint64_t seed)
    : config_(config) {
  torch::manual_seed(seed);
  embed_tokens =
      register_module("embed_tokens", torch::nn::Embedding(config.vocab, config.d_model));
  models::TransformerConfig tc;
  tc.d_model = config.d_model;
  tc.nhead = config.nhead;
  tc.num_encoder_layers = config.num_encoder_layers;
  tc.num_decoder_layers = config.num_decoder_layers;
  tc.dim_feedforward = config.dim_feedforward;
  tc.dropout = 0.0;
  transformer = register_module("transformer", models::Transformer(tc));
  output_proj = register_module("output_proj", torch::nn::Linear(config.d_model, config.vocab));
}

torch::Tensor BenchTransformerImpl::forward(const torch::Tensor& src_ids,
                                            const torch::Tensor& tgt_ids) {
  torch::Tensor src = embed_tokens->forward(src_ids);
  torch::Tensor tgt = embed_tokens->forward(tgt_ids);
  return output_proj->forward(transformer->forward(src, tgt));
}

std::pair<torch::Tensor, torch::Tensor> BenchTransformerImpl::MakeBatch(int64_t seq, int64_t batch,
                                                                        uint64_t seed) const {
  torch::Generator generator = at::detail::createCPUGenerator(seed);
  torch::Tensor src = torch::randint(config_.vocab, {seq, batch}, generator, torch::kLong);
  torch::Tensor tgt = torch::randint(config_.vocab, {seq + 1, batch}, generator, torch::kLong);
  return {src, tgt};
}

torch::Tensor BenchTransformerImpl::Loss(const torch::Tensor& logits,
                                         const torch::Tensor& tgt) const {
  torch::Tensor next = tgt.slice(/*dim=*/0, /*start=*/1);
  return torch::nn::functional::cross_entropy(logits.reshape({-1, config_.vocab}),
                                              next.reshape({-1}));
}

std::vector<fsdp::ModuleSlot*> BenchTransformerImpl::layer_slots() {
  std::vector<fsdp::ModuleSlot*> slots = transformer->encoder->layers->slots();
  for (fsdp::ModuleSlot* slot : transformer->decoder->layers->slots()) slots.push_back(slot);
  return slots;
}

}  // namespace fsdp::bench
