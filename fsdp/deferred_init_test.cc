// Deferred initialisation on real ranks: a meta-device model materialised by Wrap unit by unit
// equals, bit for bit, the same model built eagerly with the same initialisation (shards, state
// dicts, training losses); FSDP1 itself, given the same meta model and param_init_fn, calls it on
// the same modules in the same order and ends with the same state dict; and the errors.
#include "fsdp/deferred_init.h"

#include <torch/torch.h>

#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "comm/multiprocess_testutil.h"
#include "fsdp/fsdp_testutil.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "fsdp/hybrid_shard.h"
#include "fsdp/state_dict.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "models/nested_model.h"
#include "tools/python_testutil.h"

namespace fsdp {
namespace {

using ::fsdp::testing::Borrow;
using ::fsdp::testing::Net;
using ::fsdp::testing::NormNet;
using ::fsdp::testing::RunInRanks;
using ::fsdp::testing::Seeded;
using ::fsdp::testing::StatusIs;
using ::fsdp::testing::StrategyCase;
using ::testing::HasSubstr;

// The tests' param_init_fn (and deferred_init_nested.py's): FqnSeededInit filling each floating
// tensor with uniform(-0.5, 0.5) (others with zeros); records the modules it is called on.
class FqnInit {
 public:
  explicit FqnInit(torch::nn::Module& root)
      : init_(FqnSeededInit(root,
                            [](const std::string&, at::Tensor& t, at::Generator& gen) {
                              if (t.is_floating_point()) {
                                t.uniform_(-0.5, 0.5, gen);
                              } else {
                                t.zero_();
                              }
                            })),
        names_(std::make_shared<std::unordered_map<const torch::nn::Module*, std::string>>()),
        calls_(std::make_shared<std::vector<std::string>>()) {
    for (const auto& item : root.named_modules()) (*names_)[item.value().get()] = item.key();
  }

  void operator()(torch::nn::Module& module) const {
    const std::string& name = names_->at(&module);
    calls_->push_back(name.empty() ? "<root>" : name);
    init_(module);
  }

  // Initialises every module of `root` (the eager model).
  void All(torch::nn::Module& root) const {
    for (const auto& item : root.named_modules()) init_(*item.value());
  }

  const std::vector<std::string>& calls() const { return *calls_; }

 private:
  ParamInitFn init_;
  std::shared_ptr<std::unordered_map<const torch::nn::Module*, std::string>> names_;
  std::shared_ptr<std::vector<std::string>> calls_;
};

void ExpectEqualStateDicts(const StateDict& a, const StateDict& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].first, b[i].first);
    EXPECT_TRUE(at::equal(a[i].second, b[i].second)) << a[i].first;
  }
}

class DeferredInitMatchesEager : public ::testing::TestWithParam<StrategyCase> {};

TEST_P(DeferredInitMatchesEager, ShardsStateDictsAndLossesAreBitEqual) {
  const StrategyCase c = GetParam();
  RunInRanks(c.world_size, [c](comm::ProcessGroup& group) {
    Net eager = Seeded<Net>(0);
    FqnInit(*eager).All(*eager);
    Net meta = Seeded<Net>(0);
    ToMeta(*meta);
    const FqnInit init(*meta);
    FSDP_ASSERT_OK_AND_ASSIGN(auto eager_fsdp, testing::WrapNet(eager, Borrow(group), c));
    FSDP_ASSERT_OK_AND_ASSIGN(auto meta_fsdp, testing::WrapNet(meta, Borrow(group), c,
                                                               /*nest_inner_b=*/true, init));
    // Inside-out, breadth-first within each unit, as FSDP1 (see NestedModelLikeFsdp1).
    EXPECT_EQ(absl::StrJoin(init.calls(), " "), "l0 inner.b inner inner.a <root> head");
    for (const auto& p : meta->parameters()) EXPECT_FALSE(p.is_meta());

    const auto eager_units = eager_fsdp->units();
    const auto meta_units = meta_fsdp->units();
    ASSERT_EQ(eager_units.size(), meta_units.size());
    for (size_t i = 0; i < eager_units.size(); ++i) {
      EXPECT_TRUE(
          at::equal(eager_units[i].handle->flat_param(), meta_units[i].handle->flat_param()))
          << "unit '" << meta_units[i].module_prefix << "' on rank " << group.rank();
    }
    FSDP_ASSERT_OK_AND_ASSIGN(StateDict eager_full,
                              FullStateDict(*eager_fsdp, {.rank0_only = false}));
    FSDP_ASSERT_OK_AND_ASSIGN(StateDict meta_full,
                              FullStateDict(*meta_fsdp, {.rank0_only = false}));
    ExpectEqualStateDicts(eager_full, meta_full);

    torch::optim::Adam eager_optim(eager_fsdp->parameters(), torch::optim::AdamOptions(0.01));
    torch::optim::Adam meta_optim(meta_fsdp->parameters(), torch::optim::AdamOptions(0.01));
    for (int step = 0; step < 3; ++step) {
      EXPECT_EQ(testing::TrainStep(*eager_fsdp, eager_optim, step),
                testing::TrainStep(*meta_fsdp, meta_optim, step))
          << "step " << step;
    }
    FSDP_ASSERT_OK_AND_ASSIGN(eager_full, FullStateDict(*eager_fsdp, {.rank0_only = false}));
    FSDP_ASSERT_OK_AND_ASSIGN(meta_full, FullStateDict(*meta_fsdp, {.rank0_only = false}));
    ExpectEqualStateDicts(eager_full, meta_full);
  });
}

INSTANTIATE_TEST_SUITE_P(Strategies, DeferredInitMatchesEager,
                         ::testing::Values(StrategyCase{2, ShardingStrategy::kFullShard, false},
                                           StrategyCase{2, ShardingStrategy::kFullShard, true},
                                           StrategyCase{2, ShardingStrategy::kNoShard, false},
                                           StrategyCase{2, ShardingStrategy::kNoShard, true},
                                           StrategyCase{3, ShardingStrategy::kFullShard, false},
                                           StrategyCase{3, ShardingStrategy::kFullShard, true},
                                           StrategyCase{3, ShardingStrategy::kNoShard, false},
                                           StrategyCase{3, ShardingStrategy::kNoShard, true}),
                         testing::StrategyCaseName);

// Without a param_init_fn LibTorch's modules are reset as their constructors initialise them,
// in the order they were built, so the same seed gives the eager model (buffers included).
TEST(DeferredInit, ResetsLibTorchModulesAsTheirConstructorsDo) {
  RunInRanks(2, [](comm::ProcessGroup& group) {
    NormNet eager = Seeded<NormNet>(0);
    NormNet meta = MakeMeta(NormNet());
    EXPECT_TRUE(meta->norm->running_var.is_meta());
    torch::manual_seed(0);
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp, FullyShardedDataParallel::Wrap(meta, Borrow(group)));
    FSDP_ASSERT_OK_AND_ASSIGN(StateDict full, FullStateDict(*fsdp, {.rank0_only = false}));
    StateDict expected;
    for (const auto& p : eager->named_parameters()) expected.emplace_back(p.key(), p.value());
    for (const auto& b : eager->named_buffers()) expected.emplace_back(b.key(), b.value());
    std::sort(full.begin(), full.end(), [](auto& a, auto& b) { return a.first < b.first; });
    std::sort(expected.begin(), expected.end(), [](auto& a, auto& b) { return a.first < b.first; });
    ExpectEqualStateDicts(full, expected);
  });
}

// sync_module_states after materialisation: ranks that reset from different seeds end with
// rank 0's values.
TEST(DeferredInit, SyncModuleStatesBroadcastsRankZerosMaterialisedValues) {
  RunInRanks(3, [](comm::ProcessGroup& group) {
    NormNet meta = MakeMeta(NormNet());
    torch::manual_seed(group.rank());
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp, FullyShardedDataParallel::Wrap(
                                             meta, Borrow(group), {.sync_module_states = true}));
    FSDP_ASSERT_OK_AND_ASSIGN(StateDict full, FullStateDict(*fsdp, {.rank0_only = false}));
    const NormNet rank0 = Seeded<NormNet>(0);
    for (const auto& [fqn, value] : full) {
      const auto* p = rank0->named_parameters().find(fqn);
      if (p != nullptr) {
        EXPECT_TRUE(at::equal(value, *p)) << fqn << " on rank " << group.rank();
      }
    }
  });
}

// Under HYBRID_SHARD (2 replicas of 2 shards) rank 0's materialised values reach every replica:
// each shard group broadcasts within itself and the replicate group carries rank 0's across.
TEST(DeferredInit, SyncModuleStatesReachesEveryReplicaUnderHybridShard) {
  RunInRanks(4, [](comm::ProcessGroup& world) {
    FSDP_ASSERT_OK_AND_ASSIGN(HybridShardGroups groups, MakeHybridShardGroups(world, 2));
    NormNet meta = MakeMeta(NormNet());
    torch::manual_seed(world.rank());
    FsdpOptions options{.sharding_strategy = ShardingStrategy::kHybridShard,
                        .sync_module_states = true};
    options.replicate_group = groups.replicate;
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp,
                              FullyShardedDataParallel::Wrap(meta, groups.shard, options));
    FSDP_ASSERT_OK_AND_ASSIGN(StateDict full, FullStateDict(*fsdp, {.rank0_only = false}));
    const NormNet rank0 = Seeded<NormNet>(0);
    std::map<std::string, at::Tensor> expected;
    for (const auto& item : rank0->named_parameters()) expected[item.key()] = item.value();
    for (const auto& item : rank0->named_buffers()) expected[item.key()] = item.value();
    ASSERT_EQ(full.size(), expected.size());
    for (const auto& [fqn, value] : full) {
      EXPECT_TRUE(at::equal(value, expected.at(fqn))) << fqn << " on rank " << world.rank();
    }
  });
}

// FSDP1 on NestedModel built under torch.device("meta") with the same param_init_fn
// (testdata/deferred_init_nested.py): the same calls in the same order, the same state dict.
TEST(DeferredInit, NestedModelLikeFsdp1) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string ours_path = absl::StrCat(tmp != nullptr ? tmp : "/tmp", "/deferred_ours.txt");
  RunInRanks(2, [ours_path](comm::ProcessGroup& group) {
    models::NestedModel model;
    ToMeta(*model);
    const FqnInit init(*model);
    FSDP_ASSERT_OK_AND_ASSIGN(
        auto fsdp,
        FullyShardedDataParallel::Wrap(model, Borrow(group),
                                       {.nested = model->wrap_slots(), .param_init_fn = init}));
    std::vector<std::string> lines;
    for (const std::string& call : init.calls()) lines.push_back(absl::StrCat("call ", call));
    FSDP_ASSERT_OK_AND_ASSIGN(StateDict full, FullStateDict(*fsdp, {.rank0_only = false}));
    for (const auto& [key, value] : full) {
      const at::Tensor t = value.contiguous();
      const auto* bytes = static_cast<const unsigned char*>(t.data_ptr());
      std::string hex;
      for (size_t i = 0; i < t.nbytes(); ++i)
        absl::StrAppend(&hex, absl::Hex(bytes[i], absl::kZeroPad2));
      lines.push_back(absl::StrCat("state ", key, " ", hex));
    }
    if (group.rank() == 0) std::ofstream(ours_path) << absl::StrJoin(lines, "\n") << "\n";
  });
  if (::fsdp::testing::IsRankProcess()) return;
  const ::fsdp::testing::PythonLines py = ::fsdp::testing::RunPythonScriptLines(
      "fsdp/testdata/deferred_init_nested.py", {"call ", "state "});
  ASSERT_EQ(py.result.exit_code, 0) << py.result.output;
  const std::vector<std::string>& pytorch = py.lines;
  const std::vector<std::string> ours = ::fsdp::testing::ReadFileLines(ours_path);
  ASSERT_FALSE(pytorch.empty()) << py.result.output;
  EXPECT_EQ(ours, pytorch);
}

// --- errors ---

TEST(DeferredInitErrors, ModuleWithoutResetParametersNeedsAParamInitFn) {
  RunInRanks(2, [](comm::ProcessGroup& group) {
    Net meta = Seeded<Net>(0);
    ToMeta(*meta);
    EXPECT_THAT(
        testing::WrapNet(meta, Borrow(group), {2, ShardingStrategy::kFullShard, false}).status(),
        StatusIs(absl::StatusCode::kInvalidArgument,
                 HasSubstr("unable to call reset_parameters() for module '' "
                           "(fsdp::testing::NetImpl)")));
  });
}

TEST(DeferredInitErrors, MetaTensorInAnIgnoredModuleIsNamed) {
  RunInRanks(2, [](comm::ProcessGroup& group) {
    Net meta = Seeded<Net>(0, testing::NetOptions{.with_unmanaged = true});
    ToMeta(*meta);
    EXPECT_THAT(testing::WrapNet(meta, Borrow(group), {2, ShardingStrategy::kFullShard, false},
                                 /*nest_inner_b=*/true, FqnInit(*meta))
                    .status(),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         HasSubstr("parameter 'extra.weight' is a meta tensor that no FSDP unit "
                                   "manages")));
  });
}

TEST(DeferredInitErrors, ParamInitFnThatLeavesAMetaTensor) {
  RunInRanks(2, [](comm::ProcessGroup& group) {
    Net meta = Seeded<Net>(0);
    ToMeta(*meta);
    EXPECT_THAT(testing::WrapNet(meta, Borrow(group), {2, ShardingStrategy::kFullShard, false},
                                 /*nest_inner_b=*/true, [](torch::nn::Module&) {})
                    .status(),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         HasSubstr("FSDP param_init_fn left 'l0.weight' on the meta device")));
  });
}

TEST(DeferredInitErrors, ParamInitFnThatChangesAShape) {
  RunInRanks(2, [](comm::ProcessGroup& group) {
    Net meta = Seeded<Net>(0);
    ToMeta(*meta);
    auto reshape = [](torch::nn::Module& m) {
      ToEmpty(m);
      for (const auto& p : m.named_parameters(/*recurse=*/false))
        p.value().set_data(torch::zeros({2}));
    };
    EXPECT_THAT(testing::WrapNet(meta, Borrow(group), {2, ShardingStrategy::kFullShard, false},
                                 /*nest_inner_b=*/true, reshape)
                    .status(),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         HasSubstr("FSDP param_init_fn changed 'l0.weight' from Float[6, 4] to "
                                   "Float[2]")));
  });
}

TEST(DeferredInitErrors, ParamInitFnThatThrowsIsNamed) {
  RunInRanks(2, [](comm::ProcessGroup& group) {
    Net meta = Seeded<Net>(0);
    ToMeta(*meta);
    auto fail = [](torch::nn::Module&) { TORCH_CHECK(false, "no init here"); };
    EXPECT_THAT(testing::WrapNet(meta, Borrow(group), {2, ShardingStrategy::kFullShard, false},
                                 /*nest_inner_b=*/true, fail)
                    .status(),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         HasSubstr("FSDP param_init_fn failed on module 'l0'")));
  });
}

}  // namespace
}  // namespace fsdp
