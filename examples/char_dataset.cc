#include "examples/char_dataset.h"

#include <algorithm>
#include <array>
#include <random>

#include "absl/strings/str_cat.h"

extern const char kFsdpDefaultTrainingText[];
extern const unsigned long kFsdpDefaultTrainingTextSize;

namespace fsdp::examples {

absl::string_view DefaultTrainingText() {
  return absl::string_view(kFsdpDefaultTrainingText, kFsdpDefaultTrainingTextSize);
}

absl::StatusOr<CharDataset> CharDataset::Create(std::string text, int64_t context) {
  if (context < 1) {
    return absl::InvalidArgumentError(absl::StrCat("CharDataset: context ", context, " < 1"));
  }
  if (static_cast<int64_t>(text.size()) < context + 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("CharDataset: the text has ", text.size(),
                     " characters, fewer than context + 2 = ", context + 2));
  }
  CharDataset dataset;
  std::array<int64_t, 256> token_of{};
  std::array<bool, 256> present{};
  for (unsigned char c : text) present[c] = true;
  for (int b = 0; b < 256; ++b) {
    if (present[b]) {
      token_of[b] = static_cast<int64_t>(dataset.vocab_.size());
      dataset.vocab_.push_back(static_cast<char>(b));
    }
  }
  dataset.tokens_.reserve(text.size());
  for (unsigned char c : text) dataset.tokens_.push_back(token_of[c]);
  dataset.text_ = std::move(text);
  dataset.context_ = context;
  return dataset;
}

absl::StatusOr<std::pair<torch::Tensor, torch::Tensor>> CharDataset::Batch(
    uint64_t seed, int64_t step, int64_t global_batch, int rank, int world_size) const {
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("CharDataset::Batch: rank ", rank, " of world size ", world_size));
  }
  if (global_batch < 1 || global_batch % world_size != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("CharDataset::Batch: global batch ", global_batch,
                     " is not a positive multiple of the world size ", world_size));
  }
  const int64_t local = global_batch / world_size;
  std::mt19937_64 engine(seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(step));
  std::uniform_int_distribution<int64_t> start_of(0, size() - context_ - 2);
  torch::Tensor inputs = torch::empty({context_, local}, torch::kLong);
  torch::Tensor targets = torch::empty({context_, local}, torch::kLong);
  auto in = inputs.accessor<int64_t, 2>();
  auto out = targets.accessor<int64_t, 2>();
  for (int64_t window = 0; window < global_batch; ++window) {
    const int64_t start = start_of(engine);  // every rank draws every window: same sequence
    const int64_t column = window - rank * local;
    if (column < 0 || column >= local) continue;
    for (int64_t t = 0; t < context_; ++t) {
      in[t][column] = tokens_[start + t];
      out[t][column] = tokens_[start + t + 1];
    }
  }
  return std::make_pair(inputs, targets);
}

std::string CharDataset::Decode(const torch::Tensor& ids) const {
  std::string text;
  torch::Tensor flat = ids.reshape({-1}).to(torch::kLong).contiguous();
  const int64_t* data = flat.data_ptr<int64_t>();
  for (int64_t i = 0; i < flat.numel(); ++i) {
    text.push_back(data[i] >= 0 && data[i] < vocab_size() ? vocab_[data[i]] : '?');
  }
  return text;
}

}  // namespace fsdp::examples
