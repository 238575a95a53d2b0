// CharTransformerLM: a character-level, decoder-only transformer language model
// for the main job (examples/train --model=lm), built from
// TransformerWithSharedParams' parts (transformer.h): token embedding tied to
// the output projection, a learned position embedding, a stack of post-norm
// TransformerEncoderLayers with causal self-attention (each layer in an
// fsdp::ModuleSlot, so FSDP can make one unit per layer), a final LayerNorm.
//
// Input: token ids [T, B] (sequence first, T <= context), output: logits [T, B,
// vocab]; the logits at position t predict token t + 1.
//
// Construction draws, in this order, after torch::manual_seed(config.seed) —
// the order a PyTorch module built the same way draws in (torch.manual_seed;
// nn.Embedding, whose weight is then re-drawn by normal_(0, 0.02); a pos_embed
// Parameter filled by normal_(0, 0.02); one nn.TransformerEncoderLayer,
// deep-copied num_layers times by nn.TransformerEncoder with a final LayerNorm;
// xavier_uniform_ of every encoder parameter with more than one dimension in
// named_parameters() order; nn.Linear output projection whose weight is then
// replaced by the embedding's):
//   embed_tokens.weight ~ N(0, 1), then ~ N(0, 0.02); pos_embed ~ N(0, 0.02);
//   layer 0's out_proj, in_proj, linear1, linear2 initialisers; xavier_uniform_
//   of each >1-dim encoder parameter; the output projection's Linear
//   initialiser (its bias stays, its weight is discarded).
// Dropout is 0: training is deterministic and equal on every rank.
// models/testdata/ reference_models.py builds the same model in PyTorch
// ("char_lm"); models_test compares.
#ifndef FSDP_CPP_MODELS_CHAR_LM_H_
#define FSDP_CPP_MODELS_CHAR_LM_H_

#include <torch/nn/module.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <cstdint>
#include <vector>

#include "fsdp/module_slot.h"
#include "models/transformer.h"

namespace fsdp::models {

struct CharLMConfig {
  int64_t vocab_size = 64;
  int64_t context = 64;  // longest input sequence (rows of pos_embed)
  int64_t d_model = 128;
  int64_t nhead = 4;
  int64_t num_layers = 4;
  int64_t dim_feedforward = 512;
  uint64_t seed = 0;
};

class CharTransformerLMImpl : public torch::nn::Module {
 public:
  // Throws c10::Error for non-positive sizes or d_model not divisible by nhead.
  explicit CharTransformerLMImpl(const CharLMConfig& config);

  // ids: int64 [T, B] with 1 <= T <= context and values in [0, vocab_size).
  torch::Tensor forward(const torch::Tensor& ids);

  // Mean cross-entropy of forward(inputs) against targets [T, B].
  torch::Tensor loss(const torch::Tensor& inputs, const torch::Tensor& targets);

  // One slot per transformer layer, in order (FSDP's per-layer units).
  std::vector<fsdp::ModuleSlot*> layer_slots();

  const CharLMConfig& config() const { return config_; }

  torch::nn::Embedding embed_tokens{nullptr};
  torch::Tensor pos_embed;  // [context, d_model]
  TransformerEncoder encoder{nullptr};
  TiedLinear output_proj{nullptr};

 private:
  CharLMConfig config_;
};
TORCH_MODULE(CharTransformerLM);

}  // namespace fsdp::models

#endif  // FSDP_CPP_MODELS_CHAR_LM_H_
