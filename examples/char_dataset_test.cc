#include "examples/char_dataset.h"

#include <torch/torch.h>

#include <string>

#include "absl/strings/match.h"
#include "comm/multiprocess_testutil.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fsdp::examples {
namespace {

using ::fsdp::testing::StatusIs;
using ::testing::HasSubstr;

TEST(CharDataset, DefaultTextIsTheShippedPlay) {
  const absl::string_view text = DefaultTrainingText();
  EXPECT_GT(text.size(), 15000u);
  EXPECT_TRUE(absl::StartsWith(text, "First Citizen:\nBefore we proceed any further"));
  auto dataset = CharDataset::Create(std::string(text), 64);
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  EXPECT_EQ(dataset->vocab_size(), 58);
}

TEST(CharDataset, VocabularyIsTheSortedDistinctCharacters) {
  auto dataset = CharDataset::Create("banana bread", 3);
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  EXPECT_EQ(dataset->vocab_size(), 7);  // ' ', a, b, d, e, n, r
  EXPECT_EQ(dataset->Decode(torch::tensor({0, 1, 2, 3, 4, 5, 6})), " abdenr");
}

TEST(CharDataset, TargetsAreInputsShiftedByOneCharacter) {
  const std::string text = "abcdefghijklmnopqrstuvwxyz";
  auto dataset = CharDataset::Create(text, 5);
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  auto batch = dataset->Batch(/*seed=*/7, /*step=*/3, /*global_batch=*/4, 0, 1);
  ASSERT_TRUE(batch.ok()) << batch.status();
  const auto& [inputs, targets] = *batch;
  ASSERT_EQ(inputs.sizes(), (std::vector<int64_t>{5, 4}));
  for (int64_t column = 0; column < 4; ++column) {
    const std::string in = dataset->Decode(inputs.select(1, column));
    const std::string out = dataset->Decode(targets.select(1, column));
    const size_t start = text.find(in);
    ASSERT_NE(start, std::string::npos) << in;
    EXPECT_EQ(out, text.substr(start + 1, 5));
  }
}

TEST(CharDataset, RanksSplitTheSameGlobalBatchAtEveryWorldSize) {
  auto dataset = CharDataset::Create(std::string(DefaultTrainingText()), 16);
  ASSERT_TRUE(dataset.ok()) << dataset.status();
  auto whole = dataset->Batch(1, 42, 12, 0, 1);
  ASSERT_TRUE(whole.ok()) << whole.status();
  for (int world_size : {2, 3, 4}) {
    std::vector<torch::Tensor> pieces;
    for (int rank = 0; rank < world_size; ++rank) {
      auto part = dataset->Batch(1, 42, 12, rank, world_size);
      ASSERT_TRUE(part.ok()) << part.status();
      pieces.push_back(part->first);
    }
    EXPECT_TRUE(torch::equal(torch::cat(pieces, 1), whole->first)) << world_size;
  }
  auto other_step = dataset->Batch(1, 43, 12, 0, 1);
  ASSERT_TRUE(other_step.ok());
  EXPECT_FALSE(torch::equal(other_step->first, whole->first));
}

TEST(CharDataset, RefusesBadArguments) {
  EXPECT_THAT(CharDataset::Create("abc", 5).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("fewer than context + 2")));
  EXPECT_THAT(CharDataset::Create("abcdef", 0).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("context 0 < 1")));
  auto dataset = CharDataset::Create("abcdefghij", 3);
  ASSERT_TRUE(dataset.ok());
  EXPECT_THAT(dataset->Batch(0, 0, 5, 0, 2).status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("global batch 5 is not a positive multiple of "
                                 "the world size 2")));
  EXPECT_THAT(dataset->Batch(0, 0, 4, 2, 2).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("rank 2 of world size 2")));
}

}  // namespace
}  // namespace fsdp::examples
