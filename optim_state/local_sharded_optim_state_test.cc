// LocalShardedOptimStateDict and its load (FlattenShardedOptimStateDict) on real ranks: each
// box equals its region of FSDP1's full dict (checked against PyTorch by the peer suite); the
// optimizer state bit for bit after dict -> load at the same layout (the dict being views of the
// optimizer's state), and after a save at world size 2 -> load at 3 under another wrapping with
// use_orig_params switched; a dict of another model refused on every rank.
#include "optim_state/local_sharded_optim_state.h"

#include <torch/optim/adam.h>

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/multiprocess_testutil.h"
#include "comm/status_macros.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "models/transformer.h"
#include "optim_state/fsdp_optim_state.h"
#include "optim_state/optim_state_dict.h"
#include "optim_state/optim_state_testutil.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::optim_state {
namespace {

using ::fsdp::optim_state::testing::Canonical;
using ::fsdp::optim_state::testing::Case;
using ::fsdp::optim_state::testing::Describe;
using ::fsdp::optim_state::testing::MakeAdam;
using ::fsdp::optim_state::testing::Model;
using ::fsdp::optim_state::testing::Train;
using ::fsdp::optim_state::testing::Trained;
using ::fsdp::optim_state::testing::TrainingSpec;
using ::fsdp::testing::RunInRanks;
using ::fsdp::testing::StatusIs;
using ::testing::HasSubstr;

// Every box of every sharded value of `osd`.
template <typename Fn>
void ForEachBox(const OptimStateDict& osd, Fn&& fn) {
  for (const auto& [key, st] : osd.state) {
    for (const auto& [name, value] : st) {
      const ShardedTensorValue* v = value.template GetIf<ShardedTensorValue>();
      if (v == nullptr) continue;
      fn(key, name, v->local, v->offsets);
      for (const auto& shard : v->more_shards) fn(key, name, shard.local, shard.offsets);
    }
  }
}

class LocalShardedRoundTrip : public ::testing::TestWithParam<Case> {};

TEST_P(LocalShardedRoundTrip, SameLayoutLoadsTheStateBitForBit) {
  const Case c = GetParam();
  RunInRanks(c.world_size, [c](comm::ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(Trained t, Train(c, group, 2));
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict before, t.adapter->StateDict());
    before = CloneOptimStateDict(before);
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict osd,
                              LocalShardedOptimStateDict(*t.s.fsdp, *t.adapter));
    // Views, not copies: every non-empty box lies in the optimizer's state.
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict live, t.adapter->StateDict());
    int boxes = 0;
    ForEachBox(osd, [&](const ParamKey& key, const std::string& name, const at::Tensor& box,
                        const std::vector<int64_t>&) {
      if (box.numel() == 0) return;
      bool aliased = false;
      for (const auto& [id, st] : live.state) {
        const StateValue* v = st.Find(name);
        aliased = aliased || (v != nullptr && v->Is<at::Tensor>() &&
                              v->Get<at::Tensor>().storage().is_alias_of(box.storage()));
      }
      EXPECT_TRUE(aliased) << key << " " << name;
      ++boxes;
    });
    EXPECT_GT(boxes, 0);
    // What a value tells: each box is that region of FSDP1's full dict (gathered), scalars
    // and param_groups are the full dict's.
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict full,
                              FullOptimStateDict(*t.s.fsdp, *t.adapter, {.rank0_only = false}));
    ForEachBox(osd, [&](const ParamKey& key, const std::string& name, const at::Tensor& box,
                        const std::vector<int64_t>& offsets) {
      at::Tensor region = full.state.Find(key)->Find(name)->Get<at::Tensor>();
      const ShardedTensorValue& v = osd.state.Find(key)->Find(name)->Get<ShardedTensorValue>();
      EXPECT_EQ(v.global_shape, region.sizes().vec()) << key << " " << name;
      for (int64_t d = 0; d < box.dim(); ++d) region = region.narrow(d, offsets[d], box.size(d));
      EXPECT_TRUE(at::equal(region, box)) << key << " " << name;
    });
    for (const auto& [key, st] : osd.state) {
      for (const auto& [name, value] : st) {
        if (value.Is<ShardedTensorValue>()) continue;
        EXPECT_EQ(DiffStateValues(*full.state.Find(key)->Find(name), value), "") << key << name;
      }
    }
    EXPECT_EQ(DiffOptimStateDicts(Canonical(OptimStateDict{{}, full.param_groups, true}),
                                  Canonical(OptimStateDict{{}, osd.param_groups, true})),
              "");
    // Into a fresh optimizer over the same model: the first one's state, exactly.
    auto optim = MakeAdam(t.s.fsdp->parameters());
    FSDP_ASSERT_OK_AND_ASSIGN(OptimizerAdapter fresh, OptimizerAdapter::Create(*optim));
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict local,
                              FlattenShardedOptimStateDict(osd, *t.s.fsdp, fresh));
    // Nothing moved: without use_orig_params each flat parameter's loaded state is the
    // optimizer's own (unmanaged parameters' state is copied, as FSDP1's loads do).
    std::vector<int64_t> flat_ids;
    int64_t id = 0;
    for (const auto& g : t.adapter->optimizer().param_groups()) {
      for (const at::Tensor& p : g.params()) {
        for (const auto& unit : t.s.fsdp->units()) {
          if (unit.handle != nullptr && unit.handle->flat_param().is_same(p)) {
            flat_ids.push_back(id);
          }
        }
        ++id;
      }
    }
    if (!c.use_orig_params) {
      ASSERT_FALSE(flat_ids.empty());
      for (int64_t flat_id : flat_ids) {
        const ParamKey key = ParamKey::Id(flat_id);
        const ParamState* loaded = local.state.Find(key);
        ASSERT_NE(loaded, nullptr) << key;
        for (const auto& [name, value] : *loaded) {
          if (value.Is<at::Tensor>() && value.Get<at::Tensor>().dim() > 0) {
            EXPECT_TRUE(value.Get<at::Tensor>().is_alias_of(
                live.state.Find(key)->Find(name)->Get<at::Tensor>()))
                << key << " " << name;
          }
        }
      }
    }
    FSDP_ASSERT_OK(fresh.LoadStateDict(local));
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict after, fresh.StateDict());
    EXPECT_EQ(DiffOptimStateDicts(Canonical(before), Canonical(after)), "");
  });
}

INSTANTIATE_TEST_SUITE_P(Cases, LocalShardedRoundTrip,
                         ::testing::Values(Case{Model::kTransformer, 2},
                                           Case{Model::kTransformer, 3, true},
                                           Case{Model::kNested, 2, true}, Case{Model::kNested, 3}),
                         [](const auto& info) { return Describe(info.param); });

// The transformer wrapped whole (one unit at the root), over `group`, with a fresh Adam.
struct RootOnly {
  std::unique_ptr<FullyShardedDataParallel> fsdp;
  std::unique_ptr<torch::optim::Optimizer> optim;
  std::unique_ptr<OptimizerAdapter> adapter;
};
absl::StatusOr<RootOnly> WrapRootOnly(comm::ProcessGroup& group, bool use_orig_params) {
  models::TransformerWithSharedParams model(0, true, true);
  FsdpOptions options;
  options.use_orig_params = use_orig_params;
  RootOnly r;
  FSDP_ASSIGN_OR_RETURN(
      r.fsdp, FullyShardedDataParallel::Wrap(model, ::fsdp::testing::Borrow(group), options));
  r.optim = MakeAdam(r.fsdp->parameters());
  FSDP_ASSIGN_OR_RETURN(OptimizerAdapter a, OptimizerAdapter::Create(*r.optim));
  r.adapter = std::make_unique<OptimizerAdapter>(std::move(a));
  return r;
}

class LocalShardedReshard : public ::testing::TestWithParam<bool> {};

// Saved by 2 ranks (a unit per layer), loaded by 3 (one unit) with use_orig_params switched; the
// third rank has no dict. The loaded state, gathered, equals the saved state gathered.
TEST_P(LocalShardedReshard, TwoRanksToThreeUnderAnotherWrapping) {
  const bool orig_before = GetParam();
  RunInRanks(3, [orig_before](comm::ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(std::shared_ptr<comm::ProcessGroup> pair, group.NewSubgroup({0, 1}));
    OptimStateDict osd, full_before;
    std::optional<Trained> t;
    if (pair != nullptr) {
      FSDP_ASSERT_OK_AND_ASSIGN(
          t, Train(TrainingSpec{.model = Model::kTransformer, .use_orig_params = orig_before},
                   *pair, 2));
      FSDP_ASSERT_OK_AND_ASSIGN(osd, LocalShardedOptimStateDict(*t->s.fsdp, *t->adapter));
      FSDP_ASSERT_OK_AND_ASSIGN(full_before, FullOptimStateDict(*t->s.fsdp, *t->adapter));
    }
    FSDP_ASSERT_OK_AND_ASSIGN(RootOnly r, WrapRootOnly(group, !orig_before));
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict local,
                              FlattenShardedOptimStateDict(osd, *r.fsdp, *r.adapter));
    FSDP_ASSERT_OK(r.adapter->LoadStateDict(local));
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict full_after, FullOptimStateDict(*r.fsdp, *r.adapter));
    if (group.rank() != 0) return;
    OptimStateDict a = Canonical(full_before), b = Canonical(full_after);
    ASSERT_FALSE(a.state.empty());
    EXPECT_EQ(DiffOptimStateDicts(a, b), "");
  });
}

INSTANTIATE_TEST_SUITE_P(UseOrigParams, LocalShardedReshard, ::testing::Bool(),
                         [](const auto& info) {
                           return std::string(info.param ? "OrigToFlat" : "FlatToOrig");
                         });

// A dict of another model: refused on every rank, naming the FQN and the rank; a dict refused
// on one rank only fails the others too, naming that rank, and nothing is loaded anywhere.
TEST(LocalShardedErrors, DictOfAnotherModelIsRefused) {
  RunInRanks(2, [](comm::ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(Trained nested, Train(Case{Model::kNested, 2}, group, 1));
    FSDP_ASSERT_OK_AND_ASSIGN(Trained transformer, Train(Case{Model::kTransformer, 2}, group, 1));
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict foreign,
                              LocalShardedOptimStateDict(*nested.s.fsdp, *nested.adapter));
    EXPECT_THAT(
        FlattenShardedOptimStateDict(foreign, *transformer.s.fsdp, *transformer.adapter).status(),
        StatusIs(absl::StatusCode::kInvalidArgument,
                 AllOf(HasSubstr(absl::StrCat("rank ", group.rank())),
                       HasSubstr("which is not a parameter of this model"))));
    FSDP_ASSERT_OK_AND_ASSIGN(
        OptimStateDict own, LocalShardedOptimStateDict(*transformer.s.fsdp, *transformer.adapter));
    const ParamKey first = own.state.at_index(0).first;
    if (group.rank() == 1) {
      ParamState st = own.state.at_index(0).second;
      const std::string name = st.at_index(0).first;
      ShardedTensorValue v = st.at_index(0).second.Get<ShardedTensorValue>();
      v.global_shape[0] += 1;
      st.Set(name, StateValue(std::move(v)));
      own.state.Set(first, std::move(st));
    }
    auto result = FlattenShardedOptimStateDict(own, *transformer.s.fsdp, *transformer.adapter);
    if (group.rank() == 1) {
      EXPECT_THAT(result.status(), StatusIs(absl::StatusCode::kInvalidArgument,
                                            AllOf(HasSubstr("rank 1"), HasSubstr(first.fqn()),
                                                  HasSubstr("has global shape"))));
    } else {
      EXPECT_THAT(result.status(),
                  StatusIs(absl::StatusCode::kInvalidArgument,
                           HasSubstr("rank(s) 1 of the group refused their dict")));
    }
  });
}

}  // namespace
}  // namespace fsdp::optim_state
