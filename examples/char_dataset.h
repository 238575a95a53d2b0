// CharDataset: a text tokenised by characters, and the batches the main job
// trains on.
//
// The vocabulary is the text's distinct bytes in increasing order (token i is
// the i-th smallest byte value present). Batches are deterministic functions of
// (seed, step): the global batch of a step is `global_batch` windows of context
// + 1 characters whose starts are drawn by std::mt19937_64 seeded with seed and
// step, so a job resumed at step k sees exactly the batches an uninterrupted
// job sees, at any world size. Rank r of N takes windows [r * global_batch / N,
// (r + 1) * global_batch / N).
#ifndef FSDP_CPP_EXAMPLES_CHAR_DATASET_H_
#define FSDP_CPP_EXAMPLES_CHAR_DATASET_H_

#include <torch/types.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace fsdp::examples {

// The default training text shipped in the binary: the first scenes of
// Shakespeare's Coriolanus (public domain), about 16 KB.
absl::string_view DefaultTrainingText();

class CharDataset {
 public:
  // Errors: INVALID_ARGUMENT if the text has fewer than context + 2 characters
  // or context < 1.
  static absl::StatusOr<CharDataset> Create(std::string text, int64_t context);

  int64_t vocab_size() const { return static_cast<int64_t>(vocab_.size()); }
  int64_t context() const { return context_; }
  int64_t size() const { return static_cast<int64_t>(text_.size()); }

  // This rank's (inputs, targets), each int64 [context, global_batch /
  // world_size]: targets are inputs shifted by one character. Errors:
  // INVALID_ARGUMENT if global_batch is not a positive multiple of world_size,
  // or rank is outside [0, world_size).
  absl::StatusOr<std::pair<torch::Tensor, torch::Tensor>> Batch(uint64_t seed, int64_t step,
                                                                int64_t global_batch, int rank,
                                                                int world_size) const;

  // The characters of token ids (for printing samples).
  std::string Decode(const torch::Tensor& ids) const;

 private:
  CharDataset() = default;
  std::string text_;
  std::string vocab_;            // token -> byte
  std::vector<int64_t> tokens_;  // the text as token ids
  int64_t context_ = 0;
};

}  // namespace fsdp::examples

#endif  // FSDP_CPP_EXAMPLES_CHAR_DATASET_H_
