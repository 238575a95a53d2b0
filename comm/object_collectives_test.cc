// Broadcast, scatter and all-gather of serialized objects, including objects over 64 MiB.
#include <ATen/ATen.h>

#include <random>

#include "comm/multiprocess_testutil.h"
#include "comm/process_group.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fsdp::comm {
namespace {

using ::fsdp::testing::RunInRanks;
using ::fsdp::testing::StatusIs;
using ::testing::HasSubstr;

class ObjectCollectivesTest : public ::testing::TestWithParam<int> {};

std::string Bytes(size_t size, uint32_t seed) {
  std::string out(size, '\0');
  std::mt19937 gen(seed);
  for (char& c : out) c = static_cast<char>(gen() & 0xff);
  return out;
}

TEST_P(ObjectCollectivesTest, BroadcastObjectLargerThan64MiB) {
  RunInRanks(GetParam(), [](ProcessGroup& group) {
    const size_t size = (64u << 20) + 12345;
    const int root = group.size() - 1;
    const std::string expected = Bytes(size, 7);
    FSDP_ASSERT_OK_AND_ASSIGN(
        std::string got,
        group.BroadcastObject(group.rank() == root ? expected : std::string("ignored"), root));
    ASSERT_EQ(got.size(), size);
    EXPECT_TRUE(got == expected);
  });
}

TEST_P(ObjectCollectivesTest, BroadcastEmptyObject) {
  RunInRanks(GetParam(), [](ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(std::string got,
                              group.BroadcastObject(group.rank() == 0 ? "" : "junk", 0));
    EXPECT_EQ(got, "");
  });
}

TEST_P(ObjectCollectivesTest, ScatterObjectGivesEachRankItsOwn) {
  RunInRanks(GetParam(), [](ProcessGroup& group) {
    for (int root = 0; root < group.size(); ++root) {
      std::vector<std::string> per_rank;
      if (group.rank() == root) {
        for (int r = 0; r < group.size(); ++r) {
          // Rank 1's object is empty; the others differ in size and content.
          per_rank.push_back(r == 1 ? std::string() : Bytes(1000 * r + 3, r));
        }
      }
      FSDP_ASSERT_OK_AND_ASSIGN(std::string got, group.ScatterObject(per_rank, root));
      const int r = group.rank();
      EXPECT_TRUE(got == (r == 1 ? std::string() : Bytes(1000 * r + 3, r))) << "root " << root;
    }
  });
}

TEST_P(ObjectCollectivesTest, ScatterObjectLargerThan64MiB) {
  RunInRanks(GetParam(), [](ProcessGroup& group) {
    std::vector<std::string> per_rank;
    if (group.rank() == 0) {
      for (int r = 0; r < group.size(); ++r) per_rank.push_back(Bytes((65u << 20) + r, r));
    }
    FSDP_ASSERT_OK_AND_ASSIGN(std::string got, group.ScatterObject(per_rank, 0));
    EXPECT_TRUE(got == Bytes((65u << 20) + group.rank(), group.rank()));
  });
}

TEST_P(ObjectCollectivesTest, ScatterObjectWithWrongCountFailsOnEveryRank) {
  RunInRanks(GetParam(), [](ProcessGroup& group) {
    std::vector<std::string> too_many(group.size() + 1, "x");
    EXPECT_THAT(group.ScatterObject(group.rank() == 0 ? too_many : std::vector<std::string>{}, 0),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         HasSubstr("objects for a group of size")));
    FSDP_EXPECT_OK(group.Barrier());
  });
}

TEST_P(ObjectCollectivesTest, AllGatherObjectOfUnevenSizes) {
  RunInRanks(GetParam(), [](ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(std::vector<std::string> all,
                              group.AllGatherObject(std::string(group.rank() * 3, 'a' + group.rank())));
    ASSERT_EQ(all.size(), static_cast<size_t>(group.size()));
    for (int r = 0; r < group.size(); ++r) EXPECT_EQ(all[r], std::string(r * 3, 'a' + r));
  });
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, ObjectCollectivesTest, ::testing::Values(1, 2, 3, 4),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return "ws" + std::to_string(info.param);
                         });

}  // namespace
}  // namespace fsdp::comm
