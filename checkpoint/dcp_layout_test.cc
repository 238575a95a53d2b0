// The keys and planner_data paths of dcp_layout against .metadata files PyTorch 2.13's dcp.save
// wrote (the fuzz seeds: torchtitan's layout from FSDP2 at 2 ranks, the tutorial's with two
// Adam groups), layout detection and its error, and FlatRangeToBoxes on every range of small
// shapes against a brute-force search for the fewest contiguous boxes.
#include "checkpoint/dcp_layout.h"

#include <algorithm>
#include <climits>
#include <functional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "checkpoint/file_testutil.h"
#include "comm/multiprocess_testutil.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tools/python_testutil.h"

namespace fsdp::checkpoint::dcp {
namespace {

using ::fsdp::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

Metadata Seed(const std::string& name) {
  const std::string bytes = testing::ReadFileBytes(fsdp::testing::Runfile(
      "checkpoint/testdata/fuzz_corpus/dcp_metadata/seed_" + name + ".metadata"));
  absl::StatusOr<Metadata> m = ParseMetadata(bytes, name + "/.metadata");
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? *std::move(m) : Metadata();
}

// Every key PyTorch wrote is the one DcpModelKey / DcpOptimStateKey / DcpParamGroupKey make,
// path included, and SplitDcpKeys sorts each where it belongs (with and without planner_data).
void ExpectKeysRebuilt(const Metadata& m, const DcpLayout& layout, size_t params, size_t groups) {
  for (bool with_paths : {true, false}) {
    Metadata copy = m;
    if (!with_paths) copy.planner_data.clear();
    absl::StatusOr<DcpStateKeys> keys = SplitDcpKeys(copy, layout, "x/.metadata");
    ASSERT_TRUE(keys.ok()) << keys.status();
    EXPECT_THAT(keys->other, IsEmpty());
    EXPECT_EQ(keys->model.size(), params);
    EXPECT_EQ(keys->optim_state.size(), params);
    ASSERT_EQ(keys->param_groups.size(), groups);
    size_t rebuilt = 0;
    for (const auto& [fqn, key] : keys->model) {
      const DcpKey k = DcpModelKey(layout, fqn);
      EXPECT_EQ(k.key, key);
      EXPECT_EQ(k.path, m.planner_data.at(key));
      ++rebuilt;
    }
    for (const auto& [fqn, names] : keys->optim_state) {
      EXPECT_EQ(names.size(), 3u) << fqn;  // Adam: step, exp_avg, exp_avg_sq
      for (const auto& [name, key] : names) {
        const DcpKey k = DcpOptimStateKey(layout, fqn, name);
        EXPECT_EQ(k.key, key);
        EXPECT_EQ(k.path, m.planner_data.at(key));
        ++rebuilt;
      }
    }
    for (size_t g = 0; g < keys->param_groups.size(); ++g) {
      EXPECT_EQ(keys->param_groups[g].count("params"), 1u);
      EXPECT_EQ(keys->param_groups[g].count("lr"), 1u);
      for (const auto& [hp, key] : keys->param_groups[g]) {
        const DcpKey k = DcpParamGroupKey(layout, static_cast<int64_t>(g), hp);
        EXPECT_EQ(k.key, key);
        EXPECT_EQ(k.path, m.planner_data.at(key));
        ++rebuilt;
      }
    }
    EXPECT_EQ(rebuilt, m.state_dict_metadata.size());
  }
}

TEST(DcpLayout, TorchtitanKeysAreWhatPyTorchWrote) {
  const Metadata m = Seed("fsdp2");
  absl::StatusOr<DcpLayout> layout = DetectDcpLayout(m, "fsdp2/.metadata");
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_EQ(layout->name, "torchtitan");
  EXPECT_EQ(layout->ModelPrefix(), "model.");
  EXPECT_EQ(layout->OptimPrefix(), "optimizer.");
  ExpectKeysRebuilt(m, *layout, 6, 1);
  EXPECT_EQ(DcpParamGroupKey(*layout, 0, "betas").key, "optimizer.param_groups.0.betas");
  EXPECT_THAT(DcpParamGroupKey(*layout, 0, "betas").path,
              ElementsAre(PathElement("optimizer"), PathElement("param_groups"),
                          PathElement(int64_t{0}), PathElement("betas")));
}

TEST(DcpLayout, TutorialKeysAreWhatPyTorchWrote) {
  const Metadata m = Seed("tutorial");
  absl::StatusOr<DcpLayout> layout = DetectDcpLayout(m, "tutorial/.metadata");
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_EQ(layout->name, "tutorial");
  EXPECT_EQ(layout->ModelPrefix(), "app.model.");
  EXPECT_EQ(layout->OptimPrefix(), "app.optim.");
  ExpectKeysRebuilt(m, *layout, 4, 2);
  EXPECT_EQ(DcpOptimStateKey(*layout, "2.weight", "exp_avg").key,
            "app.optim.state.2.weight.exp_avg");
}

TEST(DcpLayout, CallerNamedPathsSortKeys) {
  absl::StatusOr<DcpLayout> app = ParseDcpLayout("model=app.model,optim=app.optim");
  ASSERT_TRUE(app.ok()) << app.status();
  EXPECT_EQ(app->model_path, TutorialLayout().model_path);
  ExpectKeysRebuilt(Seed("tutorial"), *app, 4, 2);
  // Under another layout the same keys are all "other": a load ignores them.
  absl::StatusOr<DcpStateKeys> keys =
      SplitDcpKeys(Seed("tutorial"), TorchtitanLayout(), "tutorial/.metadata");
  ASSERT_TRUE(keys.ok());
  EXPECT_TRUE(keys->model.empty());
  EXPECT_EQ(keys->other.size(), Seed("tutorial").state_dict_metadata.size());
  // A bare model state dict: the model's FQNs at the top, no optimizer.
  absl::StatusOr<DcpLayout> bare = ParseDcpLayout("model=,optim=");
  ASSERT_TRUE(bare.ok());
  EXPECT_FALSE(bare->has_optimizer());
  EXPECT_EQ(DcpModelKey(*bare, "block0.weight").key, "block0.weight");
  keys = SplitDcpKeys(Seed("fsdp2"), *bare, "fsdp2/.metadata");
  ASSERT_TRUE(keys.ok());
  EXPECT_EQ(keys->model.count("optimizer.state.0.weight.step"), 1u);
}

TEST(DcpLayout, ParseRefusesWhatItCannotRead) {
  for (const char* spec : {"", "titan", "model=a", "model=a,optim=b,x=c", "model=a..b,optim=c",
                           "optim=a,model=b", "model=a,optim=a"}) {
    EXPECT_THAT(ParseDcpLayout(spec),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("DCP layout")))
        << spec;
  }
  EXPECT_EQ(ParseDcpLayout("app")->name, "tutorial");
}

TEST(DcpLayout, DetectNamesTheFileAndTopLevelKeys) {
  EXPECT_THAT(DetectDcpLayout(Seed("plain"), "ckpt/.metadata"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       ::testing::AllOf(HasSubstr("ckpt/.metadata"), HasSubstr("no known layout"),
                                        HasSubstr("[b, bf16, bool, empty, f16"),
                                        HasSubstr("model=PATH,optim=PATH"))));
}

TEST(DcpLayout, SplitRefusesMalformedOptimizerKeys) {
  Metadata m = Seed("fsdp2");
  m.planner_data.clear();
  m.state_dict_metadata["optimizer.stats.x"] = BytesStorageMetadata{};
  EXPECT_THAT(
      SplitDcpKeys(m, TorchtitanLayout(), "f/.metadata"),
      StatusIs(absl::StatusCode::kInvalidArgument,
               ::testing::AllOf(HasSubstr("f/.metadata"), HasSubstr("\"optimizer.stats.x\""))));
  m = Seed("fsdp2");
  m.planner_data.clear();
  m.state_dict_metadata["optimizer.param_groups.2.lr"] = BytesStorageMetadata{};
  EXPECT_THAT(SplitDcpKeys(m, TorchtitanLayout(), "f/.metadata"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("no group 1 but a group 2")));
}

// ---- FlatRangeToBoxes

int64_t Numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// The flat indices of a box's elements in its row-major order.
std::vector<int64_t> BoxElements(const std::vector<int64_t>& shape, const ChunkStorageMetadata& b) {
  std::vector<int64_t> out;
  std::function<void(size_t, int64_t)> walk = [&](size_t d, int64_t flat) {
    if (d == shape.size()) {
      out.push_back(flat);
      return;
    }
    for (int64_t i = b.offsets[d]; i < b.offsets[d] + b.sizes[d]; ++i) {
      walk(d + 1, flat * shape[d] + i);
    }
  };
  walk(0, 0);
  return out;
}

// The fewest boxes, each a contiguous piece of the flat order, partitioning [begin, end): a
// shortest path over the range's cut points, where [i, j) is a step when it is a box (its
// bounding box holds no more elements than it).
int MinContiguousBoxes(const std::vector<int64_t>& shape, int64_t begin, int64_t end) {
  auto is_box = [&](int64_t i, int64_t j) {
    std::vector<int64_t> low(shape.size(), INT64_MAX), high(shape.size(), -1);
    for (int64_t f = i; f < j; ++f) {
      for (size_t d = shape.size(), rest = static_cast<size_t>(f); d-- > 0;) {
        const int64_t x = static_cast<int64_t>(rest % static_cast<size_t>(shape[d]));
        rest /= static_cast<size_t>(shape[d]);
        low[d] = std::min(low[d], x);
        high[d] = std::max(high[d], x);
      }
    }
    int64_t volume = 1;
    for (size_t d = 0; d < shape.size(); ++d) volume *= high[d] - low[d] + 1;
    return volume == j - i;
  };
  std::vector<int> best(static_cast<size_t>(end - begin + 1), 1 << 20);
  best[0] = 0;
  for (int64_t j = begin + 1; j <= end; ++j) {
    for (int64_t i = begin; i < j; ++i) {
      if (is_box(i, j)) {
        best[static_cast<size_t>(j - begin)] = std::min(best[static_cast<size_t>(j - begin)],
                                                        best[static_cast<size_t>(i - begin)] + 1);
      }
    }
  }
  return best.back();
}

class FlatRangeToBoxesTest : public ::testing::TestWithParam<std::vector<int64_t>> {};

TEST_P(FlatRangeToBoxesTest, EveryRangeIsCoveredExactlyByTheFewestBoxes) {
  const std::vector<int64_t>& shape = GetParam();
  const int64_t numel = Numel(shape);
  const bool brute_force = numel <= 48;
  for (int64_t begin = 0; begin <= numel; ++begin) {
    for (int64_t end = begin; end <= numel; ++end) {
      SCOPED_TRACE(absl::StrCat("[", begin, ", ", end, ")"));
      absl::StatusOr<std::vector<ChunkStorageMetadata>> boxes = FlatRangeToBoxes(shape, begin, end);
      ASSERT_TRUE(boxes.ok()) << boxes.status();
      // Concatenated in order, the boxes' elements are exactly begin, begin + 1, ..., end - 1:
      // the union is the range, nothing overlaps, and each box is contiguous in flat order.
      std::vector<int64_t> flat;
      for (const ChunkStorageMetadata& b : *boxes) {
        ASSERT_EQ(b.offsets.size(), shape.size());
        ASSERT_EQ(b.sizes.size(), shape.size());
        for (size_t d = 0; d < shape.size(); ++d) {
          ASSERT_GE(b.offsets[d], 0);
          ASSERT_GE(b.sizes[d], 1);
          ASSERT_LE(b.offsets[d] + b.sizes[d], shape[d]);
        }
        const std::vector<int64_t> cells = BoxElements(shape, b);
        flat.insert(flat.end(), cells.begin(), cells.end());
      }
      std::vector<int64_t> range(static_cast<size_t>(end - begin));
      for (int64_t i = begin; i < end; ++i) range[static_cast<size_t>(i - begin)] = i;
      ASSERT_EQ(flat, range);
      EXPECT_LE(boxes->size(), shape.empty() ? 1 : 2 * shape.size() - 1);
      if (brute_force && begin < end) {
        EXPECT_EQ(static_cast<int>(boxes->size()), MinContiguousBoxes(shape, begin, end));
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, FlatRangeToBoxesTest,
    ::testing::Values(std::vector<int64_t>{}, std::vector<int64_t>{1}, std::vector<int64_t>{7},
                      std::vector<int64_t>{2, 3}, std::vector<int64_t>{4, 1},
                      std::vector<int64_t>{1, 5}, std::vector<int64_t>{3, 4},
                      std::vector<int64_t>{2, 2, 2}, std::vector<int64_t>{3, 1, 2},
                      std::vector<int64_t>{2, 3, 4}, std::vector<int64_t>{2, 1, 2, 3},
                      std::vector<int64_t>{3, 2, 2, 2}, std::vector<int64_t>{0, 3},
                      std::vector<int64_t>{3, 0, 2}),
    [](const ::testing::TestParamInfo<std::vector<int64_t>>& info) {
      return info.param.empty() ? std::string("scalar") : absl::StrJoin(info.param, "x");
    });

TEST(FlatRangeToBoxes, ScalarIsOneEmptyBox) {
  absl::StatusOr<std::vector<ChunkStorageMetadata>> boxes = FlatRangeToBoxes({}, 0, 1);
  ASSERT_TRUE(boxes.ok());
  ASSERT_EQ(boxes->size(), 1u);
  EXPECT_THAT((*boxes)[0].offsets, IsEmpty());
  EXPECT_THAT((*boxes)[0].sizes, IsEmpty());
}

TEST(FlatRangeToBoxes, RefusesRangesOutsideTheTensor) {
  for (auto [b, e] : {std::pair<int64_t, int64_t>{-1, 2}, {3, 2}, {0, 7}, {6, 7}}) {
    EXPECT_THAT(FlatRangeToBoxes({2, 3}, b, e),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         HasSubstr("is not within a tensor of shape (2, 3) (6 elements)")));
  }
}

}  // namespace
}  // namespace fsdp::checkpoint::dcp
