// Sharded checkpoints on real ranks: NestedModel (PyTorch's test model, root not wrapped, so
// its `bias` is a parameter FSDP does not manage) trained with Adam or SGD with momentum,
// saved by one job and loaded by another of the same or another world size, wrapping
// (NestedModel.wrap / wrap_alt), use_orig_params and sharding strategy. After loading, the
// full model and optimizer state equal the saved ones exactly and training continues with the
// losses of the uninterrupted run. Damaged checkpoints are refused with their own errors and
// change nothing; a rank reads about 1/N of the data.
#include "checkpoint/sharded_checkpoint.h"

#include <sys/stat.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "checkpoint/atomic_dir.h"
#include "checkpoint/checkpoint_testutil.h"
#include "checkpoint/full_checkpoint.h"
#include "checkpoint/sharded_format.h"
#include "comm/launcher.h"
#include "comm/multiprocess_testutil.h"
#include "fsdp/state_dict.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "models/nested_model.h"
#include "optim_state/fsdp_optim_state.h"
#include "optim_state/optim_state_dict.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::checkpoint {
namespace {

using ::fsdp::testing::IsOk;
using ::fsdp::testing::IsRankProcess;
using ::fsdp::testing::StatusIs;
using optim_state::OptimizerAdapter;
using optim_state::OptimStateDict;
using ::testing::AllOf;
using ::testing::HasSubstr;
using namespace ::fsdp::checkpoint::testing;  // NOLINT

// ---------------------------------------------------------------- round trips and resharding

// Every state tensor but `step` that `before` holds (taken from the optimizer before a load) is
// still the optimizer's, at the same address: the load read into it rather than beside it.
void ExpectSameStateTensors(const OptimStateDict& before, const OptimizerAdapter& adapter) {
  FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict after, adapter.StateDict());
  int64_t compared = 0;
  for (const auto& [key, state] : before.state) {
    for (const auto& [name, value] : state) {
      const at::Tensor* old = value.GetIf<at::Tensor>();
      if (name == "step" || old == nullptr) continue;
      const optim_state::ParamState* now = after.state.Find(key);
      ASSERT_NE(now, nullptr) << key.ToString();
      const optim_state::StateValue* v = now->Find(name);
      ASSERT_TRUE(v != nullptr && v->Is<at::Tensor>()) << key.ToString() << " " << name;
      EXPECT_EQ(v->Get<at::Tensor>().data_ptr(), old->data_ptr()) << key.ToString() << " " << name;
      ++compared;
    }
  }
  EXPECT_GT(compared, 0);
}

class ShardedCheckpointTest : public ::testing::TestWithParam<ReshardCase> {};

TEST_P(ShardedCheckpointTest, LoadsExactlyAndTrainingContinuesAsUninterrupted) {
  const ReshardCase c = GetParam();
  const std::string root = TmpDir(ReshardCaseName({c, 0}));
  const std::string dir = root + "/ckpt";
  FreshRootDir(root);
  // Phase 1: train 2 steps, save (twice: the second replaces the first), record the full state
  // and the next 2 steps' losses.
  RunPhase(1, c.save.world_size, [&](comm::ProcessGroup& group) {
    auto job = MakeJob(c.save, group);
    ASSERT_NE(job, nullptr);
    Train(*job, 0, 1);
    ASSERT_THAT(SaveShardedCheckpoint(dir, *job->fsdp, job->adapter.get(), {.block_bytes = 64}),
                IsOk());
    Train(*job, 1, 2);
    auto saved = SaveShardedCheckpoint(dir, *job->fsdp, job->adapter.get(), {.block_bytes = 64});
    ASSERT_THAT(saved, IsOk());
    FullState state = Gather(*job);
    const std::vector<double> losses = Train(*job, 2, 4);
    if (group.rank() == 0) {
      ASSERT_THAT(WriteModelStateDict(state.model, root + "/model.pt"), IsOk());
      ASSERT_THAT(WriteOptimStateDict(state.optim, root + "/optim.pt"), IsOk());
      WriteText(root + "/losses.txt", LossesText(losses));
    }
  });
  // Phase 2: a fresh job of the loading configuration loads and trains on. Where the loading
  // job has trained a step first, its optimizer has state, which the load overwrites in place.
  RunPhase(2, c.load.world_size, [&](comm::ProcessGroup& group) {
    auto job = MakeJob(c.load, group);
    ASSERT_NE(job, nullptr);
    OptimStateDict before;
    if (c.load.trained) {
      Train(*job, 0, 1);
      FSDP_ASSERT_OK_AND_ASSIGN(before, job->adapter->StateDict());
    }
    auto loaded = LoadShardedCheckpoint(dir, *job->fsdp, job->adapter.get());
    ASSERT_THAT(loaded, IsOk());
    if (c.load.trained) ExpectSameStateTensors(before, *job->adapter);
    FullState state = Gather(*job);
    const std::vector<double> losses = Train(*job, 2, 4);
    if (group.rank() != 0) return;
    auto model = ReadModelStateDict(root + "/model.pt");
    auto optim = ReadOptimStateDict(root + "/optim.pt");
    ASSERT_THAT(model, IsOk());
    ASSERT_THAT(optim, IsOk());
    ExpectSameModel(*model, state.model);
    ExpectSameOptim(*optim, state.optim);
    const std::vector<double> expected = ParseLosses(ReadText(root + "/losses.txt"));
    ASSERT_EQ(expected.size(), losses.size());
    const bool same_layout = c.save.world_size == c.load.world_size &&
                             c.save.strategy == c.load.strategy &&
                             c.save.wrap_alt == c.load.wrap_alt;
    for (size_t i = 0; i < losses.size(); ++i) {
      if (same_layout) {
        EXPECT_EQ(losses[i], expected[i]) << "step " << 2 + i;
      } else {
        // Other world sizes reduce gradients in another order: rounding only.
        EXPECT_NEAR(losses[i], expected[i], 1e-5 * std::abs(expected[i])) << "step " << 2 + i;
      }
    }
  });
}

INSTANTIATE_TEST_SUITE_P(RoundTrips, ShardedCheckpointTest,
                         ::testing::Values(ReshardCase{C(2), Trained(C(2))},
                                           ReshardCase{C(3, Opt::kSgd), Trained(C(3, Opt::kSgd))},
                                           ReshardCase{C(4), C(4)}),
                         ReshardCaseName);

INSTANTIATE_TEST_SUITE_P(
    Resharding, ShardedCheckpointTest,
    ::testing::Values(
        ReshardCase{C(4), Trained(C(2))},
        ReshardCase{C(4, Opt::kSgd), C(3, Opt::kSgd, ShardingStrategy::kFullShard, false, true)},
        ReshardCase{C(2), Trained(C(4, Opt::kAdam, ShardingStrategy::kFullShard, true))},
        ReshardCase{C(2, Opt::kAdam, ShardingStrategy::kNoShard),
                    C(3, Opt::kAdam, ShardingStrategy::kFullShard, true, true)},
        ReshardCase{C(3, Opt::kAdam, ShardingStrategy::kShardGradOp, true),
                    C(2, Opt::kAdam, ShardingStrategy::kNoShard)},
        ReshardCase{C(3, Opt::kSgd, ShardingStrategy::kFullShard, true, true),
                    C(2, Opt::kSgd, ShardingStrategy::kShardGradOp, true)}),
    ReshardCaseName);

}  // namespace
}  // namespace fsdp::checkpoint
