// HYBRID_SHARD on real ranks: the groups' layout, what Wrap refuses, and, with the same batch on
// every rank, gradients and losses equal to the unwrapped model's bit for bit (the two-step
// average of equal values is exact at 2 x 2). Against PyTorch FSDP1's HYBRID_SHARD with per-rank
// batches: //tests/pytorch_peer:gradient_reduction_peer_test (*hybrid*).
#include "fsdp/hybrid_shard.h"

#include <torch/torch.h>

#include <vector>

#include "comm/multiprocess_testutil.h"
#include "fsdp/fsdp_testutil.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "fsdp/state_dict.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "models/nested_model.h"

namespace fsdp {
namespace {

using ::fsdp::testing::Borrow;
using ::fsdp::testing::RunInRanks;
using ::fsdp::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

TEST(MakeHybridShardGroups, LaysOutRowsAsShardGroupsAndColumnsAsReplicas) {
  RunInRanks(6, [](comm::ProcessGroup& world) {
    FSDP_ASSERT_OK_AND_ASSIGN(HybridShardGroups groups, MakeHybridShardGroups(world, 2));
    ASSERT_NE(groups.shard, nullptr);
    ASSERT_NE(groups.replicate, nullptr);
    const int r = world.rank();
    EXPECT_THAT(groups.shard->global_ranks(), ElementsAre(r - r % 2, r - r % 2 + 1));
    EXPECT_THAT(groups.replicate->global_ranks(), ElementsAre(r % 2, r % 2 + 2, r % 2 + 4));
    EXPECT_THAT(MakeHybridShardGroups(world, 4),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         HasSubstr("shard group size 4 does not divide the world size 6")));
  });
}

TEST(HybridShard, WrapRefusesAMissingOrUnwantedReplicateGroup) {
  RunInRanks(2, [](comm::ProcessGroup& world) {
    models::NestedModel net;
    EXPECT_THAT(
        FullyShardedDataParallel::Wrap(net, Borrow(world),
                                       {.sharding_strategy = ShardingStrategy::kHybridShard}),
        StatusIs(absl::StatusCode::kInvalidArgument,
                 HasSubstr("HYBRID_SHARD needs FsdpOptions.replicate_group")));
    FsdpOptions options{.sharding_strategy = ShardingStrategy::kFullShard};
    options.replicate_group = Borrow(world);
    EXPECT_THAT(FullyShardedDataParallel::Wrap(net, Borrow(world), options),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         HasSubstr("FULL_SHARD takes no FsdpOptions.replicate_group")));
  });
}

class HybridShardParityTest : public ::testing::TestWithParam<ShardingStrategy> {};

TEST_P(HybridShardParityTest, TrainsAsTheUnwrappedModelOnTheSameBatch) {
  const ShardingStrategy strategy = GetParam();
  RunInRanks(4, [strategy](comm::ProcessGroup& world) {
    FSDP_ASSERT_OK_AND_ASSIGN(HybridShardGroups groups, MakeHybridShardGroups(world, 2));
    models::NestedModel reference;
    models::NestedModel net;
    FsdpOptions options{.sharding_strategy = strategy, .nested = net->wrap_slots()};
    options.replicate_group = groups.replicate;
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp, FullyShardedDataParallel::Wrap(net, groups.shard,
                                                                        options));
    for (const auto& unit : fsdp->units()) {
      if (unit.handle != nullptr) {
        EXPECT_EQ(unit.handle->world_size(), 2) << unit.module_prefix;
      }
    }
    torch::optim::SGD optim(fsdp->parameters(), torch::optim::SGDOptions(0.1));
    torch::optim::SGD reference_optim(reference->parameters(), torch::optim::SGDOptions(0.1));
    for (int step = 0; step < 3; ++step) {
      torch::manual_seed(step);
      const at::Tensor x = net->get_input();
      const at::Tensor loss = fsdp->forward(x).sum();
      const at::Tensor expected = reference->forward(x).sum();
      EXPECT_TRUE(at::equal(loss, expected)) << "step " << step;
      optim.zero_grad();
      reference_optim.zero_grad();
      loss.backward();
      expected.backward();
      optim.step();
      reference_optim.step();
    }
    // Every replica holds the same values: the full state dict of each shard group is the
    // reference's.
    FSDP_ASSERT_OK_AND_ASSIGN(StateDict full, FullStateDict(*fsdp, {.rank0_only = false}));
    const auto reference_params = reference->named_parameters();
    for (const auto& [fqn, value] : full) {
      EXPECT_TRUE(at::equal(value, reference_params[fqn])) << fqn << " on rank " << world.rank();
    }
  });
}

INSTANTIATE_TEST_SUITE_P(Strategies, HybridShardParityTest,
                         ::testing::Values(ShardingStrategy::kHybridShard,
                                           ShardingStrategy::kHybridShardZero2),
                         [](const ::testing::TestParamInfo<ShardingStrategy>& info) {
                           return info.param == ShardingStrategy::kHybridShard ? "HybridShard"
                                                                               : "HybridShardZero2";
                         });

}  // namespace
}  // namespace fsdp
