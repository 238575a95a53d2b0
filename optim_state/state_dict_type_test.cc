// GetOptimStateDict / OptimStateDictToLoad under StateDictSettings
// (FSDP.optim_state_dict and FSDP.optim_state_dict_to_load with
// set_state_dict_type / state_dict_type) on real ranks: NestedModel
// (NestedModel.wrap) and TransformerWithSharedParams trained under FSDP and,
// unwrapped, with Adam. For each type (full, full with rank0_only, sharded) the
// dict loads into a fresh optimizer and one more step equals continuing; a
// named optimizer gets the dict keyed by its parameter names; errors leave the
// optimizer untouched.
#include "optim_state/state_dict_type.h"

#include <torch/optim/adam.h>
#include <torch/torch.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/multiprocess_testutil.h"
#include "comm/status_macros.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "fsdp/state_dict.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "models/nested_model.h"
#include "models/transformer.h"
#include "optim_state/fsdp_optim_state.h"
#include "optim_state/optim_state_dict.h"
#include "optim_state/optim_state_testutil.h"
#include "optim_state/optimizer_adapter.h"
#include "optim_state/rekey.h"

namespace fsdp::optim_state {
namespace {

using ::fsdp::testing::RunInRanks;
using ::fsdp::testing::StatusIs;
using ::testing::HasSubstr;

using ::fsdp::optim_state::testing::Canonical;
using ::fsdp::optim_state::testing::Case;
using ::fsdp::optim_state::testing::Describe;
using ::fsdp::optim_state::testing::MakeAdam;
using ::fsdp::optim_state::testing::Model;
using ::fsdp::optim_state::testing::Step;
using ::fsdp::optim_state::testing::Train;
using ::fsdp::optim_state::testing::Trained;

enum class Type { kFull, kFullRank0Only, kSharded, kShardedLocal };
struct TypeCase {
  Case c;
  Type type;
};
std::string TypeName(Type type) {
  return type == Type::kFull            ? "_Full"
         : type == Type::kFullRank0Only ? "_FullRank0Only"
         : type == Type::kSharded       ? "_Sharded"
                                        : "_ShardedLocal";
}
std::string TypeCaseName(const ::testing::TestParamInfo<TypeCase>& info) {
  return absl::StrCat(Describe(info.param.c), TypeName(info.param.type));
}
void PrintTo(const TypeCase& t, std::ostream* os) {
  *os << Describe(t.c) << TypeName(t.type);
}

// `settings` set for `type` as a scope would.
std::unique_ptr<ScopedStateDictType> Scope(StateDictSettings& settings,
                                           Type type) {
  if (type == Type::kSharded || type == Type::kShardedLocal) {
    return std::make_unique<ScopedStateDictType>(
        settings,
        ShardedOptimStateDictConfig{.local_shards = type == Type::kShardedLocal});
  }
  return std::make_unique<ScopedStateDictType>(
      settings,
      FullOptimStateDictConfig{.rank0_only = type == Type::kFullRank0Only});
}

// The FSDP model's full dict (every rank) rekeyed to the unwrapped optimizer's
// IDs equals that optimizer's own dict.
void ExpectFullMatchesReference(Trained& t, const OptimizerAdapter& adapter) {
  FSDP_ASSERT_OK_AND_ASSIGN(
      OptimStateDict full,
      FullOptimStateDict(*t.s.fsdp, adapter, {.rank0_only = false}));
  FSDP_ASSERT_OK_AND_ASSIGN(
      OptimStateDict by_id,
      RekeyOptimStateDict(full, OptimStateKeyType::kParamId, *t.s.reference,
                          *t.reference_adapter));
  FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict reference,
                            t.reference_adapter->StateDict());
  EXPECT_EQ(DiffOptimStateDicts(Canonical(reference), Canonical(by_id),
                                Tolerance{1e-5, 1e-5}),
            "");
}

class OptimStateDictToLoadTest : public ::testing::TestWithParam<TypeCase> {};

TEST_P(OptimStateDictToLoadTest, RoundTripContinuesTrainingIdentically) {
  const TypeCase p = GetParam();
  RunInRanks(p.c.world_size, [p](comm::ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(Trained t, Train(p.c, group, /*steps=*/2));
    StateDictSettings settings;
    auto scope = Scope(settings, p.type);
    FSDP_ASSERT_OK_AND_ASSIGN(
        OptimStateDict osd, GetOptimStateDict(*t.s.fsdp, *t.adapter, settings));
    if (p.type == Type::kFullRank0Only && group.rank() != 0) {
      EXPECT_TRUE(osd.state.empty());
      EXPECT_FALSE(osd.has_param_groups);
    } else {
      for (const auto& [key, state] : osd.state)
        EXPECT_TRUE(key.is_fqn()) << key;
      bool any_sharded = false;
      for (const auto& [key, state] : osd.state) {
        for (const auto& [name, value] : state)
          any_sharded |= value.Is<ShardedTensorValue>();
      }
      EXPECT_EQ(any_sharded,
                p.type == Type::kSharded || p.type == Type::kShardedLocal);
    }

    auto fresh = MakeAdam(t.s.fsdp->parameters());
    FSDP_ASSERT_OK_AND_ASSIGN(OptimizerAdapter fresh_adapter,
                              OptimizerAdapter::Create(*fresh));
    FSDP_ASSERT_OK_AND_ASSIGN(
        OptimStateDict local,
        OptimStateDictToLoad(*t.s.fsdp, fresh_adapter, osd, settings,
                             {.load_directly = true}));
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict own, t.adapter->StateDict());
    EXPECT_EQ(DiffOptimStateDicts(Canonical(own), Canonical(local)), "")
        << "rank " << group.rank();
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict loaded, fresh_adapter.StateDict());
    EXPECT_EQ(DiffOptimStateDicts(Canonical(own), Canonical(loaded)), "");

    FSDP_ASSERT_OK(Step(t.s, *t.reference_adapter, fresh_adapter, /*step=*/2));
    FSDP_ASSERT_OK_AND_ASSIGN(auto params, fsdp::FullStateDict(*t.s.fsdp));
    auto reference_params =
        models::NamedParametersWithoutDuplicates(*t.s.reference);
    for (const auto& [fqn, value] : params) {
      const at::Tensor* expected = reference_params.find(fqn);
      if (expected == nullptr) continue;  // buffers, tied names
      EXPECT_TRUE(at::allclose(value, *expected, 1e-5, 1e-5)) << fqn;
    }
    ExpectFullMatchesReference(t, fresh_adapter);
  });
}

// A named optimizer (torchrec KeyedOptimizer style) gets the same dict keyed by
// its parameter names: a flat parameter's "<module prefix>_flat_param", an
// original parameter's FQN.
TEST_P(OptimStateDictToLoadTest,
       NamedOptimizerGetsTheDictKeyedByItsParameterNames) {
  const TypeCase p = GetParam();
  RunInRanks(p.c.world_size, [p](comm::ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(Trained t, Train(p.c, group, /*steps=*/1));
    StateDictSettings settings;
    auto scope = Scope(settings, p.type);
    FSDP_ASSERT_OK_AND_ASSIGN(
        OptimStateDict osd, GetOptimStateDict(*t.s.fsdp, *t.adapter, settings));
    FSDP_ASSERT_OK_AND_ASSIGN(
        OptimStateDict by_id,
        OptimStateDictToLoad(*t.s.fsdp, *t.adapter, osd, settings));
    FSDP_ASSERT_OK_AND_ASSIGN(
        OptimStateDict by_name,
        OptimStateDictToLoad(*t.s.fsdp, *t.adapter, osd, settings,
                             {.is_named_optimizer = true}));
    // Expected names, in ID order.
    std::vector<std::string> names;
    for (const auto& unit : t.s.fsdp->units()) {
      if (unit.handle != nullptr && !unit.handle->use_orig_params()) {
        names.push_back(unit.module_prefix + "_flat_param");
      }
    }
    if (p.c.use_orig_params) {
      EXPECT_TRUE(names.empty());
      // Each key is an original parameter's FQN (a rank's empty slice may have
      // no state).
      const auto fqns =
          models::NamedParametersWithoutDuplicates(*t.s.reference).keys();
      for (const auto& [key, state] : by_name.state) {
        EXPECT_NE(std::find(fqns.begin(), fqns.end(), key.fqn()), fqns.end())
            << key;
      }
    } else if (p.c.model == Model::kNested) {
      // NestedModel.wrap: six units in pre-order; block0's parameters and
      // `bias` stay unmanaged under their FQNs.
      ASSERT_EQ(names.size(), 6u);
      EXPECT_EQ(names[0], "block1._flat_param");
      EXPECT_EQ(names[1], "block1.bias_module0._flat_param");
      EXPECT_TRUE(by_name.state.Contains(ParamKey::Fqn("block1._flat_param")));
      EXPECT_TRUE(by_name.state.Contains(ParamKey::Fqn("bias")));
    } else {
      EXPECT_EQ(names[0], "_flat_param");
      EXPECT_TRUE(by_name.state.Contains(ParamKey::Fqn("_flat_param")));
    }
    ASSERT_EQ(by_name.state.size(), by_id.state.size());
    for (size_t i = 0; i < by_id.state.size(); ++i) {
      EXPECT_TRUE(by_name.state.at_index(i).first.is_fqn());
      EXPECT_EQ(DiffOptimStateDicts(
                    OptimStateDict{
                        {{ParamKey::Id(0), by_id.state.at_index(i).second}},
                        {},
                        false},
                    OptimStateDict{
                        {{ParamKey::Id(0), by_name.state.at_index(i).second}},
                        {},
                        false}),
                "");
    }
    ASSERT_EQ(by_name.param_groups.size(), by_id.param_groups.size());
    for (size_t g = 0; g < by_id.param_groups.size(); ++g) {
      ASSERT_EQ(by_name.param_groups[g].params.size(),
                by_id.param_groups[g].params.size());
      for (const ParamKey& k : by_name.param_groups[g].params)
        EXPECT_TRUE(k.is_fqn()) << k;
    }
  });
}

INSTANTIATE_TEST_SUITE_P(
    Models, OptimStateDictToLoadTest,
    ::testing::Values(
        TypeCase{Case{Model::kNested, 2}, Type::kFull},
        TypeCase{Case{Model::kNested, 3}, Type::kFullRank0Only},
        TypeCase{Case{Model::kNested, 3}, Type::kSharded},
        TypeCase{Case{Model::kNested, 2}, Type::kSharded},
        TypeCase{Case{Model::kTransformer, 3}, Type::kFull},
        TypeCase{Case{Model::kTransformer, 2}, Type::kFullRank0Only},
        TypeCase{Case{Model::kTransformer, 3}, Type::kSharded},
        TypeCase{Case{Model::kNested, 3, /*use_orig_params=*/true},
                 Type::kFull},
        TypeCase{Case{Model::kNested, 2, true}, Type::kFullRank0Only},
        TypeCase{Case{Model::kTransformer, 2, true}, Type::kSharded},
        TypeCase{Case{Model::kNested, 3}, Type::kShardedLocal},
        TypeCase{Case{Model::kTransformer, 2, true}, Type::kShardedLocal}),
    TypeCaseName);

TEST(ScopedStateDictType, SetsTheTypeAndConfigAndRestoresThePreviousSettings) {
  StateDictSettings settings;
  EXPECT_EQ(settings.state_dict_type, StateDictType::kFullStateDict);
  EXPECT_FALSE(settings.full_optim_config.rank0_only);
  EXPECT_TRUE(settings.full_optim_config.offload_to_cpu);
  {
    ScopedStateDictType outer(settings,
                              FullOptimStateDictConfig{.rank0_only = true});
    EXPECT_TRUE(settings.full_optim_config.rank0_only);
    {
      ScopedStateDictType inner(settings, StateDictType::kShardedStateDict);
      EXPECT_EQ(settings.state_dict_type, StateDictType::kShardedStateDict);
      EXPECT_TRUE(settings.full_optim_config.rank0_only);
    }
    EXPECT_EQ(settings.state_dict_type, StateDictType::kFullStateDict);
  }
  EXPECT_FALSE(settings.full_optim_config.rank0_only);
  StateDictSettings previous = SetStateDictType(
      settings, ShardedOptimStateDictConfig{.offload_to_cpu = false});
  EXPECT_EQ(previous.state_dict_type, StateDictType::kFullStateDict);
  EXPECT_EQ(settings.state_dict_type, StateDictType::kShardedStateDict);
  EXPECT_FALSE(settings.sharded_optim_config.offload_to_cpu);
  EXPECT_EQ(StateDictTypeName(settings.state_dict_type), "SHARDED_STATE_DICT");
}

// PyTorch's error for differing `step` of one flat parameter's original
// parameters; nothing is loaded.
TEST(OptimStateDictToLoad, RefusesDifferingScalarStateAndLoadsNothing) {
  RunInRanks(2, [](comm::ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(
        Trained t, Train(Case{Model::kNested, 2}, group, /*steps=*/1));
    StateDictSettings settings;
    FSDP_ASSERT_OK_AND_ASSIGN(
        OptimStateDict osd, GetOptimStateDict(*t.s.fsdp, *t.adapter, settings));
    ParamState* state = osd.state.Find(ParamKey::Fqn("block1.weight"));
    ASSERT_NE(state, nullptr);
    state->Set("step", StateValue(at::scalar_tensor(2.0, at::kFloat)));
    auto fresh = MakeAdam(t.s.fsdp->parameters());
    FSDP_ASSERT_OK_AND_ASSIGN(OptimizerAdapter fresh_adapter,
                              OptimizerAdapter::Create(*fresh));
    EXPECT_THAT(OptimStateDictToLoad(*t.s.fsdp, fresh_adapter, osd, settings,
                                     {.load_directly = true}),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         HasSubstr("All unflattened parameters comprising a "
                                   "single flat parameter "
                                   "must have scalar state with the same value "
                                   "and dtype but got values "
                                   "{2.0, 1.0} and dtypes {torch.float32} for "
                                   "state step and unflattened "
                                   "parameter names ['block1.weight', "
                                   "'block1.bias_module1.bias']")));
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict after, fresh_adapter.StateDict());
    EXPECT_TRUE(after.state.empty());
  });
}

}  // namespace
}  // namespace fsdp::optim_state
