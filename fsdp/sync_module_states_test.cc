// sync_module_states on real ranks: ranks that build the model from different seeds train as one
// model, rank 0's, once FSDP broadcast its parameters and buffers; also across HYBRID_SHARD's
// replicas. Without the option each rank keeps what it built (the last case).
#include <torch/torch.h>

#include <map>
#include <string>

#include "comm/multiprocess_testutil.h"
#include "fsdp/fsdp_testutil.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "fsdp/hybrid_shard.h"
#include "fsdp/state_dict.h"
#include "gtest/gtest.h"

namespace fsdp {
namespace {

using ::fsdp::testing::Borrow;
using ::fsdp::testing::NormNet;
using ::fsdp::testing::RunInRanks;

// Builds NormNet from `seed` with a running mean that shows the seed too.
NormNet BuildFromSeed(int seed) {
  torch::manual_seed(seed);
  NormNet net;
  torch::NoGradGuard no_grad;
  net->norm->running_mean.normal_();
  return net;
}

// The full state dict each rank sees equals the model rank 0 built.
void ExpectRankZerosModel(FullyShardedDataParallel& fsdp, int rank) {
  const NormNet rank0 = BuildFromSeed(0);
  std::map<std::string, at::Tensor> expected;
  for (const auto& item : rank0->named_parameters()) expected[item.key()] = item.value();
  for (const auto& item : rank0->named_buffers()) expected[item.key()] = item.value();
  FSDP_ASSERT_OK_AND_ASSIGN(StateDict full, FullStateDict(fsdp, {.rank0_only = false}));
  ASSERT_EQ(full.size(), expected.size());
  for (const auto& [fqn, value] : full) {
    EXPECT_TRUE(at::equal(value, expected.at(fqn))) << fqn << " on rank " << rank;
  }
}

TEST(SyncModuleStates, EveryRankGetsRankZerosParametersAndBuffers) {
  RunInRanks(3, [](comm::ProcessGroup& group) {
    NormNet net = BuildFromSeed(group.rank());
    FSDP_ASSERT_OK_AND_ASSIGN(
        auto fsdp, FullyShardedDataParallel::Wrap(net, Borrow(group),
                                                  {.nested = {}, .sync_module_states = true}));
    ExpectRankZerosModel(*fsdp, group.rank());
  });
}

TEST(SyncModuleStates, ReachesEveryReplicaUnderHybridShard) {
  RunInRanks(4, [](comm::ProcessGroup& world) {
    FSDP_ASSERT_OK_AND_ASSIGN(HybridShardGroups groups, MakeHybridShardGroups(world, 2));
    NormNet net = BuildFromSeed(world.rank());
    FsdpOptions options{.sharding_strategy = ShardingStrategy::kHybridShard,
                        .sync_module_states = true};
    options.replicate_group = groups.replicate;
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp,
                              FullyShardedDataParallel::Wrap(net, groups.shard, options));
    ExpectRankZerosModel(*fsdp, world.rank());
  });
}

TEST(SyncModuleStates, WithoutItRanksKeepTheirOwnValues) {
  RunInRanks(2, [](comm::ProcessGroup& group) {
    NormNet net = BuildFromSeed(group.rank());
    FSDP_ASSERT_OK_AND_ASSIGN(auto fsdp, FullyShardedDataParallel::Wrap(net, Borrow(group)));
    // Buffers are local: rank 1's running mean stays its own.
    const at::Tensor rank0_mean = BuildFromSeed(0)->norm->running_mean;
    EXPECT_EQ(at::equal(net->norm->running_mean, rank0_mean), group.rank() == 0);
  });
}

}  // namespace
}  // namespace fsdp
