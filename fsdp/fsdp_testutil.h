// Shared pieces of the FSDP tests: the (world size, strategy, use_orig_params) grid that the
// parametrized suites run, its test-name generator, and borrowing RunInRanks' group.
#ifndef FSDP_CPP_FSDP_FSDP_TESTUTIL_H_
#define FSDP_CPP_FSDP_FSDP_TESTUTIL_H_

#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "comm/process_group.h"
#include "fsdp/flat_param.h"
#include "gtest/gtest.h"

namespace fsdp::testing {

struct StrategyCase {
  int world_size;
  ShardingStrategy strategy;
  bool use_orig_params;
};

// "ws3_FULL_SHARD_orig"
inline std::string StrategyCaseName(const ::testing::TestParamInfo<StrategyCase>& info) {
  return absl::StrCat("ws", info.param.world_size, "_",
                      std::string(ShardingStrategyName(info.param.strategy)),
                      info.param.use_orig_params ? "_orig" : "");
}

// RunInRanks owns the group; FSDP APIs take a shared_ptr: share it without owning it.
inline std::shared_ptr<comm::ProcessGroup> Borrow(comm::ProcessGroup& group) {
  return std::shared_ptr<comm::ProcessGroup>(&group, [](comm::ProcessGroup*) {});
}

}  // namespace fsdp::testing

#endif  // FSDP_CPP_FSDP_FSDP_TESTUTIL_H_
