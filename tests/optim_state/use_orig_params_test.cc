// Port of PyTorch's test_fsdp_optim_state.py (2.x): test_use_orig_params, loading the
// nested model's optimizer state dict (flat parameters) into a model under use_orig_params
// through the optim_state_dict API.
//
// Python test            C++ (this file)
// ---------------------  -------------------------------------------------------------------
// test_use_orig_params   TEST_P(UseOrigParams, test_use_orig_params), one instance per
//                        state-dict setting:
//   FULL_STATE_DICT                     subtests halve_world_size x wrap_alt (all four)
//   FULL_STATE_DICT, rank0_only=True    subtests halve_world_size x wrap_alt (all four)
//   SHARDED_STATE_DICT                  subtests wrap_alt (Python: "We cannot test
//                                       halve_world_size with SHARDED_STATE_DICT")
// World sizes 4 (PyTorch's), 3, 2 (halving to 1) and 8 (in the _ws8 target).
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/multiprocess_testutil.h"
#include "gtest/gtest.h"
#include "optim_state/state_dict_type.h"
#include "tests/optim_state/port_testutil.h"

namespace fsdp::optim_state::port {
namespace {

using ::fsdp::testing::RunInRanks;

enum class Setting { kFull, kFullRank0Only, kSharded };

struct Params {
  int world_size;
  Setting setting;
};

std::string Name(const ::testing::TestParamInfo<Params>& info) {
  const char* setting = info.param.setting == Setting::kFull            ? "Full"
                        : info.param.setting == Setting::kFullRank0Only ? "FullRank0Only"
                                                                        : "Sharded";
  return absl::StrCat("ws", info.param.world_size, "_", setting);
}

class UseOrigParams : public ::testing::TestWithParam<Params> {};

TEST_P(UseOrigParams, test_use_orig_params) {
  const Params p = GetParam();
  RunInRanks(p.world_size, [p](comm::ProcessGroup& group) {
    StateDictSettings settings;
    if (p.setting == Setting::kSharded) {
      SetStateDictType(settings, ShardedOptimStateDictConfig{});
    } else {
      SetStateDictType(
          settings, FullOptimStateDictConfig{.rank0_only = p.setting == Setting::kFullRank0Only});
    }
    for (bool halve_world_size : {true, false}) {
      if (halve_world_size && p.setting == Setting::kSharded) continue;
      for (bool wrap_alt : {true, false}) {
        TestLoadOptimStateWithOptimStateDict(group, settings,
                                             {.model_class = ModelClass::kNested,
                                              .halve_world_size = halve_world_size,
                                              .num_iters = 3,
                                              .wrap_alt = wrap_alt,
                                              .use_orig_params = true});
        if (::testing::Test::HasFatalFailure()) return;
        // Ranks outside the halved group wait for the others before the next subtest.
        FSDP_ASSERT_OK(group.Barrier());
      }
    }
  });
}

std::vector<Params> AllParams() {
  std::vector<Params> out;
  for (int world_size : {4, 3, 2, 8}) {
    for (Setting setting : {Setting::kFull, Setting::kFullRank0Only, Setting::kSharded}) {
      out.push_back(Params{world_size, setting});
    }
  }
  return out;
}

INSTANTIATE_TEST_SUITE_P(All, UseOrigParams, ::testing::ValuesIn(AllParams()), Name);

}  // namespace
}  // namespace fsdp::optim_state::port
