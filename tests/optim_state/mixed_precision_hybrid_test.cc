// The optimizer-state suite again under two FSDP options PyTorch's test_fsdp_optim_state.py
// does not cover: MixedPrecision and HYBRID_SHARD. The cases run the port's own procedure
// (_test_load_optim_state and its optim_state_dict-API twin, port_testutil.h): train a first
// model, take its full or sharded optimizer state dict, reshard it for a second model trained
// the same way, check it against the second optimizer's own state, load it and train on.
//   * Mixed precision: TransformerWithSharedParams (a root unit, so no float32 layer meets bf16
//     activations; bf16 buffers for its BatchNorm), both models under MixedPrecision(bf16,
//     bf16, bf16) at the same world size. The dicts hold float32 state that must come back as
//     the second model's own, through every method: broadcast + shard, scatter, flatten of a
//     sharded dict, and the optim_state_dict API.
//   * HYBRID_SHARD: NestedModel's first model sharded over groups of 2 ranks and replicated
//     (2 x 2), its full dict (each shard group's rank 0 holds one, as FSDP1's) loaded into a
//     FULL_SHARD model at world size 4 and at 2, with the test's other wrapping too.
#include <string>

#include "absl/strings/str_cat.h"
#include "comm/multiprocess_testutil.h"
#include "fsdp/mixed_precision.h"
#include "gtest/gtest.h"
#include "optim_state/state_dict_type.h"
#include "tests/optim_state/port_testutil.h"

namespace fsdp::optim_state::port {
namespace {

using ::fsdp::testing::RunInRanks;

MixedPrecision Bf16Everywhere() {
  MixedPrecision mixed_precision;
  mixed_precision.param_dtype = at::kBFloat16;
  mixed_precision.reduce_dtype = at::kBFloat16;
  mixed_precision.buffer_dtype = at::kBFloat16;
  return mixed_precision;
}

class MixedPrecisionOptimState : public ::testing::TestWithParam<int> {};

TEST_P(MixedPrecisionOptimState, LoadsThroughEveryMethodAndTheApi) {
  RunInRanks(GetParam(), [](comm::ProcessGroup& group) {
    for (OsdCommMethod method :
         {OsdCommMethod::kBroadcastObjectList, OsdCommMethod::kScatterFullOsd,
          OsdCommMethod::kFlattenShardedOsd}) {
      SCOPED_TRACE(static_cast<int>(method));
      TestLoadOptimState(group, {.model_class = ModelClass::kTransformer,
                                 .osd_comm_method = method,
                                 .num_iters = 3,
                                 .mixed_precision = Bf16Everywhere()});
      if (::testing::Test::HasFatalFailure()) return;
    }
    StateDictSettings settings;
    SetStateDictType(settings, FullOptimStateDictConfig{.rank0_only = true});
    TestLoadOptimStateWithOptimStateDict(group, settings,
                                         {.model_class = ModelClass::kTransformer,
                                          .num_iters = 3,
                                          .mixed_precision = Bf16Everywhere()});
  });
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, MixedPrecisionOptimState, ::testing::Values(4, 3),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return absl::StrCat("ws", info.param);
                         });

TEST(HybridShardOptimState, FullDictOfA2x2ModelLoadsIntoFullShardAt4And2) {
  RunInRanks(4, [](comm::ProcessGroup& group) {
    for (bool halve : {false, true}) {
      for (OsdCommMethod method :
           {OsdCommMethod::kBroadcastObjectList, OsdCommMethod::kScatterFullOsd}) {
        SCOPED_TRACE(
            absl::StrCat("halve_world_size=", halve, " method ", static_cast<int>(method)));
        TestLoadOptimState(group, {.model_class = ModelClass::kNested,
                                   .use_multiple_param_groups = true,
                                   .halve_world_size = halve,
                                   .osd_comm_method = method,
                                   .num_iters = 3,
                                   .wrap_alt = halve,
                                   .first_model_shard_group_size = 2});
        if (::testing::Test::HasFatalFailure()) return;
      }
    }
    StateDictSettings settings;
    SetStateDictType(settings, FullOptimStateDictConfig{.rank0_only = false});
    TestLoadOptimStateWithOptimStateDict(
        group, settings,
        {.model_class = ModelClass::kNested, .num_iters = 3, .first_model_shard_group_size = 2});
  });
}

}  // namespace
}  // namespace fsdp::optim_state::port
