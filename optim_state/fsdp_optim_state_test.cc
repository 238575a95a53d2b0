// FullOptimStateDict, ShardFullOptimStateDict, ScatterFullOptimStateDict,
// ShardedOptimStateDict and FlattenShardedOptimStateDict on real ranks.
//
// Each case trains a reference model of PyTorch's optimizer-state tests under FSDP and, in the
// same process, unwrapped, with the same optimizer (every rank sees the same batch, so the
// averaged gradients equal the unwrapped ones):
//   Nested       NestedModel.wrap (six units, no root unit; block0 and `bias` unmanaged)
//   Transformer  TransformerWithSharedParams, one unit per layer plus the root
// and checks that the full optimizer state dict equals the unwrapped optimizer's state dict
// (OptimizerAdapter::StateDict) up to keys (FQNs for IDs), that sharding or scattering it
// into a fresh optimizer and taking one more step equals continuing, and the errors.
#include "optim_state/fsdp_optim_state.h"

#include <torch/optim/adam.h>
#include <torch/optim/sgd.h>
#include <torch/torch.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <ostream>
#include <set>
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
#include "optim_state/optim_state_dict.h"
#include "optim_state/optim_state_testutil.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::optim_state {
namespace {

using ::fsdp::optim_state::testing::Build;
using ::fsdp::optim_state::testing::MakeOptimizer;
using ::fsdp::optim_state::testing::Model;
using ::fsdp::optim_state::testing::Optim;
using ::fsdp::optim_state::testing::Step;
using ::fsdp::optim_state::testing::Train;
using ::fsdp::optim_state::testing::Trained;
using ::fsdp::optim_state::testing::Training;
using ::fsdp::optim_state::testing::TrainingSpec;
using ::fsdp::testing::RunInRanks;
using ::fsdp::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;

struct Case {
  Model model;
  int world_size;
  Optim optim;
  bool use_orig_params = false;
  ShardingStrategy strategy = ShardingStrategy::kFullShard;
};

std::string Describe(const Case& c) {
  return absl::StrCat(c.model == Model::kNested ? "Nested" : "Transformer", "_ws", c.world_size,
                      c.optim == Optim::kAdam ? "_Adam" : "_SgdMomentum",
                      c.use_orig_params ? "_orig" : "",
                      c.strategy == ShardingStrategy::kFullShard
                          ? ""
                          : absl::StrCat("_", std::string(ShardingStrategyName(c.strategy))));
}
std::string CaseName(const ::testing::TestParamInfo<Case>& info) { return Describe(info.param); }
void PrintTo(const Case& c, std::ostream* os) { *os << Describe(c); }

TrainingSpec Spec(const Case& c) {
  return TrainingSpec{.model = c.model,
                      .use_orig_params = c.use_orig_params,
                      .strategy = c.strategy,
                      .optim = c.optim};
}

// `full` (FQN-keyed) equals the unwrapped optimizer's dict `reference` (ID-keyed) with
// reference IDs read as `reference_fqns`: same parameters with state, same state (any order of
// names), values within 1e-5; same hyper-parameters; each group lists the same FQNs.
void ExpectMatchesReference(const OptimStateDict& full, const OptimStateDict& reference,
                            const std::vector<std::string>& reference_fqns) {
  EXPECT_EQ(full.state.size(), reference.state.size()) << DebugString(full);
  for (const auto& [key, expected] : reference.state) {
    const std::string& fqn = reference_fqns[static_cast<size_t>(key.id())];
    const ParamState* actual = full.state.Find(ParamKey::Fqn(fqn));
    ASSERT_NE(actual, nullptr) << "no state for " << fqn;
    EXPECT_EQ(actual->size(), expected.size()) << fqn;
    for (const auto& [name, value] : expected) {
      const StateValue* v = actual->Find(name);
      ASSERT_NE(v, nullptr) << fqn << " has no '" << name << "'";
      EXPECT_EQ(DiffStateValues(value, *v, Tolerance{1e-5, 1e-5}), "")
          << "state['" << fqn << "']['" << name << "']";
    }
  }
  ASSERT_EQ(full.param_groups.size(), reference.param_groups.size());
  for (size_t g = 0; g < full.param_groups.size(); ++g) {
    std::set<std::string> actual_fqns, expected_fqns;
    for (const ParamKey& k : full.param_groups[g].params) actual_fqns.insert(k.fqn());
    for (const ParamKey& k : reference.param_groups[g].params) {
      expected_fqns.insert(reference_fqns[static_cast<size_t>(k.id())]);
    }
    EXPECT_EQ(actual_fqns, expected_fqns) << "param_groups[" << g << "]";
    EXPECT_EQ(full.param_groups[g].params.size(), expected_fqns.size());
    for (const auto& [name, value] : reference.param_groups[g].hyper_params) {
      const StateValue* v = full.param_groups[g].hyper_params.Find(name);
      ASSERT_NE(v, nullptr) << name;
      EXPECT_EQ(*v, value) << name;
    }
  }
}

// `dict` with each parameter's state names sorted (the full dict orders them as 1.13 does:
// positive-dimension tensors, then zero-dimension ones, then the rest).
OptimStateDict SortStateNames(const OptimStateDict& dict) {
  OptimStateDict out = dict;
  for (const auto& [key, state] : dict.state) {
    std::vector<std::string> names = state.Keys();
    std::sort(names.begin(), names.end());
    ParamState sorted;
    for (const std::string& name : names) sorted.Set(name, *state.Find(name));
    out.state.Set(key, std::move(sorted));
  }
  return out;
}

class FullOptimStateDictTest : public ::testing::TestWithParam<Case> {};

TEST_P(FullOptimStateDictTest, EqualsUnwrappedOptimizerStateDict) {
  const Case c = GetParam();
  RunInRanks(c.world_size, [c](comm::ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(Trained t, Train(Spec(c), group, /*steps=*/3));
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict reference, t.reference_adapter->StateDict());

    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict rank0, FullOptimStateDict(*t.s.fsdp, *t.adapter));
    if (group.rank() == 0) {
      ExpectMatchesReference(rank0, reference, t.reference_fqns);
      // The ID-keyed form is the unwrapped optimizer's own numbering when the FQNs come in
      // its order; here it at least numbers every listed FQN once.
      FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict by_id, RekeyFullOptimStateDictToIds(rank0));
      EXPECT_EQ(by_id.state.size(), rank0.state.size());
    } else {
      EXPECT_TRUE(rank0.state.empty());
      EXPECT_TRUE(rank0.param_groups.empty());
      EXPECT_FALSE(rank0.has_param_groups);
    }

    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict everywhere,
                              FullOptimStateDict(*t.s.fsdp, *t.adapter, {.rank0_only = false}));
    ExpectMatchesReference(everywhere, reference, t.reference_fqns);
  });
}

INSTANTIATE_TEST_SUITE_P(
    Models, FullOptimStateDictTest,
    ::testing::Values(Case{Model::kNested, 2, Optim::kAdam},
                      Case{Model::kNested, 3, Optim::kSgdMomentum},
                      Case{Model::kNested, 4, Optim::kAdam},
                      Case{Model::kNested, 3, Optim::kAdam, /*use_orig_params=*/true},
                      Case{Model::kNested, 2, Optim::kAdam, false, ShardingStrategy::kNoShard},
                      Case{Model::kTransformer, 2, Optim::kAdam},
                      Case{Model::kTransformer, 3, Optim::kSgdMomentum, true},
                      Case{Model::kTransformer, 4, Optim::kAdam}),
    CaseName);

// Round trip: full dict -> shard (or scatter, or sharded dict -> flatten) -> a fresh optimizer over
// the same FSDP model loads it -> one more step equals continuing (the unwrapped model and
// optimizer continue). kShard: FullOptimStateDict (on every rank) -> ShardFullOptimStateDict;
// kScatter: FullOptimStateDict (rank 0 only) -> ScatterFullOptimStateDict;
// kSharded: ShardedOptimStateDict -> FlattenShardedOptimStateDict.
enum class Path { kShard, kScatter, kSharded };
struct RoundTripCase {
  Case c;
  Path path;
};
std::string PathName(Path path) {
  return path == Path::kShard ? "_Shard" : path == Path::kScatter ? "_Scatter" : "_Sharded";
}
std::string RoundTripName(const ::testing::TestParamInfo<RoundTripCase>& info) {
  return absl::StrCat(Describe(info.param.c), PathName(info.param.path));
}
void PrintTo(const RoundTripCase& r, std::ostream* os) { *os << Describe(r.c) << PathName(r.path); }

// Every managed parameter's positive-dimension state in `sharded` is this rank's dim-0 chunk
// of the full dict's tensor; everything else is as in the full dict.
void ExpectChunksOf(const OptimStateDict& full, const OptimStateDict& sharded,
                    const std::vector<std::string>& unmanaged, int rank, int world_size) {
  ASSERT_EQ(sharded.state.size(), full.state.size());
  for (const auto& [key, state] : full.state) {
    const ParamState* st = sharded.state.Find(key);
    ASSERT_NE(st, nullptr) << key;
    const bool managed =
        std::find(unmanaged.begin(), unmanaged.end(), key.fqn()) == unmanaged.end();
    for (const auto& [name, value] : state) {
      const StateValue* v = st->Find(name);
      ASSERT_NE(v, nullptr) << key << " " << name;
      const at::Tensor* t = value.GetIf<at::Tensor>();
      if (!managed || t == nullptr || t->dim() == 0) {
        EXPECT_EQ(DiffStateValues(value, *v), "") << key << " " << name;
        continue;
      }
      const ShardedTensorValue* shard = v->GetIf<ShardedTensorValue>();
      ASSERT_NE(shard, nullptr) << key << " " << name << " is " << v->TypeName();
      EXPECT_EQ(shard->global_shape, t->sizes().vec());
      const int64_t chunk = (t->size(0) + world_size - 1) / world_size;
      const int64_t begin = std::min(t->size(0), chunk * rank);
      EXPECT_EQ(shard->offsets[0], begin);
      EXPECT_TRUE(
          shard->local.equal(t->narrow(0, begin, std::min(t->size(0), begin + chunk) - begin)))
          << key << " " << name;
    }
  }
}

// A round trip's start: r.c trained two steps, and its full optimizer state dict (on rank 0
// only for the scatter path).
struct TrainedWithFullDict {
  Trained t;
  OptimStateDict full;
};

absl::StatusOr<TrainedWithFullDict> TrainAndGatherFull(const RoundTripCase& r,
                                                       comm::ProcessGroup& group) {
  TrainedWithFullDict run;
  FSDP_ASSIGN_OR_RETURN(run.t, Train(Spec(r.c), group, /*steps=*/2));
  FSDP_ASSIGN_OR_RETURN(run.full, FullOptimStateDict(*run.t.s.fsdp, *run.t.adapter,
                                                     {.rank0_only = r.path == Path::kScatter}));
  return run;
}

// The FSDP model's full state dict holds the unwrapped reference's parameter values.
void ExpectParametersMatchReference(FullyShardedDataParallel& fsdp,
                                    const torch::nn::Module& reference) {
  FSDP_ASSERT_OK_AND_ASSIGN(auto params, fsdp::FullStateDict(fsdp));
  auto reference_params = models::NamedParametersWithoutDuplicates(reference);
  for (const auto& [fqn, value] : params) {
    const at::Tensor* expected = reference_params.find(fqn);
    if (expected == nullptr) continue;  // buffers, tied names
    EXPECT_TRUE(at::allclose(value, *expected, 1e-5, 1e-5)) << fqn;
  }
}

class OptimStateRoundTripTest : public ::testing::TestWithParam<RoundTripCase> {};

TEST_P(OptimStateRoundTripTest, OneMoreStepEqualsContinuing) {
  const RoundTripCase r = GetParam();
  RunInRanks(r.c.world_size, [r](comm::ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(TrainedWithFullDict run, TrainAndGatherFull(r, group));
    Trained& t = run.t;
    const OptimStateDict& full = run.full;
    // The local dict must equal what the training optimizer holds now.
    OptimStateDict local;
    if (r.path == Path::kScatter) {
      FSDP_ASSERT_OK_AND_ASSIGN(local, ScatterFullOptimStateDict(full, *t.s.fsdp, *t.adapter));
    } else if (r.path == Path::kShard) {
      FSDP_ASSERT_OK_AND_ASSIGN(local, ShardFullOptimStateDict(full, *t.s.fsdp, *t.adapter));
    } else {
      FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict sharded,
                                ShardedOptimStateDict(*t.s.fsdp, *t.adapter));
      std::vector<std::string> unmanaged;
      for (const auto& p : t.s.fsdp->unmanaged_parameters()) unmanaged.push_back(p.first);
      ExpectChunksOf(full, sharded, unmanaged, group.rank(), group.size());
      FSDP_ASSERT_OK_AND_ASSIGN(local,
                                FlattenShardedOptimStateDict(sharded, *t.s.fsdp, *t.adapter));
    }
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict own, t.adapter->StateDict());
    EXPECT_EQ(DiffOptimStateDicts(SortStateNames(own), SortStateNames(local)), "")
        << "rank " << group.rank();

    auto fresh = MakeOptimizer(r.c.optim, t.s.fsdp->parameters());
    FSDP_ASSERT_OK_AND_ASSIGN(OptimizerAdapter fresh_adapter, OptimizerAdapter::Create(*fresh));
    FSDP_ASSERT_OK(fresh_adapter.LoadStateDict(local));
    FSDP_ASSERT_OK(Step(t.s, *t.reference_adapter, fresh_adapter, /*step=*/2));

    ExpectParametersMatchReference(*t.s.fsdp, *t.s.reference);
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict reference, t.reference_adapter->StateDict());
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict after,
                              FullOptimStateDict(*t.s.fsdp, fresh_adapter, {.rank0_only = false}));
    ExpectMatchesReference(after, reference, t.reference_fqns);
  });
}

INSTANTIATE_TEST_SUITE_P(
    Models, OptimStateRoundTripTest,
    ::testing::Values(
        RoundTripCase{Case{Model::kNested, 2, Optim::kAdam}, Path::kShard},
        RoundTripCase{Case{Model::kNested, 3, Optim::kAdam}, Path::kScatter},
        RoundTripCase{Case{Model::kNested, 4, Optim::kSgdMomentum}, Path::kScatter},
        RoundTripCase{Case{Model::kNested, 3, Optim::kAdam, true}, Path::kShard},
        RoundTripCase{Case{Model::kNested, 2, Optim::kAdam, true}, Path::kScatter},
        RoundTripCase{Case{Model::kNested, 3, Optim::kAdam}, Path::kSharded},
        RoundTripCase{Case{Model::kNested, 4, Optim::kSgdMomentum, true}, Path::kSharded},
        RoundTripCase{Case{Model::kTransformer, 3, Optim::kAdam}, Path::kShard},
        RoundTripCase{Case{Model::kTransformer, 2, Optim::kSgdMomentum}, Path::kScatter},
        RoundTripCase{Case{Model::kTransformer, 4, Optim::kAdam, true}, Path::kScatter},
        RoundTripCase{Case{Model::kTransformer, 2, Optim::kAdam}, Path::kSharded},
        RoundTripCase{Case{Model::kTransformer, 3, Optim::kAdam, true}, Path::kSharded}),
    RoundTripName);

// PyTorch's *_halve_world_size tests: the full dict of a 4-rank job loads into the same model
// wrapped over 2 ranks (a subgroup), and one more step there equals continuing unwrapped.
class HalveWorldSizeTest : public ::testing::TestWithParam<RoundTripCase> {};

TEST_P(HalveWorldSizeTest, LoadsIntoHalfTheRanks) {
  const RoundTripCase r = GetParam();
  RunInRanks(r.c.world_size, [r](comm::ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(TrainedWithFullDict run, TrainAndGatherFull(r, group));
    Trained& t = run.t;
    const OptimStateDict& full = run.full;
    std::vector<int> half;
    for (int i = 0; i < group.size() / 2; ++i) half.push_back(i);
    FSDP_ASSERT_OK_AND_ASSIGN(std::shared_ptr<comm::ProcessGroup> sub, group.NewSubgroup(half));
    if (sub == nullptr) return;
    Case small = r.c;
    small.world_size = sub->size();
    FSDP_ASSERT_OK_AND_ASSIGN(Training s, Build(Spec(small), *sub, t.s.reference.get()));
    auto optim = MakeOptimizer(r.c.optim, s.fsdp->parameters());
    FSDP_ASSERT_OK_AND_ASSIGN(OptimizerAdapter adapter, OptimizerAdapter::Create(*optim));
    OptimStateDict local;
    if (r.path == Path::kScatter) {
      FSDP_ASSERT_OK_AND_ASSIGN(local, ScatterFullOptimStateDict(full, *s.fsdp, adapter));
    } else {
      FSDP_ASSERT_OK_AND_ASSIGN(local, ShardFullOptimStateDict(full, *s.fsdp, adapter));
    }
    FSDP_ASSERT_OK(adapter.LoadStateDict(local));
    Training continuing{t.s.reference, t.s.reference_loss, std::move(s.fsdp), s.fsdp_loss};
    FSDP_ASSERT_OK(Step(continuing, *t.reference_adapter, adapter, /*step=*/2));

    ExpectParametersMatchReference(*continuing.fsdp, *t.s.reference);
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict reference, t.reference_adapter->StateDict());
    FSDP_ASSERT_OK_AND_ASSIGN(
        OptimStateDict after,
        FullOptimStateDict(*continuing.fsdp, adapter, {.rank0_only = false, .group = sub}));
    ExpectMatchesReference(after, reference, t.reference_fqns);
  });
}

INSTANTIATE_TEST_SUITE_P(
    Models, HalveWorldSizeTest,
    ::testing::Values(RoundTripCase{Case{Model::kNested, 4, Optim::kAdam}, Path::kShard},
                      RoundTripCase{Case{Model::kNested, 4, Optim::kSgdMomentum, true},
                                    Path::kScatter},
                      RoundTripCase{Case{Model::kTransformer, 4, Optim::kAdam}, Path::kScatter}),
    RoundTripName);

// PyTorch's test_full_optim_state_dict_nested_invalid: the unflattened parameters of one flat
// parameter must agree on `step`.
TEST(ShardFullOptimStateDict, RefusesDifferingScalarStateOfOneFlatParameter) {
  RunInRanks(2, [](comm::ProcessGroup& group) {
    const Case c{Model::kNested, 2, Optim::kAdam};
    FSDP_ASSERT_OK_AND_ASSIGN(Trained t, Train(Spec(c), group, /*steps=*/1));
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict full,
                              FullOptimStateDict(*t.s.fsdp, *t.adapter, {.rank0_only = false}));
    // block1's unit holds block1.weight and block1.bias_module1.bias.
    ParamState* state = full.state.Find(ParamKey::Fqn("block1.weight"));
    ASSERT_NE(state, nullptr);
    state->Set("step", StateValue(at::scalar_tensor(2.0, at::kFloat)));
    const auto expected = StatusIs(
        absl::StatusCode::kInvalidArgument,
        AllOf(HasSubstr("All unflattened parameters comprising a single flat parameter "
                        "must have scalar state with the same value and dtype but got values "
                        "{2.0, 1.0} and dtypes {torch.float32} for state step and unflattened "
                        "parameter names ['block1.weight', 'block1.bias_module1.bias']")));
    EXPECT_THAT(ShardFullOptimStateDict(full, *t.s.fsdp, *t.adapter), expected);
    EXPECT_THAT(ScatterFullOptimStateDict(full, *t.s.fsdp, *t.adapter), expected);
  });
}

// Ranks whose optimizer lacks states that rank 0's has: 1.13's error, on every rank.
TEST(FullOptimStateDict, ReportsRanksMissingRank0States) {
  RunInRanks(3, [](comm::ProcessGroup& group) {
    const Case c{Model::kNested, 3, Optim::kAdam};
    FSDP_ASSERT_OK_AND_ASSIGN(Training s, Build(Spec(c), group));
    auto optim = MakeOptimizer(c.optim, s.fsdp->parameters());
    FSDP_ASSERT_OK_AND_ASSIGN(OptimizerAdapter adapter, OptimizerAdapter::Create(*optim));
    s.fsdp_loss(0).backward();
    if (group.rank() != 2) {  // rank 2 never steps
      FSDP_ASSERT_OK(adapter.Step());
    }
    EXPECT_THAT(
        FullOptimStateDict(*s.fsdp, adapter),
        StatusIs(absl::StatusCode::kFailedPrecondition,
                 AllOf(HasSubstr("FSDP currently requires each rank to have at least the "
                                 "optimizer states needed by rank 0's optimizer but some ranks "
                                 "are missing some of those states"),
                       HasSubstr("\nRank 2 is missing states for the parameters: [('bias',), "),
                       ::testing::Not(HasSubstr("Rank 1 is missing")))));
  });
}

}  // namespace
}  // namespace fsdp::optim_state
