// RekeyOptimStateDict (FSDP.rekey_optim_state_dict) on real ranks: NestedModel
// (NestedModel.wrap) and TransformerWithSharedParams trained under FSDP and, in
// the same process, unwrapped, with Adam. The FSDP full dict rekeyed to IDs
// against the unwrapped model equals the unwrapped optimizer's own state_dict
// (PyTorch's test_rekey_optim_state_dict_to_ids); the unwrapped dict rekeyed to
// names equals the full dict (test_rekey_optim_state_dict_to_names); and the
// errors, with PyTorch's texts.
#include "optim_state/rekey.h"

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
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "models/nested_model.h"
#include "models/transformer.h"
#include "optim_state/fsdp_optim_state.h"
#include "optim_state/optim_state_dict.h"
#include "optim_state/optim_state_testutil.h"
#include "optim_state/optimizer_adapter.h"

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

std::string CaseName(const ::testing::TestParamInfo<Case>& info) {
  return Describe(info.param);
}

class RekeyOptimStateDictTest : public ::testing::TestWithParam<Case> {};

TEST_P(RekeyOptimStateDictTest,
       ToIdsEqualsUnwrappedOptimizerAndBackToNamesRoundTrips) {
  const Case c = GetParam();
  RunInRanks(c.world_size, [c](comm::ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(Trained t, Train(c, group, /*steps=*/2));
    FSDP_ASSERT_OK_AND_ASSIGN(
        OptimStateDict full,
        FullOptimStateDict(*t.s.fsdp, *t.adapter, {.rank0_only = false}));
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict reference,
                              t.reference_adapter->StateDict());

    FSDP_ASSERT_OK_AND_ASSIGN(
        OptimStateDict by_id,
        RekeyOptimStateDict(full, OptimStateKeyType::kParamId, *t.s.reference,
                            *t.reference_adapter));
    EXPECT_EQ(DiffOptimStateDicts(Canonical(reference), Canonical(by_id),
                                  Tolerance{1e-5, 1e-5}),
              "");
    // Groups list IDs sorted, as 1.13 writes them.
    for (const ParamGroup& g : by_id.param_groups) {
      EXPECT_TRUE(std::is_sorted(g.params.begin(), g.params.end()));
    }
    // Loadable by the unwrapped optimizer.
    auto fresh = MakeAdam(
        models::NamedParametersWithoutDuplicates(*t.s.reference).values());
    FSDP_ASSERT_OK_AND_ASSIGN(OptimizerAdapter fresh_adapter,
                              OptimizerAdapter::Create(*fresh));
    FSDP_ASSERT_OK(fresh_adapter.LoadStateDict(by_id));

    FSDP_ASSERT_OK_AND_ASSIGN(
        OptimStateDict by_name,
        RekeyOptimStateDict(by_id, OptimStateKeyType::kParamName,
                            *t.s.reference, *t.reference_adapter));
    EXPECT_EQ(DiffOptimStateDicts(Canonical(full), Canonical(by_name)), "");
    // The unwrapped optimizer's own dict, by name, equals the full dict too.
    FSDP_ASSERT_OK_AND_ASSIGN(
        OptimStateDict reference_by_name,
        RekeyOptimStateDict(reference, OptimStateKeyType::kParamName,
                            *t.s.reference, *t.reference_adapter));
    EXPECT_EQ(DiffOptimStateDicts(Canonical(full), Canonical(reference_by_name),
                                  Tolerance{1e-5, 1e-5}),
              "");
    // ... and shards into the FSDP optimizer as the full dict does.
    FSDP_ASSERT_OK_AND_ASSIGN(
        OptimStateDict from_full,
        ShardFullOptimStateDict(full, *t.s.fsdp, *t.adapter));
    FSDP_ASSERT_OK_AND_ASSIGN(
        OptimStateDict from_reference,
        ShardFullOptimStateDict(reference_by_name, *t.s.fsdp, *t.adapter));
    EXPECT_EQ(
        DiffOptimStateDicts(Canonical(from_full), Canonical(from_reference),
                            Tolerance{1e-5, 1e-5}),
        "");
  });
}

// use_orig_params: the FSDP optimizer holds the original parameters, so its
// local dict rekeys against the FSDP model itself, by the parameters' FQNs, and
// back.
TEST_P(RekeyOptimStateDictTest,
       UseOrigParamsLocalDictRekeysAgainstTheFsdpModel) {
  Case c = GetParam();
  c.use_orig_params = true;
  RunInRanks(c.world_size, [c](comm::ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(Trained t, Train(c, group, /*steps=*/1));
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict local, t.adapter->StateDict());
    FSDP_ASSERT_OK_AND_ASSIGN(
        OptimStateDict by_name,
        RekeyOptimStateDict(local, OptimStateKeyType::kParamName, *t.s.fsdp,
                            *t.adapter));
    const auto reference_names =
        models::NamedParametersWithoutDuplicates(*t.s.reference).keys();
    const std::vector<at::Tensor> params = t.s.fsdp->parameters();
    ASSERT_EQ(params.size(), reference_names.size());
    for (const auto& [key, state] : by_name.state) {
      ASSERT_TRUE(key.is_fqn());
      EXPECT_NE(
          std::find(reference_names.begin(), reference_names.end(), key.fqn()),
          reference_names.end())
          << key;
    }
    FSDP_ASSERT_OK_AND_ASSIGN(
        OptimStateDict back,
        RekeyOptimStateDict(by_name, OptimStateKeyType::kParamId, *t.s.fsdp,
                            *t.adapter));
    EXPECT_EQ(DiffOptimStateDicts(Canonical(local), Canonical(back)), "");
  });
}

INSTANTIATE_TEST_SUITE_P(Models, RekeyOptimStateDictTest,
                         ::testing::Values(Case{Model::kNested, 2},
                                           Case{Model::kNested, 3},
                                           Case{Model::kTransformer, 2},
                                           Case{Model::kTransformer, 3}),
                         CaseName);

// A plain module and Adam over it, stepped once.
struct Plain {
  torch::nn::Linear linear{torch::nn::LinearOptions(3, 2)};
  std::unique_ptr<torch::optim::Optimizer> optim =
      MakeAdam(linear->parameters());
};

TEST(RekeyOptimStateDict, RefusesMixedKeyTypesWithPyTorchsText) {
  Plain p;
  FSDP_ASSERT_OK_AND_ASSIGN(OptimizerAdapter adapter,
                            OptimizerAdapter::Create(*p.optim));
  OptimStateDict osd;
  osd.state.Set(ParamKey::Id(0), ParamState{{"step", StateValue(1.0)}});
  osd.state.Set(ParamKey::Fqn("bias"), ParamState{{"step", StateValue(1.0)}});
  for (OptimStateKeyType type :
       {OptimStateKeyType::kParamId, OptimStateKeyType::kParamName}) {
    EXPECT_THAT(RekeyOptimStateDict(osd, type, *p.linear, adapter),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         "RekeyOptimStateDict: Invalid parameter keys: "
                         "dict_keys([0, 'bias'])"));
  }
}

TEST(RekeyOptimStateDict, ReturnsTheDictUnchangedWhenKeysAlreadyHaveTheType) {
  Plain p;
  FSDP_ASSERT_OK_AND_ASSIGN(OptimizerAdapter adapter,
                            OptimizerAdapter::Create(*p.optim));
  OptimStateDict osd;
  osd.state.Set(ParamKey::Fqn("not.a.param"),
                ParamState{{"step", StateValue(1.0)}});
  osd.param_groups.push_back(ParamGroup{
      {{"lr", StateValue(0.1)}}, {ParamKey::Fqn("z"), ParamKey::Fqn("a")}});
  FSDP_ASSERT_OK_AND_ASSIGN(
      OptimStateDict same,
      RekeyOptimStateDict(osd, OptimStateKeyType::kParamName, *p.linear,
                          adapter));
  EXPECT_EQ(same, osd);
}

TEST(RekeyOptimStateDict, NamesAreThePlainParameterOrderAndGroupsAreSorted) {
  Plain p;
  FSDP_ASSERT_OK_AND_ASSIGN(OptimizerAdapter adapter,
                            OptimizerAdapter::Create(*p.optim));
  p.linear->forward(torch::ones({1, 3})).sum().backward();
  FSDP_ASSERT_OK(adapter.Step());
  FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict osd, adapter.StateDict());
  FSDP_ASSERT_OK_AND_ASSIGN(
      OptimStateDict by_name,
      RekeyOptimStateDict(osd, OptimStateKeyType::kParamName, *p.linear,
                          adapter));
  ASSERT_EQ(by_name.state.size(), 2u);
  EXPECT_EQ(by_name.state.at_index(0).first, ParamKey::Fqn("weight"));
  EXPECT_EQ(by_name.state.at_index(1).first, ParamKey::Fqn("bias"));
  ASSERT_EQ(by_name.param_groups.size(), 1u);
  EXPECT_EQ(
      by_name.param_groups[0].params,
      (std::vector<ParamKey>{ParamKey::Fqn("bias"), ParamKey::Fqn("weight")}));
  FSDP_ASSERT_OK_AND_ASSIGN(
      OptimStateDict back,
      RekeyOptimStateDict(by_name, OptimStateKeyType::kParamId, *p.linear,
                          adapter));
  EXPECT_EQ(back, osd);
}

TEST(RekeyOptimStateDict, RefusesKeysThatNameNoParameterOfTheOptimizer) {
  Plain p;
  FSDP_ASSERT_OK_AND_ASSIGN(OptimizerAdapter adapter,
                            OptimizerAdapter::Create(*p.optim));
  OptimStateDict by_name;
  by_name.state.Set(ParamKey::Fqn("weight2"),
                    ParamState{{"step", StateValue(1.0)}});
  EXPECT_THAT(RekeyOptimStateDict(by_name, OptimStateKeyType::kParamId,
                                  *p.linear, adapter),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       "RekeyOptimStateDict: state key 'weight2' is not a "
                       "parameter of the optimizer"));
  OptimStateDict by_id;
  by_id.state.Set(ParamKey::Id(2), ParamState{{"step", StateValue(1.0)}});
  EXPECT_THAT(RekeyOptimStateDict(by_id, OptimStateKeyType::kParamName,
                                  *p.linear, adapter),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       "RekeyOptimStateDict: state key 2 is not a parameter of "
                       "the optimizer"));
  by_id.state = {};
  by_id.param_groups.push_back(
      ParamGroup{{}, {ParamKey::Id(0), ParamKey::Id(5)}});
  by_id.state.Set(ParamKey::Id(0), ParamState{});
  EXPECT_THAT(RekeyOptimStateDict(by_id, OptimStateKeyType::kParamName,
                                  *p.linear, adapter),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       "RekeyOptimStateDict: param_groups[0] lists 5, which is "
                       "not a parameter "
                       "of the optimizer"));
  // An optimizer over a tensor the model does not have.
  torch::optim::Adam foreign({torch::zeros({2}, torch::requires_grad())});
  FSDP_ASSERT_OK_AND_ASSIGN(OptimizerAdapter foreign_adapter,
                            OptimizerAdapter::Create(foreign));
  by_id.param_groups.clear();
  EXPECT_THAT(RekeyOptimStateDict(by_id, OptimStateKeyType::kParamName,
                                  *p.linear, foreign_adapter),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       "RekeyOptimStateDict: the optimizer's parameter ID 0 is "
                       "not a parameter "
                       "of the model"));
}

// As 1.13's _get_param_to_param_name: a flat parameter stands for several
// names.
TEST(RekeyOptimStateDict,
     RefusesFlatParametersOfSeveralParametersWithPyTorchsText) {
  RunInRanks(2, [](comm::ProcessGroup& group) {
    const Case c{Model::kNested, 2};
    FSDP_ASSERT_OK_AND_ASSIGN(Trained t, Train(c, group, /*steps=*/1));
    FSDP_ASSERT_OK_AND_ASSIGN(
        OptimStateDict full,
        FullOptimStateDict(*t.s.fsdp, *t.adapter, {.rank0_only = false}));
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict local, t.adapter->StateDict());
    const auto expected =
        StatusIs(absl::StatusCode::kInvalidArgument,
                 "RekeyOptimStateDict: Each parameter should only map to one "
                 "parameter name but "
                 "got 2: ['block1.weight', 'block1.bias_module1.bias']");
    EXPECT_THAT(RekeyOptimStateDict(full, OptimStateKeyType::kParamId,
                                    *t.s.fsdp, *t.adapter),
                expected);
    EXPECT_THAT(RekeyOptimStateDict(local, OptimStateKeyType::kParamName,
                                    *t.s.fsdp, *t.adapter),
                expected);
  });
}

}  // namespace
}  // namespace fsdp::optim_state
