#include "models/char_lm.h"

#include <c10/util/Exception.h>
#include <torch/nn/functional/loss.h>
#include <torch/nn/init.h>

namespace fsdp::models {

CharTransformerLMImpl::CharTransformerLMImpl(const CharLMConfig& config) : config_(config) {
  TORCH_CHECK(config.vocab_size > 0 && config.context > 0 && config.d_model > 0 &&
                  config.nhead > 0 && config.num_layers > 0 && config.dim_feedforward > 0,
              "CharTransformerLM: every size must be positive");
  TORCH_CHECK(config.d_model % config.nhead == 0, "CharTransformerLM: d_model ", config.d_model,
              " is not divisible by nhead ", config.nhead);
  torch::manual_seed(config.seed);
  embed_tokens =
      register_module("embed_tokens", torch::nn::Embedding(config.vocab_size, config.d_model));
  pos_embed = register_parameter("pos_embed", torch::empty({config.context, config.d_model}));
  {
    torch::NoGradGuard no_grad;
    embed_tokens->weight.normal_(0.0, 0.02);  // small logits from the tied projection at first
    pos_embed.normal_(0.0, 0.02);
  }
  TransformerConfig layer_config{.d_model = config.d_model,
                                 .nhead = config.nhead,
                                 .num_encoder_layers = config.num_layers,
                                 .num_decoder_layers = 0,
                                 .dim_feedforward = config.dim_feedforward,
                                 .dropout = 0.0,
                                 .causal = true};
  TransformerEncoderLayer prototype(layer_config);
  encoder =
      register_module("encoder", TransformerEncoder(prototype, config.num_layers, layer_config));
  {
    torch::NoGradGuard no_grad;
    for (torch::Tensor& p : encoder->parameters()) {
      if (p.dim() > 1) torch::nn::init::xavier_uniform_(p);
    }
  }
  output_proj = register_module("output_proj", TiedLinear(config.d_model, config.vocab_size));
  output_proj->tie_weight(embed_tokens->weight);
}

torch::Tensor CharTransformerLMImpl::forward(const torch::Tensor& ids) {
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) >= 1 && ids.size(0) <= config_.context,
              "CharTransformerLM: ids must be [T, B] with 1 <= T <= ", config_.context, ", got ",
              ids.sizes());
  const int64_t length = ids.size(0);
  torch::Tensor x = embed_tokens(ids) + pos_embed.narrow(0, 0, length).unsqueeze(1);
  return output_proj(encoder(x));
}

torch::Tensor CharTransformerLMImpl::loss(const torch::Tensor& inputs,
                                          const torch::Tensor& targets) {
  torch::Tensor logits = forward(inputs);
  return torch::nn::functional::cross_entropy(logits.reshape({-1, config_.vocab_size}),
                                              targets.reshape({-1}));
}

std::vector<fsdp::ModuleSlot*> CharTransformerLMImpl::layer_slots() {
  return encoder->layers->slots();
}

}  // namespace fsdp::models
