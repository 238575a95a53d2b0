// BenchTransformer: a transformer language model of about 52.5M parameters for the benchmarks
// in bench/, built from the reference model's blocks (models/transformer.h).
//
// Why not TransformerWithSharedParams itself: its vocabulary (23) and width (16) are fixed
// constants of PyTorch's test model, so it cannot be sized to the >= 50M parameters the
// benchmarks need. This model keeps its shape (token embedding, nn.Transformer-style encoder
// and decoder whose layers sit in fsdp::ModuleSlots, output projection) at a larger size:
//
//   vocab 8192, d_model 512, 8 heads, 6 encoder + 6 decoder layers, dim_feedforward 2048,
//   dropout 0; output_proj is not tied to the embedding.
//
// Parameters: embedding 4.19M, encoder layers 3.15M each, decoder layers 4.20M each,
// output_proj 4.20M: 52.5M in all (210 MB of float32). FSDP units: one per layer
// (layer_slots()) plus the root, which holds the embedding, the output projection and the
// final norms (8.4M parameters, the largest unit).
//
// Every rank builds the same values (torch::manual_seed(seed) first).
#ifndef FSDP_CPP_BENCH_BENCH_TRANSFORMER_H_
#define FSDP_CPP_BENCH_BENCH_TRANSFORMER_H_

#include <torch/nn/module.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "fsdp/module_slot.h"
#include "models/transformer.h"

namespace fsdp::bench {

struct BenchTransformerConfig {
  int64_t vocab = 8192;
  int64_t d_model = 512;
  int64_t nhead = 8;
  int64_t num_encoder_layers = 6;
  int64_t num_decoder_layers = 6;
  int64_t dim_feedforward = 2048;
};

class BenchTransformerImpl : public torch::nn::Module {
 public:
  explicit BenchTransformerImpl(const BenchTransformerConfig& config = {}, uint64_t seed = 0);

  // src_ids [S, B], tgt_ids [T, B] (int64) -> logits [T, B, vocab].
  torch::Tensor forward(const torch::Tensor& src_ids, const torch::Tensor& tgt_ids);

  // A batch of random token ids drawn from `seed`: src [seq, batch], tgt [seq + 1, batch]
  // (the model reads tgt[:-1] and predicts tgt[1:]).
  std::pair<torch::Tensor, torch::Tensor> MakeBatch(int64_t seq, int64_t batch,
                                                    uint64_t seed) const;
  // Next-token cross-entropy (mean) of `model_forward`'s logits on a MakeBatch batch.
  torch::Tensor Loss(const torch::Tensor& logits, const torch::Tensor& tgt) const;

  // Encoder layers, then decoder layers: one FSDP unit each.
  std::vector<fsdp::ModuleSlot*> layer_slots();

  const BenchTransformerConfig& config() const { return config_; }

  torch::nn::Embedding embed_tokens{nullptr};
  models::Transformer transformer{nullptr};
  torch::nn::Linear output_proj{nullptr};

 private:
  BenchTransformerConfig config_;
};
TORCH_MODULE(BenchTransformer);

}  // namespace fsdp::bench

#endif  // FSDP_CPP_BENCH_BENCH_TRANSFORMER_H_
