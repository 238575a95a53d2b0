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

using ::fsdp::testing::Borrow;
using ::fsdp::testing::RunInRanks;
using ::fsdp::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// A small nested model: l0 -> relu -> inner (two Linears, the second nested again) -> head.
// Sizes are odd so that flat parameters split unevenly.
struct InnerImpl : torch::nn::Module {
  InnerImpl()
      : a(register_module("a", torch::nn::Linear(6, 7))),
        b(register_module("b", torch::nn::Linear(7, 5))) {}
  torch::Tensor forward(torch::Tensor x) { return b.forward(torch::tanh(a.forward(x))); }
  ModuleSlot a;
  ModuleSlot b;
};
TORCH_MODULE(Inner);

struct NetImpl : torch::nn::Module {
  NetImpl()
      : l0(register_module("l0", torch::nn::Linear(4, 6))),
        inner(register_module("inner", Inner())),
        head(register_module("head", torch::nn::Linear(5, 3))) {
    scale = register_parameter("scale", torch::ones({3}));
  }
  torch::Tensor forward(torch::Tensor x) {
    return head->forward(inner.forward(torch::relu(l0.forward(x)))) * scale;
  }
  ModuleSlot l0;
  ModuleSlot inner;
  torch::nn::Linear head;
  torch::Tensor scale;
};
TORCH_MODULE(Net);

using Case = ::fsdp::testing::StrategyCase;

// Wraps l0, inner and inner.b as units inside the root unit.
absl::StatusOr<std::unique_ptr<FullyShardedDataParallel>> WrapNet(Net net,
                                                                  comm::ProcessGroup& group,
                                                                  const Case& c) {
  auto inner = std::dynamic_pointer_cast<InnerImpl>(net->inner.module());
  auto group_ptr = Borrow(group);
  return FullyShardedDataParallel::Wrap(net, group_ptr,
                                        {.sharding_strategy = c.strategy,
                                         .use_orig_params = c.use_orig_params,
                                         .nested = {&net->l0, &net->inner, &inner->b}});
}

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
    torch::manual_seed(0);
    Net reference;
    torch::manual_seed(0);
    Net net;
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp, WrapNet(net, group, c));
    torch::optim::Adam ref_optim(reference->parameters(), torch::optim::AdamOptions(0.01));
    torch::optim::Adam optim(fsdp->parameters(), torch::optim::AdamOptions(0.01));
    for (int step = 0; step < 4; ++step) {
      torch::manual_seed(100 + step);  // the same batch on every rank
      at::Tensor x = torch::randn({8, 4});
      at::Tensor ref_loss = reference->forward(x).pow(2).sum();
      at::Tensor loss = fsdp->forward(x).pow(2).sum();
      EXPECT_NEAR(loss.item<double>(), ref_loss.item<double>(),
                  1e-5 * std::abs(ref_loss.item<double>()))
          << "step " << step;
      ref_optim.zero_grad();
      optim.zero_grad();
      ref_loss.backward();
      loss.backward();
      ref_optim.step();
      optim.step();
    }
    ExpectSameParameters(*fsdp, *reference);
  });
}

// PyTorch's gradient accumulation with no_sync(): per step, three micro-batches under a
// NoSyncGuard (no reduction; the parameters hold no gradient yet) and a fourth outside it,
// against the unwrapped model accumulating the same four.
TEST_P(FsdpParityTest, NoSyncAccumulatesMicroBatchesAsTheUnwrappedModel) {
  const Case c = GetParam();
  RunInRanks(c.world_size, [c](comm::ProcessGroup& group) {
    torch::manual_seed(0);
    Net reference;
    torch::manual_seed(0);
    Net net;
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp, WrapNet(net, group, c));
    torch::optim::Adam ref_optim(reference->parameters(), torch::optim::AdamOptions(0.01));
    torch::optim::Adam optim(fsdp->parameters(), torch::optim::AdamOptions(0.01));
    constexpr int kMicroBatches = 4;
    for (int step = 0; step < 3; ++step) {
      ref_optim.zero_grad();
      optim.zero_grad();
      for (int m = 0; m < kMicroBatches; ++m) {
        torch::manual_seed(100 + kMicroBatches * step + m);  // the same batch on every rank
        at::Tensor x = torch::randn({8, 4});
        reference->forward(x).pow(2).sum().backward();
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
      ref_optim.step();
      optim.step();
    }
    ExpectSameParameters(*fsdp, *reference);
  });
}

TEST_P(FsdpParityTest, ShardGradientsAreSlicesOfTheUnwrappedGradients) {
  const Case c = GetParam();
  RunInRanks(c.world_size, [c](comm::ProcessGroup& group) {
    torch::manual_seed(0);
    Net reference;
    torch::manual_seed(0);
    Net net;
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp, WrapNet(net, group, c));
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
    torch::manual_seed(0);
    Net net;
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp, WrapNet(net, group, c));
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
