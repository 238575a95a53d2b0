// AsyncCheckpointSaver on real ranks: the checkpoint holds the state at Save() even though the
// model and optimizer are overwritten while it is written, loads at another world size and
// layout like a synchronous save's, and a failed background write surfaces from Wait() and from
// the next Save() on every rank while the previous checkpoint stays loadable. With
// use_async_staging: forward and backward run while the copy goes on, SynchronizeStaging() is
// honoured (the checkpoint is the state at Save()), and a step taken before it never commits a
// torn checkpoint.
#include "checkpoint/async_checkpoint_saver.h"

#include <sys/resource.h>
#include <sys/stat.h>
#include <torch/torch.h>

#include <csignal>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "checkpoint/atomic_dir.h"
#include "checkpoint/checkpoint_testutil.h"
#include "checkpoint/full_checkpoint.h"
#include "checkpoint/sharded_checkpoint.h"
#include "comm/multiprocess_testutil.h"
#include "fsdp/state_dict.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "optim_state/optim_state_dict.h"

namespace fsdp::checkpoint {
namespace {

using ::fsdp::testing::IsOk;
using ::fsdp::testing::IsRankProcess;
using ::fsdp::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;
using namespace ::fsdp::checkpoint::testing;  // NOLINT

// The full state, detached from the live tensors (unmanaged parameters' entries are views).
FullState Snapshot(Job& job) {
  FullState s = Gather(job);
  for (auto& [fqn, t] : s.model) t = t.clone();
  return s;
}

// Overwrites every parameter and optimizer state tensor in place, as training would.
// The optimizer state first: the staging copy takes it last (after the flat shards and
// buffers), so a Scribble right after Save() reaches a piece before its copy ends.
void Scribble(Job& job) {
  torch::NoGradGuard no_grad;
  auto osd = job.adapter->StateDict();
  ASSERT_THAT(osd, IsOk());
  for (auto& [key, state] : osd->state) {
    for (auto& [name, value] : state) {
      if (value.Is<at::Tensor>() && value.Get<at::Tensor>().dim() > 0) {
        value.Get<at::Tensor>().fill_(3.0);
      }
    }
  }
  for (at::Tensor& p : job.fsdp->parameters()) p.detach().fill_(-7.0);
}

// Forward and backward of step `step` without the optimizer step: what training overlaps with
// the background staging (it reads the parameters and writes only gradients).
void ForwardBackward(Job& job, int step) {
  job.optim->zero_grad();
  torch::manual_seed(100 + step);
  at::Tensor x = job.model->get_input();
  job.model->get_loss(x, job.fsdp->forward(x)).backward();
}

// Loads `dir` into `job` and expects (on rank 0) the state `expected`, bit for bit.
void ExpectLoadsAs(Job& job, const std::string& dir, const FullState& expected, int rank) {
  ASSERT_THAT(LoadShardedCheckpoint(dir, *job.fsdp, job.adapter.get()), IsOk());
  const FullState loaded = Gather(job);
  if (rank != 0) return;
  ExpectSameModel(expected.model, loaded.model);
  ExpectSameOptim(expected.optim, loaded.optim);
}

// `body` on 2 ranks, each with a job (C(2)) and a saver of `options`; `dir` is fresh.
void RunTwoRankSaver(const std::string& name, const AsyncSaverOptions& options,
                     const std::function<void(comm::ProcessGroup&, Job&, AsyncCheckpointSaver&,
                                              const std::string& dir)>& body) {
  const std::string root = TmpDir(name);
  FreshRootDir(root);
  RunPhase(1, 2, [&](comm::ProcessGroup& group) {
    auto job = MakeJob(C(2), group);
    ASSERT_NE(job, nullptr);
    auto saver = AsyncCheckpointSaver::Create(*job->fsdp, options);
    ASSERT_THAT(saver, IsOk());
    body(group, *job, **saver, root + "/ckpt");
  });
}

class AsyncCheckpointSaverTest : public ::testing::TestWithParam<ReshardCase> {};

TEST_P(AsyncCheckpointSaverTest, SavesTheStateAtSaveWhileTrainingOverwritesIt) {
  const ReshardCase c = GetParam();
  const std::string root = TmpDir(ReshardCaseName({c, 0}));
  const std::string dir = root + "/ckpt";
  FreshRootDir(root);
  // Phase 1: train, snapshot, Save(), overwrite everything at once, Wait(); then load the
  // checkpoint back into the same job and train on.
  RunPhase(1, c.save.world_size, [&](comm::ProcessGroup& group) {
    auto job = MakeJob(c.save, group);
    ASSERT_NE(job, nullptr);
    // As many staging threads as ranks (2 and 3): the copy split across threads, whose pieces
    // break at other places than the pieces' own ends (one thread: the test below).
    auto saver = AsyncCheckpointSaver::Create(*job->fsdp, {.staging_threads = c.save.world_size});
    ASSERT_THAT(saver, IsOk());
    Train(*job, 0, 2);
    const FullState before = Snapshot(*job);
    auto started = (*saver)->Save(dir, job->adapter.get(), {.block_bytes = 64});
    ASSERT_THAT(started, IsOk());
    EXPECT_TRUE((*saver)->pending());
    Scribble(*job);
    auto saved = (*saver)->Wait();
    ASSERT_THAT(saved, IsOk());
    EXPECT_FALSE((*saver)->pending());
    EXPECT_GT(saved->bytes_written, 0);
    EXPECT_GT(started->staged_bytes, 0);
    ASSERT_THAT(LoadShardedCheckpoint(dir, *job->fsdp, job->adapter.get()), IsOk());
    const FullState loaded = Gather(*job);
    const std::vector<double> losses = Train(*job, 2, 4);
    if (group.rank() != 0) return;
    ExpectSameModel(before.model, loaded.model);
    ExpectSameOptim(before.optim, loaded.optim);
    ASSERT_THAT(WriteModelStateDict(before.model, root + "/model.pt"), IsOk());
    ASSERT_THAT(WriteOptimStateDict(before.optim, root + "/optim.pt"), IsOk());
    WriteText(root + "/losses.txt", LossesText(losses));
  });
  // Phase 2: another layout loads what was saved and trains as the first job did.
  RunPhase(2, c.load.world_size, [&](comm::ProcessGroup& group) {
    auto job = MakeJob(c.load, group);
    ASSERT_NE(job, nullptr);
    ASSERT_THAT(LoadShardedCheckpoint(dir, *job->fsdp, job->adapter.get()), IsOk());
    const FullState state = Gather(*job);
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
    for (size_t i = 0; i < losses.size(); ++i) {
      // Another world size reduces gradients in another order: rounding only.
      EXPECT_NEAR(losses[i], expected[i], 1e-5 * std::abs(expected[i])) << "step " << 2 + i;
    }
  });
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, AsyncCheckpointSaverTest,
    ::testing::Values(ReshardCase{C(2), C(3, Opt::kAdam, ShardingStrategy::kFullShard, true, true)},
                      ReshardCase{C(3, Opt::kSgd, ShardingStrategy::kShardGradOp, true),
                                  C(2, Opt::kSgd, ShardingStrategy::kNoShard)}),
    ReshardCaseName);

// Rank 1 may write no file larger than this during the failing save: its data file fails with
// EFBIG (SIGXFSZ ignored), a real write error.
constexpr rlim_t kTinyFileLimit = 16;

TEST(AsyncCheckpointSaver, FailedWriteSurfacesOnWaitAndNextSaveAndKeepsTheOldCheckpoint) {
  const std::string root = TmpDir("async_failed_write");
  const std::string dir = root + "/ckpt";
  FreshRootDir(root);
  RunPhase(1, 2, [&](comm::ProcessGroup& group) {
    auto job = MakeJob(C(2), group);
    ASSERT_NE(job, nullptr);
    EXPECT_THAT(AsyncCheckpointSaver::Create(*job->fsdp, {.staging_threads = 0}),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         HasSubstr("staging_threads must be at least 1, not 0")));
    auto saver = AsyncCheckpointSaver::Create(*job->fsdp);
    ASSERT_THAT(saver, IsOk());
    Train(*job, 0, 1);
    const FullState first = Snapshot(*job);
    ASSERT_THAT((*saver)->Save(dir, job->adapter.get()), IsOk());
    ASSERT_THAT((*saver)->Wait(), IsOk());
    Train(*job, 1, 2);

    rlimit old_limit;
    if (group.rank() == 1) old_limit = LimitFileSize(kTinyFileLimit);
    // Staging succeeds; the write fails in the background, on rank 1's file, on every rank.
    ASSERT_THAT((*saver)->Save(dir, job->adapter.get()), IsOk());
    const auto file_error =
        AllOf(HasSubstr(dir), HasSubstr("nothing saved: rank 1 failed"), HasSubstr("rank-1-of-2"));
    EXPECT_THAT((*saver)->Wait(), StatusIs(absl::StatusCode::kInternal, file_error));
    // Once more, now collected by the next Save(), which starts nothing.
    ASSERT_THAT((*saver)->Save(dir, job->adapter.get()), IsOk());
    EXPECT_THAT((*saver)->Save(dir, job->adapter.get()),
                StatusIs(absl::StatusCode::kInternal,
                         AllOf(HasSubstr("the previous save failed, so this one was not started"),
                               file_error)));
    EXPECT_FALSE((*saver)->pending());
    if (group.rank() == 1) RestoreFileSize(old_limit);

    // The first checkpoint is still there, whole.
    ASSERT_THAT(LoadShardedCheckpoint(dir, *job->fsdp, job->adapter.get()), IsOk());
    const FullState loaded = Gather(*job);
    if (group.rank() != 0) return;
    ExpectSameModel(first.model, loaded.model);
    ExpectSameOptim(first.optim, loaded.optim);
  });
}

TEST(AsyncCheckpointSaver, AsyncStagingSavesTheStateAtSaveOnceSynchronizeStagingIsHonoured) {
  RunTwoRankSaver(
      "async_staging_honoured", {.staging_threads = 2, .use_async_staging = true},
      [](comm::ProcessGroup& group, Job& job, AsyncCheckpointSaver& saver, const std::string& dir) {
        EXPECT_THAT(saver.SynchronizeStaging(), IsOk());  // nothing in flight
        Train(job, 0, 2);
        const FullState before = Snapshot(job);
        auto started = saver.Save(dir, job.adapter.get(), {.block_bytes = 64});
        ASSERT_THAT(started, IsOk());
        EXPECT_EQ(started->copy_seconds, 0);  // the copy is not Save()'s
        EXPECT_TRUE(saver.staging_pending());
        ForwardBackward(job, 2);
        auto staged = saver.SynchronizeStaging();
        ASSERT_THAT(staged, IsOk());
        EXPECT_FALSE(saver.staging_pending());
        EXPECT_GT(staged->staged_bytes, 0);
        // From here on training may change everything while the write goes on.
        ASSERT_THAT(job.adapter->Step(), IsOk());
        Scribble(job);
        Train(job, 3, 4);
        ASSERT_THAT(saver.Wait(), IsOk());
        EXPECT_FALSE(saver.pending());
        ExpectLoadsAs(job, dir, before, group.rank());
      });
}

// The state changed right after Save() returns, without SynchronizeStaging(): the copy may
// have finished first (then the checkpoint must be the state at Save()) or be overtaken (then
// the save must fail naming the piece and leave the previous checkpoint). Tried until the
// second happens: that it is detected is what is tested.
TEST(AsyncCheckpointSaver, AsyncStagingOvertakenByAChangeCommitsNothing) {
  RunTwoRankSaver(
      "async_staging_overtaken", {.use_async_staging = true},
      [](comm::ProcessGroup& group, Job& job, AsyncCheckpointSaver& saver, const std::string& dir) {
        bool overtaken = false;
        std::optional<FullState> last_saved;  // what `dir` holds
        for (int attempt = 0; attempt < 20 && !overtaken; ++attempt) {
          Train(job, attempt, attempt + 1);
          FullState at_save = Snapshot(job);
          ASSERT_THAT(saver.Save(dir, job.adapter.get()), IsOk());
          Scribble(job);  // no SynchronizeStaging(): misuse
          const absl::StatusOr<AsyncSaveStats> staged = saver.SynchronizeStaging();
          const absl::StatusOr<SaveStats> saved = saver.Wait();
          if (!staged.ok()) {
            EXPECT_THAT(staged,
                        StatusIs(absl::StatusCode::kFailedPrecondition,
                                 AllOf(HasSubstr(dir), HasSubstr("changed while it was being"),
                                       HasSubstr("wait for SynchronizeStaging()"))));
            EXPECT_FALSE(saved.ok());
          }
          overtaken = !saved.ok();  // the same on every rank
          if (!overtaken) {
            last_saved = std::move(at_save);
          } else {
            // The rank whose piece changed says FAILED_PRECONDITION, the other INTERNAL.
            EXPECT_THAT(saved.status().message(), AllOf(HasSubstr("nothing saved: rank "),
                                                        HasSubstr("changed while it was")));
          }
          if (last_saved.has_value()) {
            ExpectLoadsAs(job, dir, *last_saved, group.rank());
          } else {
            EXPECT_THAT(LoadShardedCheckpoint(dir, *job.fsdp, job.adapter.get()),
                        StatusIs(absl::StatusCode::kNotFound, HasSubstr(dir)));
          }
        }
        EXPECT_TRUE(overtaken) << "20 changes right after Save() all came after the copy";
      });
}

}  // namespace
}  // namespace fsdp::checkpoint
