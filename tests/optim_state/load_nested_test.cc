// Port of PyTorch's test_fsdp_optim_state.py (2.x): loading the nested model's full or
// sharded optimizer state dict into a model of the same or half the world size, the same or
// the alternative wrapping, and differing optimizer inputs across ranks.
//
// Python test                                   C++ (this file)
// --------------------------------------------  ------------------------------------------------
// test_shard_full_optim_state_dict_nested        TEST_P(ShardFullOptimStateDictNested,
//                                                  test_shard_full_optim_state_dict_nested)
//   parametrize use_multiple_param_groups, wrap_alt, use_diff_optim_inputs: all 8
//   subtests use_optim_input [False, True] (broadcast + shard_full_optim_state_dict), then
//   _test_load_optim_state_with_optim_state_dict (FULL_STATE_DICT; groups False as Python)
// test_shard_full_optim_state_dict_nested_ TEST_P(ShardFullOptimStateDictNestedHalveWorldSize,
//   halve_world_size                               test_shard_full_..._halve_world_size)
//   groups, differing inputs, wrap_alt all True; both subtests; then the optim_state_dict API
// test_scatter_full_optim_state_dict_nested      TEST_P(ScatterFullOptimStateDictNested, ...)
//   as shard, scattering from rank 0; optim_state_dict API with rank0_only=True
// test_scatter_full_optim_state_dict_nested_     TEST_P(ScatterFullOptimStateDictNestedHalve...,
//   halve_world_size                               ...)
// test_flatten_sharded_optim_state_dict_nested   TEST_P(FlattenShardedOptimStateDictNested, ...)
//   wrap_alt, use_optim_input False (as Python); then SHARDED_STATE_DICT through the API
// Every test at world size 4 (halving to 2: ranks 0 and 2, as Python's even-rank group), with
// PyTorch's whole grid, and at 3 (halving to 2: ranks 0 and 2) with the plain and the hardest
// combination of the grid; the halving tests also at 2 (to 1: rank 0); the shard test also at
// 2 and 8 (plain and hardest; ws 8 in the _ws8 target).
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

struct Params {
  int world_size;
  bool use_multiple_param_groups;
  bool wrap_alt;
  bool use_diff_optim_inputs;
};

std::string Name(const ::testing::TestParamInfo<Params>& info) {
  const Params& p = info.param;
  return absl::StrCat(
      "ws", p.world_size, p.use_multiple_param_groups ? "_MultipleGroups" : "",
      p.wrap_alt ? "_WrapAlt" : "", p.use_diff_optim_inputs ? "_DiffInputs" : "",
      !p.use_multiple_param_groups && !p.wrap_alt && !p.use_diff_optim_inputs ? "_Plain" : "");
}

// PyTorch's grid at world size 4; at world sizes 3 (uneven padding, not in PyTorch), 2 and 8
// the plain and the hardest combination, to keep the targets short.
std::vector<Params> AllCombinations() {
  std::vector<Params> out;
  for (bool groups : {false, true}) {
    for (bool wrap_alt : {false, true}) {
      for (bool diff : {false, true}) out.push_back(Params{4, groups, wrap_alt, diff});
    }
  }
  for (int world_size : {3, 2, 8}) {
    out.push_back(Params{world_size, false, false, false});
    out.push_back(Params{world_size, true, true, true});
  }
  return out;
}

// The scatter test at world size 4 (the whole grid) and 3; the shard test also at 2 and 8.
std::vector<Params> ScatterCombinations() {
  std::vector<Params> out;
  for (const Params& p : AllCombinations()) {
    if (p.world_size == 4 || p.world_size == 3) out.push_back(p);
  }
  return out;
}

StateDictSettings FullSettings(bool rank0_only) {
  StateDictSettings settings;
  SetStateDictType(settings, FullOptimStateDictConfig{.rank0_only = rank0_only});
  return settings;
}

// Shared body of the shard and scatter tests (Python's run_subtests + the 2.0 half).
void RunLoadTest(const Params& p, OsdCommMethod method, bool halve, bool api_groups) {
  RunInRanks(p.world_size, [p, method, halve, api_groups](comm::ProcessGroup& group) {
    for (bool use_optim_input : {false, true}) {
      TestLoadOptimState(group, {.model_class = ModelClass::kNested,
                                 .use_multiple_param_groups = p.use_multiple_param_groups,
                                 .halve_world_size = halve,
                                 .osd_comm_method = method,
                                 .use_diff_optim_inputs = p.use_diff_optim_inputs,
                                 .use_optim_input = use_optim_input,
                                 .num_iters = 3,
                                 .wrap_alt = p.wrap_alt});
      if (::testing::Test::HasFatalFailure()) return;
    }
    TestLoadOptimStateWithOptimStateDict(
        group, FullSettings(/*rank0_only=*/method == OsdCommMethod::kScatterFullOsd),
        {.model_class = ModelClass::kNested,
         .use_multiple_param_groups = api_groups && p.use_multiple_param_groups,
         .halve_world_size = halve,
         .use_diff_optim_inputs = p.use_diff_optim_inputs,
         .num_iters = 3,
         .wrap_alt = p.wrap_alt});
  });
}

class ShardFullOptimStateDictNested : public ::testing::TestWithParam<Params> {};
TEST_P(ShardFullOptimStateDictNested, test_shard_full_optim_state_dict_nested) {
  // Python passes use_multiple_param_groups=False to the optim_state_dict half here.
  RunLoadTest(GetParam(), OsdCommMethod::kBroadcastObjectList, /*halve=*/false,
              /*api_groups=*/false);
}
INSTANTIATE_TEST_SUITE_P(All, ShardFullOptimStateDictNested, ::testing::ValuesIn(AllCombinations()),
                         Name);

class ScatterFullOptimStateDictNested : public ::testing::TestWithParam<Params> {};
TEST_P(ScatterFullOptimStateDictNested, test_scatter_full_optim_state_dict_nested) {
  RunLoadTest(GetParam(), OsdCommMethod::kScatterFullOsd, /*halve=*/false, /*api_groups=*/true);
}
INSTANTIATE_TEST_SUITE_P(All, ScatterFullOptimStateDictNested,
                         ::testing::ValuesIn(ScatterCombinations()), Name);

// "To save CI costs, we test with the harder settings": groups, differing inputs, wrap_alt.
// World sizes 4 -> 2 (ranks 0 and 2), 3 -> 2 (ranks 0 and 2) and 2 -> 1 (rank 0).
std::vector<Params> Harder() {
  return {Params{4, true, true, true}, Params{3, true, true, true}, Params{2, true, true, true}};
}

class ShardFullOptimStateDictNestedHalveWorldSize : public ::testing::TestWithParam<Params> {};
TEST_P(ShardFullOptimStateDictNestedHalveWorldSize,
       test_shard_full_optim_state_dict_nested_halve_world_size) {
  RunLoadTest(GetParam(), OsdCommMethod::kBroadcastObjectList, /*halve=*/true,
              /*api_groups=*/true);
}
INSTANTIATE_TEST_SUITE_P(All, ShardFullOptimStateDictNestedHalveWorldSize,
                         ::testing::ValuesIn(Harder()), Name);

class ScatterFullOptimStateDictNestedHalveWorldSize : public ::testing::TestWithParam<Params> {};
TEST_P(ScatterFullOptimStateDictNestedHalveWorldSize,
       test_scatter_full_optim_state_dict_nested_halve_world_size) {
  RunLoadTest(GetParam(), OsdCommMethod::kScatterFullOsd, /*halve=*/true, /*api_groups=*/true);
}
INSTANTIATE_TEST_SUITE_P(All, ScatterFullOptimStateDictNestedHalveWorldSize,
                         ::testing::ValuesIn(Harder()), Name);

class FlattenShardedOptimStateDictNested : public ::testing::TestWithParam<int> {};
TEST_P(FlattenShardedOptimStateDictNested, test_flatten_sharded_optim_state_dict_nested) {
  RunInRanks(GetParam(), [](comm::ProcessGroup& group) {
    TestLoadOptimState(group, {.model_class = ModelClass::kNested,
                               .osd_comm_method = OsdCommMethod::kFlattenShardedOsd,
                               .use_optim_input = false,
                               .num_iters = 3,
                               .wrap_alt = true});
    if (::testing::Test::HasFatalFailure()) return;
    StateDictSettings settings;
    SetStateDictType(settings, ShardedOptimStateDictConfig{});
    TestLoadOptimStateWithOptimStateDict(
        group, settings, {.model_class = ModelClass::kNested, .num_iters = 3, .wrap_alt = true});
  });
}
INSTANTIATE_TEST_SUITE_P(WorldSizes, FlattenShardedOptimStateDictNested, ::testing::Values(4, 3),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return absl::StrCat("ws", info.param);
                         });

}  // namespace
}  // namespace fsdp::optim_state::port
