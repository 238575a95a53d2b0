// Port of PyTorch's test_fsdp_optim_state.py (2.x): loading the optimizer state dicts of
// TransformerWithSharedParams (an FSDP root with one unit per layer and a tied weight).
//
// Python test                                      C++ (this file)
// -----------------------------------------------  ---------------------------------------------
// test_shard_full_optim_state_dict_transformer     TEST_P(ShardFullOptimStateDictTransformer,
//                                                    test_shard_full_optim_state_dict_transformer)
//   halve_world_size=True; subtests use_optim_input [False, True]; then the optim_state_dict
//   API (FULL_STATE_DICT)
// test_scatter_full_optim_state_dict_transformer   TEST_P(ScatterFullOptimStateDictTransformer,
//                                                    test_scatter_full_..._transformer)
//   as above, scattering from rank 0; API with rank0_only=True
// test_flatten_sharded_optim_state_dict_transformer TEST_P(FlattenShardedOptimStateDictTransformer,
//                                                    test_flatten_sharded_..._transformer)
//   same world size, use_optim_input False; then SHARDED_STATE_DICT through the API
// World sizes 4 (PyTorch's; halved to 2) and 3 (halved to 2); the flatten test also at 2 and
// 8 (in the _ws8 target).
#include <string>

#include "absl/strings/str_cat.h"
#include "comm/multiprocess_testutil.h"
#include "gtest/gtest.h"
#include "optim_state/state_dict_type.h"
#include "tests/optim_state/port_testutil.h"

namespace fsdp::optim_state::port {
namespace {

using ::fsdp::testing::RunInRanks;

std::string WorldSizeName(const ::testing::TestParamInfo<int>& info) {
  return absl::StrCat("ws", info.param);
}

void RunFullTransformer(int world_size, OsdCommMethod method) {
  RunInRanks(world_size, [method](comm::ProcessGroup& group) {
    for (bool use_optim_input : {false, true}) {
      TestLoadOptimState(group, {.model_class = ModelClass::kTransformer,
                                 .halve_world_size = true,
                                 .osd_comm_method = method,
                                 .use_optim_input = use_optim_input,
                                 .num_iters = 3});
      if (::testing::Test::HasFatalFailure()) return;
    }
    StateDictSettings settings;
    SetStateDictType(
        settings, FullOptimStateDictConfig{.rank0_only = method == OsdCommMethod::kScatterFullOsd});
    TestLoadOptimStateWithOptimStateDict(
        group, settings,
        {.model_class = ModelClass::kTransformer, .halve_world_size = true, .num_iters = 3});
  });
}

class ShardFullOptimStateDictTransformer : public ::testing::TestWithParam<int> {};
TEST_P(ShardFullOptimStateDictTransformer, test_shard_full_optim_state_dict_transformer) {
  RunFullTransformer(GetParam(), OsdCommMethod::kBroadcastObjectList);
}
INSTANTIATE_TEST_SUITE_P(WorldSizes, ShardFullOptimStateDictTransformer, ::testing::Values(4, 3),
                         WorldSizeName);

class ScatterFullOptimStateDictTransformer : public ::testing::TestWithParam<int> {};
TEST_P(ScatterFullOptimStateDictTransformer, test_scatter_full_optim_state_dict_transformer) {
  RunFullTransformer(GetParam(), OsdCommMethod::kScatterFullOsd);
}
INSTANTIATE_TEST_SUITE_P(WorldSizes, ScatterFullOptimStateDictTransformer, ::testing::Values(4, 3),
                         WorldSizeName);

class FlattenShardedOptimStateDictTransformer : public ::testing::TestWithParam<int> {};
TEST_P(FlattenShardedOptimStateDictTransformer, test_flatten_sharded_optim_state_dict_transformer) {
  RunInRanks(GetParam(), [](comm::ProcessGroup& group) {
    TestLoadOptimState(group, {.model_class = ModelClass::kTransformer,
                               .osd_comm_method = OsdCommMethod::kFlattenShardedOsd,
                               .use_optim_input = false,
                               .num_iters = 3});
    if (::testing::Test::HasFatalFailure()) return;
    StateDictSettings settings;
    SetStateDictType(settings, ShardedOptimStateDictConfig{});
    TestLoadOptimStateWithOptimStateDict(group, settings,
                                         {.model_class = ModelClass::kTransformer, .num_iters = 3});
  });
}
INSTANTIATE_TEST_SUITE_P(WorldSizes, FlattenShardedOptimStateDictTransformer,
                         ::testing::Values(4, 3, 2, 8), WorldSizeName);

}  // namespace
}  // namespace fsdp::optim_state::port
