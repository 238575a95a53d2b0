// Activation checkpointing alone and under FSDP: same losses and gradients as without it, the
// checkpointed forward really runs twice, and names do not change.
#include "fsdp/activation_checkpointing.h"

#include <torch/torch.h>

#include <map>

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
using ::fsdp::testing::StatusIs;
using ::testing::HasSubstr;

// Two-input block (as a decoder layer takes target and memory); counts its forward calls.
struct BlockImpl : torch::nn::Module {
  BlockImpl()
      : a(register_module("a", torch::nn::Linear(6, 6))),
        b(register_module("b", torch::nn::Linear(6, 6))) {}
  torch::Tensor forward(torch::Tensor x, torch::Tensor memory) {
    ++calls;
    return torch::tanh(a->forward(x)) * torch::sigmoid(b->forward(memory)) + x;
  }
  torch::nn::Linear a;
  torch::nn::Linear b;
  int calls = 0;
};
TORCH_MODULE(Block);

struct NetImpl : torch::nn::Module {
  NetImpl()
      : embed(register_module("embed", torch::nn::Linear(3, 6))),
        block0(register_module("block0", Block())),
        block1(register_module("block1", Block())),
        head(register_module("head", torch::nn::Linear(6, 2))) {}
  torch::Tensor forward(torch::Tensor x) {
    torch::Tensor h = embed->forward(x);
    torch::Tensor memory = torch::relu(h);
    h = block0.forward(h, memory);
    h = block1.forward(h, memory);
    return head->forward(h);
  }
  torch::nn::Linear embed;
  ModuleSlot block0;
  ModuleSlot block1;
  torch::nn::Linear head;
  int block0_calls() const { return std::dynamic_pointer_cast<BlockImpl>(block0.module())->calls; }
};
TORCH_MODULE(Net);

std::map<std::string, at::Tensor> Grads(torch::nn::Module& m) {
  std::map<std::string, at::Tensor> out;
  for (const auto& p : m.named_parameters()) out[p.key()] = p.value().grad().clone();
  return out;
}

TEST(ActivationCheckpointing, SameGradientsWithTheForwardRunTwice) {
  torch::manual_seed(0);
  Net plain;
  torch::manual_seed(0);
  Net checkpointed;
  FSDP_ASSERT_OK(ApplyActivationCheckpointing(checkpointed->block0));
  FSDP_ASSERT_OK(ApplyActivationCheckpointing(checkpointed->block1));
  at::Tensor x = torch::randn({4, 3}, torch::requires_grad());
  at::Tensor x2 = x.detach().clone().requires_grad_(true);
  at::Tensor loss = plain->forward(x).pow(2).sum();
  at::Tensor loss2 = checkpointed->forward(x2).pow(2).sum();
  EXPECT_EQ(checkpointed->block0_calls(), 1);
  loss.backward();
  loss2.backward();
  EXPECT_EQ(checkpointed->block0_calls(), 2) << "backward must recompute the forward";
  EXPECT_EQ(plain->block0_calls(), 1);
  EXPECT_NEAR(loss.item<double>(), loss2.item<double>(), 1e-6);
  const auto expected = Grads(*plain);
  const auto got = Grads(*checkpointed);
  ASSERT_EQ(got.size(), expected.size());
  for (const auto& [name, grad] : expected) {
    ASSERT_TRUE(got.count(name)) << name << " missing: checkpointing must not rename";
    EXPECT_TRUE(at::allclose(got.at(name), grad, 1e-5, 1e-6)) << name;
  }
  EXPECT_TRUE(at::allclose(x2.grad(), x.grad(), 1e-5, 1e-6)) << "input gradient";
}

TEST(ActivationCheckpointing, NoGradForwardRunsOnce) {
  Net net;
  FSDP_ASSERT_OK(ApplyActivationCheckpointing(net->block0));
  torch::NoGradGuard no_grad;
  net->forward(torch::randn({2, 3}));
  EXPECT_EQ(net->block0_calls(), 1);
}

TEST(ActivationCheckpointing, RefusesEmptyAndRepeatedSlots) {
  Net net;
  ModuleSlot empty;
  EXPECT_THAT(ApplyActivationCheckpointing(empty),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("empty")));
  FSDP_ASSERT_OK(ApplyActivationCheckpointing(net->block1));
  EXPECT_THAT(ApplyActivationCheckpointing(net->block1),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("already checkpointed")));
}

// Three Adam steps of `reference` and of `fsdp` on the same batches: equal losses, then equal
// parameters (FSDP's full state dict against the reference's).
template <typename Module>
void ExpectTrainsAsReference(Module& reference, FullyShardedDataParallel& fsdp) {
  torch::optim::Adam ref_optim(reference.parameters(), torch::optim::AdamOptions(0.01));
  torch::optim::Adam optim(fsdp.parameters(), torch::optim::AdamOptions(0.01));
  for (int step = 0; step < 3; ++step) {
    torch::manual_seed(10 + step);
    at::Tensor x = torch::randn({5, 3});
    ref_optim.zero_grad();
    optim.zero_grad();
    at::Tensor ref_loss = reference.forward(x).pow(2).sum();
    at::Tensor loss = fsdp.forward(x).pow(2).sum();
    EXPECT_NEAR(loss.item<double>(), ref_loss.item<double>(),
                1e-5 * std::max(1.0, std::abs(ref_loss.item<double>())))
        << "step " << step;
    ref_loss.backward();
    loss.backward();
    ref_optim.step();
    optim.step();
  }
  FSDP_ASSERT_OK_AND_ASSIGN(auto state, fsdp::FullStateDict(fsdp));
  std::map<std::string, at::Tensor> expected;
  for (const auto& p : reference.named_parameters()) expected[p.key()] = p.value();
  ASSERT_EQ(state.size(), expected.size());
  for (const auto& [name, value] : state) {
    ASSERT_TRUE(expected.count(name)) << name;
    EXPECT_TRUE(at::allclose(value, expected.at(name), 1e-5, 1e-6)) << name;
  }
}

using Case = ::fsdp::testing::StrategyCase;

class CheckpointUnderFsdpTest : public ::testing::TestWithParam<Case> {};

TEST_P(CheckpointUnderFsdpTest, LossesMatchUnwrappedTraining) {
  const Case c = GetParam();
  RunInRanks(c.world_size, [c](comm::ProcessGroup& group) {
    torch::manual_seed(0);
    Net reference;
    torch::manual_seed(0);
    Net net;
    FSDP_ASSERT_OK(ApplyActivationCheckpointing(net->block0));
    FSDP_ASSERT_OK(ApplyActivationCheckpointing(net->block1));
    auto group_ptr = Borrow(group);
    FSDP_ASSERT_OK_AND_ASSIGN(
        auto fsdp, FullyShardedDataParallel::Wrap(net, group_ptr,
                                                  {.sharding_strategy = c.strategy,
                                                   .use_orig_params = c.use_orig_params,
                                                   .nested = {&net->block0, &net->block1}}));
    ExpectTrainsAsReference(*reference, *fsdp);
    EXPECT_EQ(net->block0_calls(), 6) << "each step runs the checkpointed forward twice";
  });
}

INSTANTIATE_TEST_SUITE_P(Strategies, CheckpointUnderFsdpTest,
                         ::testing::Values(Case{2, ShardingStrategy::kFullShard, false},
                                           Case{3, ShardingStrategy::kFullShard, true},
                                           Case{2, ShardingStrategy::kShardGradOp, false},
                                           Case{2, ShardingStrategy::kNoShard, true}),
                         ::fsdp::testing::StrategyCaseName);

// A checkpointed region that holds FSDP units, after a unit outside it: the region's
// recomputation runs a nested backward, whose end must not finish the outside unit (as
// PyTorch's test_full_optim_state_dict_keys checkpoints an nn.Sequential of FSDP units).
struct TwoBlocksImpl : torch::nn::Module {
  TwoBlocksImpl()
      : block0(register_module("block0", Block())), block1(register_module("block1", Block())) {}
  torch::Tensor forward(torch::Tensor h, torch::Tensor memory) {
    h = block0.forward(h, memory);
    return block1.forward(h, memory);
  }
  ModuleSlot block0;
  ModuleSlot block1;
};
TORCH_MODULE(TwoBlocks);

struct RegionNetImpl : torch::nn::Module {
  RegionNetImpl()
      : embed(register_module("embed", torch::nn::Linear(3, 6))),
        blocks(register_module("blocks", TwoBlocks())),
        head(register_module("head", torch::nn::Linear(6, 2))) {}
  torch::Tensor forward(torch::Tensor x) {
    torch::Tensor h = embed.forward(x);
    return head->forward(blocks.forward(h, torch::relu(h)));
  }
  TwoBlocksImpl& two_blocks() { return *std::dynamic_pointer_cast<TwoBlocksImpl>(blocks.module()); }
  ModuleSlot embed;
  ModuleSlot blocks;
  torch::nn::Linear head;
};
TORCH_MODULE(RegionNet);

TEST(CheckpointUnderFsdp, RegionHoldingUnitsAfterAUnitOutsideIt) {
  RunInRanks(2, [](comm::ProcessGroup& group) {
    torch::manual_seed(0);
    RegionNet reference;
    torch::manual_seed(0);
    RegionNet net;
    FSDP_ASSERT_OK(ApplyActivationCheckpointing(net->blocks));
    // No root unit: the first unit whose backward starts is inside the region.
    FSDP_ASSERT_OK_AND_ASSIGN(
        auto fsdp,
        FullyShardedDataParallel::Wrap(
            net, Borrow(group),
            {.nested = {&net->embed, &net->two_blocks().block0, &net->two_blocks().block1},
             .wrap_root = false}));
    ExpectTrainsAsReference(*reference, *fsdp);
  });
}

}  // namespace
}  // namespace fsdp
