// Sub-groups of a real Gloo group: membership, rank mapping, collectives inside each.
#include <ATen/ATen.h>

#include "comm/multiprocess_testutil.h"
#include "comm/process_group.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fsdp::comm {
namespace {

using ::fsdp::testing::RunInRanks;
using ::fsdp::testing::StatusIs;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;

class SubgroupTest : public ::testing::TestWithParam<int> {};

TEST_P(SubgroupTest, EvenAndOddHalvesReduceSeparately) {
  // PyTorch's halve-world-size tests build a group of the even ranks.
  RunInRanks(GetParam(), [](ProcessGroup& group) {
    std::vector<int> even, odd;
    for (int r = 0; r < group.size(); ++r) (r % 2 == 0 ? even : odd).push_back(r);
    FSDP_ASSERT_OK_AND_ASSIGN(auto even_group, group.NewSubgroup(even));
    std::shared_ptr<ProcessGroup> odd_group;
    if (!odd.empty()) {
      FSDP_ASSERT_OK_AND_ASSIGN(odd_group, group.NewSubgroup(odd));
    }
    const bool is_even = group.rank() % 2 == 0;
    std::shared_ptr<ProcessGroup> mine = is_even ? even_group : odd_group;
    ASSERT_NE(mine, nullptr);
    EXPECT_EQ(is_even ? odd_group : even_group, nullptr) << "member of the other half";
    const std::vector<int>& members = is_even ? even : odd;
    EXPECT_EQ(mine->size(), static_cast<int>(members.size()));
    EXPECT_EQ(mine->rank(), group.rank() / 2);
    EXPECT_THAT(mine->global_ranks(), ElementsAreArray(members));
    EXPECT_THAT(mine->name(), HasSubstr(is_even ? "[0" : "[1"));

    at::Tensor t = at::full({5}, static_cast<float>(group.rank()));
    FSDP_ASSERT_OK(mine->AllReduce(t, ReduceOp::kSum));
    float expected = 0;
    for (int r : members) expected += r;
    EXPECT_TRUE(at::equal(t, at::full({5}, expected)));

    at::Tensor shard = at::full({3}, static_cast<float>(group.rank()));
    at::Tensor gathered = at::empty({3 * mine->size()});
    FSDP_ASSERT_OK(mine->AllGatherIntoTensor(gathered, shard));
    for (int i = 0; i < mine->size(); ++i) {
      EXPECT_EQ(gathered[3 * i].item<float>(), members[i]);
    }
    // The parent group still works alongside.
    FSDP_ASSERT_OK(group.Barrier());
  });
}

TEST_P(SubgroupTest, NestedSubgroupMapsToGlobalRanks) {
  RunInRanks(GetParam(), [](ProcessGroup& group) {
    std::vector<int> all;
    for (int r = group.size() - 1; r >= 0; --r) all.insert(all.begin(), r);
    FSDP_ASSERT_OK_AND_ASSIGN(auto copy, group.NewSubgroup(all));
    ASSERT_NE(copy, nullptr);
    FSDP_ASSERT_OK_AND_ASSIGN(auto last, copy->NewSubgroup({copy->size() - 1}));
    if (group.rank() == group.size() - 1) {
      ASSERT_NE(last, nullptr);
      EXPECT_EQ(last->size(), 1);
      EXPECT_THAT(last->global_ranks(), ElementsAreArray({group.size() - 1}));
      at::Tensor t = at::ones({2});
      FSDP_EXPECT_OK(last->AllReduce(t));
    } else {
      EXPECT_EQ(last, nullptr);
    }
  });
}

TEST_P(SubgroupTest, BadRankListsAreRefused) {
  RunInRanks(GetParam(), [](ProcessGroup& group) {
    EXPECT_THAT(group.NewSubgroup({}),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("empty rank list")));
    EXPECT_THAT(group.NewSubgroup({0, group.size()}),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("must be increasing")));
    EXPECT_THAT(group.NewSubgroup({0, 0}),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("without repeats")));
  });
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, SubgroupTest, ::testing::Values(1, 2, 3, 4),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return "ws" + std::to_string(info.param);
                         });

}  // namespace
}  // namespace fsdp::comm
