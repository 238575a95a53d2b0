// FSDP against the same model trained unwrapped in one process: losses, gradients, final
// parameters, and the memory each strategy holds, at world sizes 1 to 4.
#include "fsdp/fully_sharded_data_parallel.h"

#include <torch/torch.h>

#include <map>

#include "comm/multiprocess_testutil.h"
#include "fsdp/fsdp_testutil.h"
#include "fsdp/state_dict.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fsdp {
namespace {

using ::fsdp::testing::Batch;
using ::fsdp::testing::Borrow;
using ::fsdp::testing::MakeNetPair;
using ::fsdp::testing::Net;
using ::fsdp::testing::NetPair;
using ::fsdp::testing::RunInRanks;
using ::fsdp::testing::Seeded;
using ::fsdp::testing::StatusIs;
using ::fsdp::testing::StepLosses;
using ::fsdp::testing::TrainBoth;
using ::fsdp::testing::WrapNet;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Case = ::fsdp::testing::StrategyCase;

std::map<std::string, at::Tensor> Named(torch::nn::Module& module) {
  std::map<std::string, at::Tensor> out;
  for (const auto& p : module.named_parameters()) out[p.key()] = p.value();
  return out;
}

// FSDP's full state dict holds the reference's parameters (names in PyTorch's order).
void ExpectSameParameters(FullyShardedDataParallel& fsdp, torch::nn::Module& reference) {
  FSDP_ASSERT_OK_AND_ASSIGN(auto state, fsdp::FullStateDict(fsdp));
  const auto expected = Named(reference);
  std::vector<std::string> names;
  for (const auto& [name, value] : state) {
    names.push_back(name);
    ASSERT_TRUE(expected.count(name)) << name;
    EXPECT_TRUE(at::allclose(value, expected.at(name), 1e-5, 1e-6)) << name;
  }
  EXPECT_THAT(names, ElementsAre("scale", "l0.weight", "l0.bias", "inner.a.weight", "inner.a.bias",
                                 "inner.b.weight", "inner.b.bias", "head.weight", "head.bias"));
}

class FsdpParityTest : public ::testing::TestWithParam<Case> {};

TEST_P(FsdpParityTest, LossesAndParametersMatchUnwrappedTraining) {
  const Case c = GetParam();
  RunInRanks(c.world_size, [c](comm::ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(NetPair pair, MakeNetPair(group, c));
    for (int step = 0; step < 4; ++step) {
      const StepLosses losses = TrainBoth(pair, step);
      EXPECT_NEAR(losses.fsdp, losses.reference, 1e-5 * std::abs(losses.reference))
          << "step " << step;
    }
    ExpectSameParameters(*pair.fsdp, *pair.reference);
  });
}

// PyTorch's gradient accumulation with no_sync(): per step, three micro-batches under a
// NoSyncGuard (no reduction; the parameters hold no gradient yet) and a fourth outside it,
// against the unwrapped model accumulating the same four.
TEST_P(FsdpParityTest, NoSyncAccumulatesMicroBatchesAsTheUnwrappedModel) {
  const Case c = GetParam();
  RunInRanks(c.world_size, [c](comm::ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(NetPair pair, MakeNetPair(group, c));
    FullyShardedDataParallel* fsdp = pair.fsdp.get();
    constexpr int kMicroBatches = 4;
    for (int step = 0; step < 3; ++step) {
      pair.reference_optim->zero_grad();
      pair.optim->zero_grad();
      for (int m = 0; m < kMicroBatches; ++m) {
        at::Tensor x = Batch(kMicroBatches * step + m);
        pair.reference->forward(x).pow(2).sum().backward();
        if (m < kMicroBatches - 1) {
          NoSyncGuard no_sync(*fsdp);
          fsdp->forward(x).pow(2).sum().backward();
          if (c.use_orig_params) {
            for (const at::Tensor& p : fsdp->parameters()) {
              EXPECT_FALSE(p.grad().defined()) << "a gradient before the reducing backward";
            }
          }
        } else {
          fsdp->forward(x).pow(2).sum().backward();
        }
      }
      pair.reference_optim->step();
      pair.optim->step();
    }
    ExpectSameParameters(*fsdp, *pair.reference);
  });
}

TEST_P(FsdpParityTest, ShardGradientsAreSlicesOfTheUnwrappedGradients) {
  const Case c = GetParam();
  RunInRanks(c.world_size, [c](comm::ProcessGroup& group) {
    Net reference = Seeded<Net>(0);
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp, WrapNet(Seeded<Net>(0), Borrow(group), c));
    torch::manual_seed(7);
    at::Tensor x = torch::randn({8, 4});
    reference->forward(x).pow(2).sum().backward();
    fsdp->forward(x).pow(2).sum().backward();
    const auto ref = Named(*reference);
    for (const auto& unit : fsdp->units()) {
      FlatParamHandle* h = unit.handle;
      ASSERT_NE(h, nullptr) << unit.module_prefix;
      std::vector<at::Tensor> pieces;
      for (const auto& info : h->infos())
        pieces.push_back(ref.at(info.fqns[0]).grad().reshape({-1}));
      at::Tensor flat = at::cat(pieces);
      if (!c.use_orig_params) {
        at::Tensor padded = at::zeros({h->padded_numel()});
        padded.narrow(0, 0, h->numel()).copy_(flat);
        at::Tensor expected = padded.narrow(0, h->rank() * h->shard_numel(), h->shard_numel());
        ASSERT_TRUE(h->flat_param().grad().defined()) << unit.module_prefix;
        EXPECT_TRUE(at::allclose(h->flat_param().grad(), expected, 1e-5, 1e-6))
            << unit.module_prefix;
        continue;
      }
      for (size_t i = 0; i < h->params().size(); ++i) {
        const ParamShard local = h->ShardOf(i, h->rank());
        if (local.numel == 0) continue;
        at::Tensor expected = ref.at(h->infos()[i].fqns[0])
                                  .grad()
                                  .reshape({-1})
                                  .narrow(0, local.param_offset, local.numel);
        EXPECT_TRUE(at::allclose(h->params()[i].grad().reshape({-1}), expected, 1e-5, 1e-6))
            << h->infos()[i].fqns[0];
      }
    }
  });
}

TEST_P(FsdpParityTest, UnitsHoldOnlyTheirShardAfterAStep) {
  const Case c = GetParam();
  RunInRanks(c.world_size, [c](comm::ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp, WrapNet(Seeded<Net>(0), Borrow(group), c));
    torch::optim::SGD optim(fsdp->parameters(), torch::optim::SGDOptions(0.1));
    at::Tensor x = torch::randn({8, 4});
    at::Tensor out = fsdp->forward(x);
    for (const auto& unit : fsdp->units()) {
      FlatParamHandle* h = unit.handle;
      if (c.strategy == ShardingStrategy::kNoShard) {
        EXPECT_EQ(h->flat_param().numel(), h->numel());
      } else if (c.strategy == ShardingStrategy::kShardGradOp || unit.module_prefix.empty()) {
        // SHARD_GRAD_OP (and the root) keep the full flat tensor from forward to backward.
        EXPECT_EQ(h->full_buffer_bytes(), h->padded_numel() * 4) << unit.module_prefix;
      } else {
        EXPECT_EQ(h->full_buffer_bytes(), 0) << unit.module_prefix;
      }
    }
    out.sum().backward();
    optim.step();
    for (const auto& unit : fsdp->units()) {
      FlatParamHandle* h = unit.handle;
      if (c.strategy == ShardingStrategy::kNoShard) continue;
      EXPECT_EQ(h->full_buffer_bytes(), 0) << unit.module_prefix;
      EXPECT_EQ(h->flat_param().numel(), h->shard_numel());
      EXPECT_EQ(h->shard_numel() * group.size(), h->padded_numel());
    }
  });
}

INSTANTIATE_TEST_SUITE_P(Strategies, FsdpParityTest,
                         ::testing::Values(Case{1, ShardingStrategy::kFullShard, false},
                                           Case{2, ShardingStrategy::kFullShard, false},
                                           Case{2, ShardingStrategy::kFullShard, true},
                                           Case{3, ShardingStrategy::kFullShard, false},
                                           Case{3, ShardingStrategy::kShardGradOp, true},
                                           Case{4, ShardingStrategy::kFullShard, true},
                                           Case{4, ShardingStrategy::kShardGradOp, false},
                                           Case{2, ShardingStrategy::kNoShard, false},
                                           Case{3, ShardingStrategy::kNoShard, true}),
                         ::fsdp::testing::StrategyCaseName);

TEST(FullyShardedDataParallel, RefusesANestedSlotOutsideTheModel) {
  RunInRanks(1, [](comm::ProcessGroup& group) {
    Net net;
    Net other;
    auto group_ptr = Borrow(group);
    EXPECT_THAT(FullyShardedDataParallel::Wrap(net, group_ptr, {.nested = {&other->l0}}),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         HasSubstr("is not inside the wrapped module")));
  });
}

}  // namespace
}  // namespace fsdp
