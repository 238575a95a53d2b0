// FSDP's prefetching (backward_prefetch, forward_prefetch, limit_all_gathers): training with
// each option is bit for bit training without (losses, gradients, parameters), and the
// gathers are issued ahead in the order FSDP1's rules give, by the hooks they name.
#include <torch/torch.h>

#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/multiprocess_testutil.h"
#include "fsdp/fsdp_testutil.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "fsdp/state_dict.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fsdp {
namespace {

using ::fsdp::testing::Borrow;
using ::fsdp::testing::RunInRanks;
using ::fsdp::testing::Seeded;
using Case = ::fsdp::testing::StrategyCase;
using Kind = PrefetchEvent::Kind;

// Four layers, each its own unit, and a head in the root unit: units() order is root (0),
// l0 (1) ... l3 (4); forward runs l0 .. l3, then the head.
struct StackImpl : torch::nn::Module {
  StackImpl()
      : l0(register_module("l0", torch::nn::Linear(16, 24))),
        l1(register_module("l1", torch::nn::Linear(24, 24))),
        l2(register_module("l2", torch::nn::Linear(24, 24))),
        l3(register_module("l3", torch::nn::Linear(24, 16))),
        head(register_module("head", torch::nn::Linear(16, 5))) {}
  torch::Tensor forward(torch::Tensor x) {
    x = torch::tanh(l0.forward(x));
    x = torch::tanh(l1.forward(x));
    x = torch::tanh(l2.forward(x));
    return head(torch::tanh(l3.forward(x)));
  }
  ModuleSlot l0, l1, l2, l3;
  torch::nn::Linear head;
};
TORCH_MODULE(Stack);

struct Prefetching {
  std::string name;
  BackwardPrefetch backward;
  bool forward;
  bool limit;
};

const std::vector<Prefetching>& AllPrefetching() {
  static const auto* all = new std::vector<Prefetching>{
      {"none", BackwardPrefetch::kNone, false, true},
      {"backward_pre", BackwardPrefetch::kBackwardPre, false, true},
      {"backward_post", BackwardPrefetch::kBackwardPost, false, true},
      {"backward_pre_forward", BackwardPrefetch::kBackwardPre, true, true},
      {"backward_post_forward_unlimited", BackwardPrefetch::kBackwardPost, true, false},
  };
  return *all;
}

struct Trained {
  std::vector<double> losses;
  std::vector<at::Tensor> grads;  // every step's, of the optimizer's tensors, in order
  std::map<std::string, at::Tensor> params;
  PrefetchStats stats;
};

absl::StatusOr<std::unique_ptr<FullyShardedDataParallel>> WrapStack(Stack stack,
                                                                    comm::ProcessGroup& group,
                                                                    const Case& c,
                                                                    const Prefetching& p,
                                                                    const MixedPrecision& mp = {}) {
  FsdpOptions options{.sharding_strategy = c.strategy,
                      .use_orig_params = c.use_orig_params,
                      .nested = {&stack->l0, &stack->l1, &stack->l2, &stack->l3},
                      .mixed_precision = mp};
  options.backward_prefetch = p.backward;
  options.forward_prefetch = p.forward;
  options.limit_all_gathers = p.limit;
  return FullyShardedDataParallel::Wrap(stack, Borrow(group), std::move(options));
}

Trained Train(comm::ProcessGroup& group, const Case& c, const Prefetching& p,
              const MixedPrecision& mp = {}) {
  Trained out;
  auto fsdp = WrapStack(Seeded<Stack>(0), group, c, p, mp);
  EXPECT_TRUE(fsdp.ok()) << fsdp.status();
  if (!fsdp.ok()) return out;
  torch::optim::Adam optim((*fsdp)->parameters(), torch::optim::AdamOptions(0.01));
  for (int step = 0; step < 3; ++step) {
    optim.zero_grad();
    torch::manual_seed(100 + step);
    at::Tensor loss = (*fsdp)->forward(torch::randn({8, 16})).pow(2).sum();
    loss.backward();
    out.losses.push_back(loss.item<double>());
    for (const at::Tensor& t : (*fsdp)->parameters()) {
      out.grads.push_back(t.grad().defined() ? t.grad().clone() : at::Tensor());
    }
    optim.step();
  }
  auto state = FullStateDict(**fsdp);
  EXPECT_TRUE(state.ok()) << state.status();
  if (state.ok()) out.params = std::map<std::string, at::Tensor>(state->begin(), state->end());
  out.stats = (*fsdp)->prefetch_stats();
  return out;
}

void ExpectBitEqual(const Trained& got, const Trained& want, const std::string& what) {
  ASSERT_EQ(got.losses.size(), want.losses.size()) << what;
  for (size_t i = 0; i < got.losses.size(); ++i) {
    EXPECT_EQ(got.losses[i], want.losses[i]) << what << " step " << i;
  }
  ASSERT_EQ(got.grads.size(), want.grads.size()) << what;
  for (size_t i = 0; i < got.grads.size(); ++i) {
    ASSERT_EQ(got.grads[i].defined(), want.grads[i].defined()) << what << " grad " << i;
    if (got.grads[i].defined()) {
      EXPECT_TRUE(at::equal(got.grads[i], want.grads[i])) << what;
    }
  }
  ASSERT_EQ(got.params.size(), want.params.size()) << what;
  for (const auto& [name, value] : want.params) {
    EXPECT_TRUE(at::equal(got.params.at(name), value)) << what << " " << name;
  }
}

class PrefetchParityTest : public ::testing::TestWithParam<Case> {};

TEST_P(PrefetchParityTest, EveryOptionTrainsBitForBitAsNoPrefetch) {
  const Case c = GetParam();
  RunInRanks(c.world_size, [c](comm::ProcessGroup& group) {
    const Trained reference = Train(group, c, AllPrefetching()[0]);
    for (size_t i = 1; i < AllPrefetching().size(); ++i) {
      const Prefetching& p = AllPrefetching()[i];
      const Trained got = Train(group, c, p);
      ExpectBitEqual(got, reference, p.name);
      // FULL_SHARD frees after forward, so backward gathers every layer again; SHARD_GRAD_OP
      // keeps them, and only forward prefetching (of the next step's forward) gathers ahead;
      // NO_SHARD has nothing to gather.
      if (c.strategy == ShardingStrategy::kNoShard) {
        EXPECT_EQ(got.stats.gathers_issued_ahead, 0) << p.name;
      } else if (c.strategy == ShardingStrategy::kFullShard || p.forward) {
        EXPECT_GT(got.stats.gathers_issued_ahead, 0) << p.name;
      } else {
        EXPECT_EQ(got.stats.gathers_issued_ahead, 0) << p.name;
      }
      EXPECT_LE(got.stats.max_in_flight, 2) << p.name;
    }
    EXPECT_EQ(reference.stats.gathers_issued_ahead, 0);
  });
}

INSTANTIATE_TEST_SUITE_P(Strategies, PrefetchParityTest,
                         ::testing::Values(Case{2, ShardingStrategy::kFullShard, false},
                                           Case{2, ShardingStrategy::kFullShard, true},
                                           Case{2, ShardingStrategy::kShardGradOp, false},
                                           Case{2, ShardingStrategy::kShardGradOp, true},
                                           Case{3, ShardingStrategy::kFullShard, false},
                                           Case{3, ShardingStrategy::kFullShard, true},
                                           Case{3, ShardingStrategy::kShardGradOp, false},
                                           Case{3, ShardingStrategy::kShardGradOp, true},
                                           Case{2, ShardingStrategy::kNoShard, false}),
                         ::fsdp::testing::StrategyCaseName);

TEST(PrefetchMixedPrecision, Bf16TrainsBitForBitAsNoPrefetch) {
  RunInRanks(2, [](comm::ProcessGroup& group) {
    const Case c{2, ShardingStrategy::kFullShard, false};
    MixedPrecision mp;
    mp.param_dtype = at::kBFloat16;
    const Trained reference = Train(group, c, AllPrefetching()[0], mp);
    for (size_t i = 1; i < AllPrefetching().size(); ++i) {
      const Trained got = Train(group, c, AllPrefetching()[i], mp);
      ExpectBitEqual(got, reference, AllPrefetching()[i].name);
      EXPECT_GT(got.stats.gathers_issued_ahead, 0) << AllPrefetching()[i].name;
    }
  });
}

// Position of the first event equal to (kind, unit, by_unit) at or after `from`; -1 if none.
int Find(const std::vector<PrefetchEvent>& events, Kind kind, int unit, int by = -1, int from = 0) {
  for (int i = from; i < static_cast<int>(events.size()); ++i) {
    if (events[i].kind == kind && events[i].unit == unit && events[i].by_unit == by) return i;
  }
  return -1;
}

// One step (forward + backward) of the stack, with the events of the second one recorded
// (the first records the execution order).
std::vector<PrefetchEvent> SecondStepEvents(comm::ProcessGroup& group, const Prefetching& p) {
  auto fsdp = WrapStack(Seeded<Stack>(0), group, {2, ShardingStrategy::kFullShard, false}, p);
  EXPECT_TRUE(fsdp.ok()) << fsdp.status();
  if (!fsdp.ok()) return {};
  for (int step = 0; step < 2; ++step) {
    (*fsdp)->RecordPrefetchEvents(step == 1);
    (*fsdp)->forward(torch::randn({8, 16})).pow(2).sum().backward();
  }
  return (*fsdp)->prefetch_stats().events;
}

// Units: root 0 (last in post-forward order), layers l0..l3 = 1..4.
TEST(PrefetchOrder, BackwardPreIssuesThePreviousUnitBeforeTheGradients) {
  RunInRanks(2, [](comm::ProcessGroup& group) {
    const auto events = SecondStepEvents(group, AllPrefetching()[1]);
    // The root's pre-backward issues l3's gather, after its own.
    const int root_pre = Find(events, Kind::kPreBackward, 0);
    ASSERT_GE(root_pre, 0);
    EXPECT_GT(Find(events, Kind::kPrefetch, 4, 0, root_pre), root_pre);
    for (int k = 4; k >= 2; --k) {
      const int pre = Find(events, Kind::kPreBackward, k);
      const int prefetch = Find(events, Kind::kPrefetch, k - 1, k);
      const int post = Find(events, Kind::kPostBackward, k);
      ASSERT_GE(pre, 0) << k;
      // After the unit's own gather, before its gradient computation ends, before the next
      // unit's pre-backward waits for it.
      EXPECT_LT(pre, prefetch) << k;
      EXPECT_LT(prefetch, post) << k;
      EXPECT_LT(prefetch, Find(events, Kind::kPreBackward, k - 1)) << k;
    }
    EXPECT_EQ(Find(events, Kind::kPrefetch, 0, 1), -1);  // l0 is the last: nothing before it
    // No gather is issued ahead in forward without forward_prefetch.
    const int first_pre_backward = root_pre;
    for (int i = 0; i < first_pre_backward; ++i) EXPECT_NE(events[i].kind, Kind::kPrefetch);
  });
}

TEST(PrefetchOrder, BackwardPostIssuesThePreviousUnitOnceGradientsAreThere) {
  RunInRanks(2, [](comm::ProcessGroup& group) {
    const auto events = SecondStepEvents(group, AllPrefetching()[2]);
    for (int k = 4; k >= 2; --k) {
      const int post = Find(events, Kind::kPostBackward, k);
      const int prefetch = Find(events, Kind::kPrefetch, k - 1, k);
      ASSERT_GE(post, 0) << k;
      EXPECT_EQ(prefetch, post + 1) << k;
      EXPECT_LT(prefetch, Find(events, Kind::kPreBackward, k - 1)) << k;
    }
    // None is issued from a pre-backward hook.
    for (size_t i = 0; i + 1 < events.size(); ++i) {
      if (events[i].kind == Kind::kPreBackward) {
        EXPECT_NE(events[i + 1].kind, Kind::kPrefetch);
      }
    }
  });
}

TEST(PrefetchOrder, ForwardPrefetchIssuesTheNextUnitInForwardOrder) {
  RunInRanks(2, [](comm::ProcessGroup& group) {
    const auto events = SecondStepEvents(group, AllPrefetching()[3]);
    // Pre-forward order: root, l0, l1, l2, l3.
    for (int k = 0; k <= 3; ++k) {
      const int pre = Find(events, Kind::kPreForward, k);
      const int prefetch = Find(events, Kind::kPrefetch, k + 1, k);
      ASSERT_GE(pre, 0) << k;
      EXPECT_EQ(prefetch, pre + 1) << k;
      EXPECT_LT(prefetch, Find(events, Kind::kPreForward, k + 1)) << k;
    }
  });
}

TEST(PrefetchOrder, NoPrefetchIssuesNothingAhead) {
  RunInRanks(2, [](comm::ProcessGroup& group) {
    const auto events = SecondStepEvents(group, AllPrefetching()[0]);
    EXPECT_FALSE(events.empty());
    for (const PrefetchEvent& e : events) EXPECT_NE(e.kind, Kind::kPrefetch);
  });
}

// The handle itself: a prefetched gather is Unshard()'s, and Reshard() with one pending waits
// for it and frees the buffer; a handle destroyed with one pending waits too.
TEST(FlatParamPrefetch, UnshardTakesThePrefetchAndReshardCancelsIt) {
  RunInRanks(2, [](comm::ProcessGroup& group) {
    auto make = [&] {
      torch::manual_seed(3);
      std::vector<FlatParamEntry> entries = {{{"w"}, torch::randn({5, 7})},
                                             {{"b"}, torch::randn({7})}};
      return FlatParamHandle::Create(std::move(entries), Borrow(group),
                                     ShardingStrategy::kFullShard, false);
    };
    FSDP_ASSERT_OK_AND_ASSIGN(auto blocking, make());
    FSDP_ASSERT_OK_AND_ASSIGN(auto prefetched, make());
    FSDP_ASSERT_OK(blocking->Unshard());
    FSDP_ASSERT_OK(prefetched->Prefetch());
    EXPECT_TRUE(prefetched->has_pending_gather());
    EXPECT_FALSE(prefetched->is_unsharded());
    FSDP_ASSERT_OK(prefetched->Unshard());
    EXPECT_FALSE(prefetched->has_pending_gather());
    for (size_t i = 0; i < 2; ++i) {
      EXPECT_TRUE(at::equal(prefetched->params()[i], blocking->params()[i]));
    }
    prefetched->Reshard();
    FSDP_ASSERT_OK(prefetched->Prefetch());
    prefetched->Reshard();  // cancelled: awaited and freed
    EXPECT_FALSE(prefetched->has_pending_gather());
    EXPECT_EQ(prefetched->full_buffer_bytes(), 0);
    FSDP_ASSERT_OK(prefetched->Unshard());  // a fresh gather works after it
    EXPECT_TRUE(at::equal(prefetched->params()[0], blocking->params()[0]));
    FSDP_ASSERT_OK(prefetched->Prefetch());  // already unsharded: nothing issued
    EXPECT_FALSE(prefetched->has_pending_gather());
    prefetched->Reshard();
    FSDP_ASSERT_OK(prefetched->Prefetch());
    prefetched.reset();  // destroyed with a gather pending
    blocking->Reshard();
    FSDP_ASSERT_OK(blocking->Unshard());  // the group still pairs its gathers
  });
}

}  // namespace
}  // namespace fsdp
