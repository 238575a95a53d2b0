// Full and sharded model state dicts of FSDP models against the same model
// trained unwrapped, at world sizes 1 to 4, for the three sharding strategies
// with and without use_orig_params.
#include "fsdp/state_dict.h"

#include <torch/torch.h>

#include <algorithm>
#include <map>

#include "comm/multiprocess_testutil.h"
#include "fsdp/fsdp_testutil.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "fsdp/module_slot.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fsdp {
namespace {

using ::fsdp::testing::Batch;
using ::fsdp::testing::Borrow;
using ::fsdp::testing::MakeNetPair;
using ::fsdp::testing::Net;
using ::fsdp::testing::NetOptions;
using ::fsdp::testing::NetPair;
using ::fsdp::testing::RunInRanks;
using ::fsdp::testing::Seeded;
using ::fsdp::testing::StatusIs;
using ::fsdp::testing::TrainBoth;
using ::fsdp::testing::TrainStep;
using ::fsdp::testing::WrapNet;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Case = ::fsdp::testing::StrategyCase;

// The state-dict tests' Net has what FSDP leaves alone: `extra` (ignored) and `shift` (a
// buffer).
constexpr NetOptions kWithUnmanaged{.with_unmanaged = true};

Net NetFromSeed(uint64_t seed) { return Seeded<Net>(seed, kWithUnmanaged); }

const std::vector<std::string> kNetKeys = {
    "scale",          "shift",        "l0.weight",   "l0.bias",   "inner.a.weight", "inner.a.bias",
    "inner.b.weight", "inner.b.bias", "head.weight", "head.bias", "extra.weight",   "extra.bias"};

// The reference and its FSDP copy (NetPair) after one Adam step each.
absl::StatusOr<NetPair> PairAfterOneStep(comm::ProcessGroup& group, const Case& c) {
  FSDP_ASSIGN_OR_RETURN(NetPair pair, MakeNetPair(group, c, kWithUnmanaged));
  TrainBoth(pair, 0);
  return pair;
}

// Net from seed 0 after one Adam step, unwrapped: the values the load tests load.
Net TrainedReference() {
  Net reference = NetFromSeed(0);
  torch::optim::Adam optim(reference->parameters(), torch::optim::AdamOptions(0.01));
  TrainStep(*reference, optim, 0);
  return reference;
}

absl::StatusOr<std::unique_ptr<FullyShardedDataParallel>> WrapNetFromSeed(
    uint64_t seed, std::shared_ptr<comm::ProcessGroup> group, const Case& c) {
  return WrapNet(NetFromSeed(seed), std::move(group), c);
}

// torch's state_dict of an unwrapped module: parameters, buffers, then
// children; copies.
void TorchStateDictInto(torch::nn::Module& module, const std::string& prefix, StateDict& out) {
  for (const auto& p : module.named_parameters(false)) {
    out.emplace_back(prefix + p.key(), p.value().detach().clone());
  }
  for (const auto& b : module.named_buffers(false)) {
    out.emplace_back(prefix + b.key(), b.value().detach().clone());
  }
  for (const auto& child : module.named_children()) {
    TorchStateDictInto(*child.value(), prefix + child.key() + ".", out);
  }
}
StateDict TorchStateDict(torch::nn::Module& module) {
  StateDict out;
  TorchStateDictInto(module, "", out);
  return out;
}

std::vector<std::string> Keys(const StateDict& dict) {
  std::vector<std::string> keys;
  for (const auto& [key, value] : dict) keys.push_back(key);
  return keys;
}

void ExpectDictsNear(const StateDict& actual, const StateDict& expected) {
  ASSERT_EQ(Keys(actual), Keys(expected));
  for (size_t i = 0; i < actual.size(); ++i) {
    EXPECT_EQ(actual[i].second.sizes(), expected[i].second.sizes()) << actual[i].first;
    EXPECT_TRUE(at::allclose(actual[i].second, expected[i].second, 1e-5, 1e-6)) << actual[i].first;
  }
}

void ExpectDictsEqual(const StateDict& actual, const StateDict& expected) {
  ASSERT_EQ(Keys(actual), Keys(expected));
  for (size_t i = 0; i < actual.size(); ++i) {
    EXPECT_TRUE(at::equal(actual[i].second, expected[i].second)) << actual[i].first;
  }
}

void ExpectForwardMatches(FullyShardedDataParallel& fsdp, Net& reference) {
  at::Tensor x = Batch(42);
  at::Tensor expected = reference->forward(x);
  at::Tensor actual = fsdp.forward(x);
  EXPECT_TRUE(at::allclose(actual, expected, 1e-5, 1e-6)) << actual << "\n" << expected;
}

class StateDictTest : public ::testing::TestWithParam<Case> {};

TEST_P(StateDictTest, FullStateDictMatchesUnwrappedTrainingAndRoundTrips) {
  const Case c = GetParam();
  RunInRanks(c.world_size, [c](comm::ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(NetPair pair, PairAfterOneStep(group, c));

    FSDP_ASSERT_OK_AND_ASSIGN(StateDict dict, FullStateDict(*pair.fsdp));
    EXPECT_EQ(Keys(dict), kNetKeys);
    ExpectDictsNear(dict, TorchStateDict(*pair.reference));
    FSDP_ASSERT_OK_AND_ASSIGN(StateDict offloaded,
                              FullStateDict(*pair.fsdp, {.offload_to_cpu = true}));
    ExpectDictsEqual(offloaded, dict);
    // Copies: training on does not change them.
    TrainStep(*pair.fsdp, *pair.optim, 1);
    FSDP_ASSERT_OK_AND_ASSIGN(StateDict later, FullStateDict(*pair.fsdp));
    EXPECT_FALSE(at::equal(later[2].second, dict[2].second));

    // Round trip into a model initialised from another seed.
    FSDP_ASSERT_OK_AND_ASSIGN(auto other_fsdp, WrapNetFromSeed(1, Borrow(group), c));
    FSDP_ASSERT_OK(LoadFullStateDict(*other_fsdp, dict));
    FSDP_ASSERT_OK_AND_ASSIGN(StateDict reloaded, FullStateDict(*other_fsdp));
    ExpectDictsEqual(reloaded, dict);
    ExpectForwardMatches(*other_fsdp, pair.reference);
  });
}

TEST_P(StateDictTest, Rank0OnlyFullStateDictIsEmptyOnOtherRanks) {
  const Case c = GetParam();
  RunInRanks(c.world_size, [c](comm::ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(NetPair pair, PairAfterOneStep(group, c));
    FSDP_ASSERT_OK_AND_ASSIGN(
        StateDict dict, FullStateDict(*pair.fsdp, {.offload_to_cpu = true, .rank0_only = true}));
    if (group.rank() == 0) {
      ExpectDictsNear(dict, TorchStateDict(*pair.reference));
    } else {
      EXPECT_TRUE(dict.empty());
    }
    // The gathers left the model as it was: training goes on in step with the
    // reference.
    TrainBoth(pair, 1);
    FSDP_ASSERT_OK_AND_ASSIGN(StateDict after, FullStateDict(*pair.fsdp));
    ExpectDictsNear(after, TorchStateDict(*pair.reference));
  });
}

TEST_P(StateDictTest, LoadFullStateDictIntoAnotherSeedThenForwardAndTrainingMatch) {
  const Case c = GetParam();
  RunInRanks(c.world_size, [c](comm::ProcessGroup& group) {
    Net reference = TrainedReference();
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp, WrapNetFromSeed(1, Borrow(group), c));
    FSDP_ASSERT_OK(LoadFullStateDict(*fsdp, TorchStateDict(*reference)));
    ExpectForwardMatches(*fsdp, reference);
    FSDP_ASSERT_OK_AND_ASSIGN(StateDict loaded, FullStateDict(*fsdp));
    ExpectDictsEqual(loaded, TorchStateDict(*reference));
    // Training continues from the loaded values (fresh optimizers on both
    // sides).
    torch::optim::SGD ref_sgd(reference->parameters(), torch::optim::SGDOptions(0.1));
    torch::optim::SGD sgd(fsdp->parameters(), torch::optim::SGDOptions(0.1));
    TrainStep(*reference, ref_sgd, 1);
    TrainStep(*fsdp, sgd, 1);
    FSDP_ASSERT_OK_AND_ASSIGN(StateDict trained, FullStateDict(*fsdp));
    ExpectDictsNear(trained, TorchStateDict(*reference));
  });
}

TEST_P(StateDictTest, Rank0OnlyLoadGivesEveryRankRankZerosValues) {
  const Case c = GetParam();
  RunInRanks(c.world_size, [c](comm::ProcessGroup& group) {
    Net reference = TrainedReference();
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp, WrapNetFromSeed(1, Borrow(group), c));
    const StateDict dict = group.rank() == 0 ? TorchStateDict(*reference) : StateDict{};
    FSDP_ASSERT_OK(LoadFullStateDict(*fsdp, dict, {.rank0_only = true}));
    ExpectForwardMatches(*fsdp, reference);
    FSDP_ASSERT_OK_AND_ASSIGN(StateDict loaded, FullStateDict(*fsdp));
    ExpectDictsEqual(loaded, TorchStateDict(*reference));
  });
}

TEST_P(StateDictTest, LoadsWhileUnitsAreGathered) {
  const Case c = GetParam();
  RunInRanks(c.world_size, [c](comm::ProcessGroup& group) {
    Net reference = NetFromSeed(0);
    Net stranger = NetFromSeed(2);
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp, WrapNetFromSeed(1, Borrow(group), c));
    // A forward whose backward never comes keeps the root (SHARD_GRAD_OP: every
    // unit) gathered; the next forward reuses the gathered parameters.
    at::Tensor pending = fsdp->forward(Batch(0));
    if (c.strategy != ShardingStrategy::kNoShard) {
      ASSERT_TRUE(fsdp->units()[0].handle->is_unsharded());
    }
    FSDP_ASSERT_OK(LoadFullStateDict(*fsdp, TorchStateDict(*reference)));
    ExpectForwardMatches(*fsdp, reference);
    FSDP_ASSERT_OK_AND_ASSIGN(ShardedDict sharded, ShardedStateDict(*fsdp));

    FSDP_ASSERT_OK(LoadFullStateDict(*fsdp, TorchStateDict(*stranger)));
    ExpectForwardMatches(*fsdp, stranger);
    if (c.strategy != ShardingStrategy::kNoShard) {
      ASSERT_TRUE(fsdp->units()[0].handle->is_unsharded());
    }
    FSDP_ASSERT_OK(LoadShardedStateDict(*fsdp, sharded));
    ExpectForwardMatches(*fsdp, reference);
    FSDP_ASSERT_OK_AND_ASSIGN(StateDict loaded, FullStateDict(*fsdp));
    ExpectDictsEqual(loaded, TorchStateDict(*reference));
  });
}

StateDict Without(StateDict dict, const std::vector<std::string>& keys) {
  StateDict out;
  for (auto& [key, value] : dict) {
    if (std::find(keys.begin(), keys.end(), key) == keys.end()) out.emplace_back(key, value);
  }
  return out;
}

StateDict Replaced(StateDict dict, const std::string& key, at::Tensor value) {
  for (auto& [k, v] : dict) {
    if (k == key) v = value;
  }
  return dict;
}

// The model's full and sharded dicts when made, and whether a refused load left them as they
// were.
class UnchangedCheck {
 public:
  static absl::StatusOr<UnchangedCheck> Of(FullyShardedDataParallel& fsdp) {
    UnchangedCheck check(fsdp);
    FSDP_ASSIGN_OR_RETURN(check.before_, FullStateDict(fsdp));
    FSDP_ASSIGN_OR_RETURN(check.sharded_before_, ShardedStateDict(fsdp));
    return check;
  }

  const ShardedDict& sharded_before() const { return sharded_before_; }

  void Expect(const std::string& what) const {
    SCOPED_TRACE(what);
    FSDP_ASSERT_OK_AND_ASSIGN(StateDict after, FullStateDict(*fsdp_));
    ExpectDictsEqual(after, before_);
    FSDP_ASSERT_OK_AND_ASSIGN(ShardedDict sharded_after, ShardedStateDict(*fsdp_));
    ASSERT_EQ(sharded_after.size(), sharded_before_.size());
    for (size_t i = 0; i < sharded_after.size(); ++i) {
      const auto* a = std::get_if<LocalShard>(&sharded_after[i].second);
      const auto* b = std::get_if<LocalShard>(&sharded_before_[i].second);
      ASSERT_EQ(a == nullptr, b == nullptr);
      if (a != nullptr) {
        EXPECT_TRUE(at::equal(a->data, b->data)) << sharded_after[i].first;
      }
    }
  }

 private:
  explicit UnchangedCheck(FullyShardedDataParallel& fsdp) : fsdp_(&fsdp) {}

  FullyShardedDataParallel* fsdp_;
  StateDict before_;
  ShardedDict sharded_before_;
};

// torch's load_state_dict texts for the bad dicts below, as LoadFullStateDict writes them.
struct LoadErrorTexts {
  std::string where;   // "LoadFullStateDict (rank r of n, group default): "
  std::string header;  // "Error(s) in loading state_dict for NetImpl:\n\t"
  std::string missing;
  std::string unexpected;
  std::string size_managed;
  std::string size_unmanaged;
  std::string dtype;
};

LoadErrorTexts ExpectedLoadErrorTexts(const comm::ProcessGroup& group) {
  return {
      .where = absl::StrCat("LoadFullStateDict (rank ", group.rank(), " of ", group.size(),
                            ", group default): "),
      .header = "Error(s) in loading state_dict for NetImpl:\n\t",
      .missing = "Missing key(s) in state_dict: \"l0.bias\", \"inner.b.weight\". ",
      .unexpected = "Unexpected key(s) in state_dict: \"l0.extra\", \"ghost\". ",
      .size_managed =
          "size mismatch for inner.a.weight: copying a param with shape "
          "torch.Size([6, 7]) from "
          "checkpoint, the shape in current model is torch.Size([7, 6]).",
      .size_unmanaged =
          "size mismatch for extra.bias: copying a param with shape "
          "torch.Size([4]) from "
          "checkpoint, the shape in current model is torch.Size([3]).",
      .dtype =
          "dtype mismatch for head.bias: copying a param with dtype "
          "torch.float64 from "
          "checkpoint, the dtype in current model is torch.float32.",
  };
}

StateDict WithoutTwoKeys(const StateDict& dict) {
  return Without(dict, {"inner.b.weight", "l0.bias"});
}

// `good` with two keys more: one among the model's, one at the end.
StateDict WithUnexpectedKeys(const StateDict& good) {
  StateDict extra = good;
  extra.emplace(extra.begin() + 3, "l0.extra", torch::zeros({2}));
  extra.emplace_back("ghost", torch::zeros({1}));
  return extra;
}

// Each kind of bad dict alone, then all at once (torch's order: missing, unexpected, then per
// key in model order); each refused on every rank with nothing loaded.
void ExpectEachBadDictRefused(FullyShardedDataParallel& fsdp, const StateDict& good,
                              const LoadErrorTexts& texts, const UnchangedCheck& unchanged) {
  const std::string prefix = texts.where + texts.header;
  EXPECT_THAT(LoadFullStateDict(fsdp, WithoutTwoKeys(good)),
              StatusIs(absl::StatusCode::kInvalidArgument, prefix + texts.missing));
  unchanged.Expect("missing");

  const StateDict extra = WithUnexpectedKeys(good);
  EXPECT_THAT(LoadFullStateDict(fsdp, extra),
              StatusIs(absl::StatusCode::kInvalidArgument, prefix + texts.unexpected));
  unchanged.Expect("unexpected");

  EXPECT_THAT(LoadFullStateDict(fsdp, Replaced(good, "inner.a.weight", torch::zeros({6, 7}))),
              StatusIs(absl::StatusCode::kInvalidArgument, prefix + texts.size_managed));
  unchanged.Expect("size, managed");
  EXPECT_THAT(LoadFullStateDict(fsdp, Replaced(good, "extra.bias", torch::zeros({4}))),
              StatusIs(absl::StatusCode::kInvalidArgument, prefix + texts.size_unmanaged));
  unchanged.Expect("size, unmanaged");
  EXPECT_THAT(
      LoadFullStateDict(fsdp, Replaced(good, "head.bias", torch::zeros({3}, torch::kFloat64))),
      StatusIs(absl::StatusCode::kInvalidArgument, prefix + texts.dtype));
  unchanged.Expect("dtype");

  StateDict all = WithoutTwoKeys(extra);
  all = Replaced(all, "inner.a.weight", torch::zeros({6, 7}));
  all = Replaced(all, "extra.bias", torch::zeros({4}));
  EXPECT_THAT(LoadFullStateDict(fsdp, all),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       prefix + texts.missing + "\n\t" + texts.unexpected + "\n\t" +
                           texts.size_managed + "\n\t" + texts.size_unmanaged));
  unchanged.Expect("all");
}

// Bad input on some ranks only: rank 0's with rank0_only, rank 1's, and a dict on every rank
// with rank0_only; nobody loads.
void ExpectOneRanksBadInputRefusedEverywhere(FullyShardedDataParallel& fsdp,
                                             const comm::ProcessGroup& group, const StateDict& good,
                                             const LoadErrorTexts& texts,
                                             const UnchangedCheck& unchanged) {
  EXPECT_THAT(
      LoadFullStateDict(fsdp, group.rank() == 0 ? WithoutTwoKeys(good) : StateDict{},
                        {.rank0_only = true}),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(texts.header + texts.missing)));
  unchanged.Expect("rank0_only");
  if (group.size() == 1) return;
  const absl::Status status =
      LoadFullStateDict(fsdp, group.rank() == 1 ? WithoutTwoKeys(good) : good);
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(texts.missing)));
  if (group.rank() != 1) {
    EXPECT_THAT(status.message(), HasSubstr("nothing loaded because rank 1 refused"));
  }
  unchanged.Expect("one rank");
  EXPECT_THAT(LoadFullStateDict(fsdp, good, {.rank0_only = true}),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("ranks other than 0 pass an empty state dict")));
  unchanged.Expect("rank0_only, dict on every rank");
}

// The sharded load checks keys the same way.
void ExpectShardedLoadRefusesMissingKeys(FullyShardedDataParallel& fsdp,
                                         const LoadErrorTexts& texts,
                                         const UnchangedCheck& unchanged) {
  ShardedDict sharded_missing;
  for (const auto& [key, value] : unchanged.sharded_before()) {
    if (key != "l0.bias" && key != "inner.b.weight") sharded_missing.emplace_back(key, value);
  }
  EXPECT_THAT(
      LoadShardedStateDict(fsdp, sharded_missing),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(texts.header + texts.missing)));
  unchanged.Expect("sharded, missing");
}

TEST_P(StateDictTest, LoadRefusesBadDictsWithTorchsTextsAndLeavesTheModelUnchanged) {
  const Case c = GetParam();
  RunInRanks(c.world_size, [c](comm::ProcessGroup& group) {
    Net reference = NetFromSeed(0);
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp, WrapNetFromSeed(1, Borrow(group), c));
    torch::optim::Adam optim(fsdp->parameters(), torch::optim::AdamOptions(0.01));
    TrainStep(*fsdp, optim, 0);
    FSDP_ASSERT_OK_AND_ASSIGN(const UnchangedCheck unchanged, UnchangedCheck::Of(*fsdp));
    const StateDict good = TorchStateDict(*reference);
    const LoadErrorTexts texts = ExpectedLoadErrorTexts(group);

    ExpectEachBadDictRefused(*fsdp, good, texts, unchanged);
    ExpectOneRanksBadInputRefusedEverywhere(*fsdp, group, good, texts, unchanged);
    ExpectShardedLoadRefusesMissingKeys(*fsdp, texts, unchanged);
    // A good load still works afterwards.
    FSDP_ASSERT_OK(LoadFullStateDict(*fsdp, good));
    ExpectForwardMatches(*fsdp, reference);
  });
}

TEST_P(StateDictTest, ShardedStateDictHoldsSlicesOfTheFlattenedParametersAndRoundTrips) {
  const Case c = GetParam();
  RunInRanks(c.world_size, [c](comm::ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(NetPair pair, PairAfterOneStep(group, c));
    FSDP_ASSERT_OK_AND_ASSIGN(ShardedDict sharded, ShardedStateDict(*pair.fsdp));
    const StateDict expected = TorchStateDict(*pair.reference);
    ASSERT_EQ(sharded.size(), expected.size());
    const bool sharded_strategy = c.strategy != ShardingStrategy::kNoShard;
    for (size_t i = 0; i < sharded.size(); ++i) {
      const auto& [key, value] = sharded[i];
      SCOPED_TRACE(key);
      ASSERT_EQ(key, expected[i].first);
      const at::Tensor& full = expected[i].second;
      const bool managed = key != "shift" && key.rfind("extra.", 0) != 0;
      ASSERT_EQ(std::holds_alternative<LocalShard>(value), managed);
      if (!managed) {
        EXPECT_TRUE(at::allclose(std::get<at::Tensor>(value), full, 1e-5, 1e-6));
        continue;
      }
      const LocalShard& shard = std::get<LocalShard>(value);
      EXPECT_EQ(shard.global_shape, full.sizes().vec());
      EXPECT_EQ(shard.global_numel(), full.numel());
      EXPECT_EQ(shard.world_size, sharded_strategy ? group.size() : 1);
      EXPECT_EQ(shard.rank, sharded_strategy ? group.rank() : 0);
      ASSERT_EQ(shard.data.dim(), 1);
      ASSERT_EQ(shard.data.numel(), shard.numel);
      EXPECT_TRUE(at::allclose(
          shard.data, full.reshape({-1}).narrow(0, shard.flat_offset, shard.numel), 1e-5, 1e-6));
      EXPECT_LE(shard.offset_in_flat_param + full.numel(), shard.flat_param_numel);
      // The ranks' slices tile the parameter.
      at::Tensor covered = torch::zeros({full.numel()});
      covered.narrow(0, shard.flat_offset, shard.numel).fill_(1);
      FSDP_ASSERT_OK(group.AllReduce(covered));
      EXPECT_TRUE(
          at::equal(covered, torch::full({full.numel()}, sharded_strategy ? 1.0 : group.size())));
    }
    EXPECT_EQ(std::get<LocalShard>(sharded[0].second).unit_prefix, "");
    EXPECT_EQ(std::get<LocalShard>(sharded[6].second).unit_prefix, "inner.b.");

    // Round trip into a model of another seed.
    FSDP_ASSERT_OK_AND_ASSIGN(auto other_fsdp, WrapNetFromSeed(1, Borrow(group), c));
    FSDP_ASSERT_OK(LoadShardedStateDict(*other_fsdp, sharded));
    ExpectForwardMatches(*other_fsdp, pair.reference);
    FSDP_ASSERT_OK_AND_ASSIGN(StateDict loaded, FullStateDict(*other_fsdp));
    ExpectDictsNear(loaded, expected);
  });
}

// Needs a second world size to compare with, so it runs at world sizes 2 to 4 only.
class StateDictMultiRankTest : public StateDictTest {};

TEST_P(StateDictMultiRankTest, ShardedLoadRefusesAnotherWorldSizeOrWrapping) {
  const Case c = GetParam();
  RunInRanks(c.world_size, [c](comm::ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp, WrapNetFromSeed(0, Borrow(group), c));
    // The same model alone on each rank (a group of one).
    std::shared_ptr<comm::ProcessGroup> alone;
    for (int r = 0; r < group.size(); ++r) {
      FSDP_ASSERT_OK_AND_ASSIGN(auto sub, group.NewSubgroup({r}));
      if (r == group.rank()) alone = sub;
    }
    FSDP_ASSERT_OK_AND_ASSIGN(auto single_fsdp, WrapNetFromSeed(1, alone, c));
    // Another wrapping at this world size: inner.b stays in inner's unit.
    FSDP_ASSERT_OK_AND_ASSIGN(auto coarse_fsdp,
                              WrapNet(NetFromSeed(2), Borrow(group), c, /*nest_inner_b=*/false));

    FSDP_ASSERT_OK_AND_ASSIGN(const StateDict before, FullStateDict(*fsdp));
    FSDP_ASSERT_OK_AND_ASSIGN(const StateDict single_before, FullStateDict(*single_fsdp));
    FSDP_ASSERT_OK_AND_ASSIGN(ShardedDict mine, ShardedStateDict(*fsdp));
    FSDP_ASSERT_OK_AND_ASSIGN(ShardedDict single_dict, ShardedStateDict(*single_fsdp));
    FSDP_ASSERT_OK_AND_ASSIGN(ShardedDict coarse_dict, ShardedStateDict(*coarse_fsdp));

    if (c.strategy == ShardingStrategy::kNoShard) {
      // Every NO_SHARD rank holds whole parameters: any world size and wrapping
      // fits.
      FSDP_EXPECT_OK(LoadShardedStateDict(*fsdp, single_dict));
      FSDP_EXPECT_OK(LoadShardedStateDict(*fsdp, coarse_dict));
      FSDP_EXPECT_OK(LoadShardedStateDict(*single_fsdp, mine));
      return;
    }
    const LocalShard& l0_weight = std::get<LocalShard>(mine[2].second);
    ASSERT_EQ(mine[2].first, "l0.weight");
    EXPECT_THAT(
        LoadShardedStateDict(*single_fsdp, mine),
        StatusIs(absl::StatusCode::kInvalidArgument,
                 AllOf(HasSubstr("LoadShardedStateDict (rank 0 of 1, group "),
                       HasSubstr(absl::StrCat("layout mismatch for l0.weight: the checkpoint "
                                              "holds shard ",
                                              group.rank(), " of ", group.size(), ", elements [",
                                              l0_weight.flat_offset, ", ",
                                              l0_weight.flat_offset + l0_weight.numel,
                                              ") of the flattened parameter; this model's shard 0 "
                                              "of 1 holds "
                                              "[0, 24)")),
                       HasSubstr("same world size and wrapping"))));
    FSDP_ASSERT_OK_AND_ASSIGN(StateDict single_after, FullStateDict(*single_fsdp));
    ExpectDictsEqual(single_after, single_before);

    EXPECT_THAT(LoadShardedStateDict(*fsdp, single_dict),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         HasSubstr("layout mismatch for scale: the checkpoint holds shard 0 of "
                                   "1, elements [0, 3)")));
    EXPECT_THAT(
        LoadShardedStateDict(*fsdp, coarse_dict),
        StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layout mismatch for inner.a.")));
    FSDP_ASSERT_OK_AND_ASSIGN(StateDict after, FullStateDict(*fsdp));
    ExpectDictsEqual(after, before);

    // A full tensor where a shard is expected.
    ShardedDict full_for_shard = mine;
    full_for_shard[2].second = torch::zeros({6, 4});
    EXPECT_THAT(LoadShardedStateDict(*fsdp, full_for_shard),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         HasSubstr("l0.weight: expected a LocalShard (FSDP unit 'l0.' shards "
                                   "this parameter), got a full tensor.")));
  });
}

// The cases at world sizes 2 to 4.
const std::vector<Case> kMultiRankCases = {
    Case{2, ShardingStrategy::kFullShard, false}, Case{2, ShardingStrategy::kFullShard, true},
    Case{2, ShardingStrategy::kNoShard, false},   Case{3, ShardingStrategy::kShardGradOp, false},
    Case{3, ShardingStrategy::kFullShard, true},  Case{3, ShardingStrategy::kNoShard, true},
    Case{4, ShardingStrategy::kFullShard, false}, Case{4, ShardingStrategy::kShardGradOp, true}};

// Two at world size 1, then kMultiRankCases.
std::vector<Case> AllCases() {
  std::vector<Case> cases = {Case{1, ShardingStrategy::kFullShard, false},
                             Case{1, ShardingStrategy::kNoShard, true}};
  cases.insert(cases.end(), kMultiRankCases.begin(), kMultiRankCases.end());
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Strategies, StateDictTest, ::testing::ValuesIn(AllCases()),
                         ::fsdp::testing::StrategyCaseName);

INSTANTIATE_TEST_SUITE_P(Strategies, StateDictMultiRankTest, ::testing::ValuesIn(kMultiRankCases),
                         ::fsdp::testing::StrategyCaseName);

// One tensor registered under two names in two modules (weight tying).
struct ProjImpl : torch::nn::Module {
  explicit ProjImpl(at::Tensor shared = {}) {
    weight = register_parameter("weight", shared.defined() ? shared : torch::randn({4, 4}));
  }
  torch::Tensor forward(torch::Tensor x) { return x.matmul(weight.t()); }
  torch::Tensor weight;
};
TORCH_MODULE(Proj);

struct TiedImpl : torch::nn::Module {
  TiedImpl() : enc(register_module("enc", Proj())), dec(register_module("dec", Proj(enc->weight))) {
    bias = register_parameter("bias", torch::randn({4}));
  }
  torch::Tensor forward(torch::Tensor x) {
    return dec->forward(torch::tanh(enc->forward(x))) + bias;
  }
  Proj enc;
  Proj dec;
  torch::Tensor bias;
};
TORCH_MODULE(Tied);

TEST(StateDict, SharedParameterAppearsUnderEachNameAndLoadsFromItsLastName) {
  RunInRanks(2, [](comm::ProcessGroup& group) {
    torch::manual_seed(0);
    Tied tied;
    ASSERT_TRUE(tied->enc->weight.is_same(tied->dec->weight));
    const at::Tensor original = tied->enc->weight.detach().clone();
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp, FullyShardedDataParallel::Wrap(tied, Borrow(group)));
    FSDP_ASSERT_OK_AND_ASSIGN(StateDict dict, FullStateDict(*fsdp));
    EXPECT_THAT(Keys(dict), ElementsAre("bias", "enc.weight", "dec.weight"));
    EXPECT_TRUE(at::equal(dict[1].second, original));
    EXPECT_TRUE(at::equal(dict[2].second, original));
    FSDP_ASSERT_OK_AND_ASSIGN(ShardedDict sharded, ShardedStateDict(*fsdp));
    ASSERT_EQ(sharded.size(), 3u);
    EXPECT_EQ(sharded[1].first, "enc.weight");
    EXPECT_EQ(sharded[2].first, "dec.weight");

    // Different values under the two names: the last in state_dict order wins,
    // as in torch.
    dict[1].second = torch::zeros({4, 4});
    dict[2].second = torch::ones({4, 4});
    FSDP_ASSERT_OK(LoadFullStateDict(*fsdp, dict));
    FSDP_ASSERT_OK_AND_ASSIGN(StateDict loaded, FullStateDict(*fsdp));
    EXPECT_TRUE(at::equal(loaded[1].second, torch::ones({4, 4})));
    EXPECT_TRUE(at::equal(loaded[2].second, torch::ones({4, 4})));
    // Missing one of the names is a missing key, as in torch.
    EXPECT_THAT(LoadFullStateDict(*fsdp, Without(dict, {"dec.weight"})),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         HasSubstr("Missing key(s) in state_dict: \"dec.weight\". ")));
  });
}

}  // namespace
}  // namespace fsdp
