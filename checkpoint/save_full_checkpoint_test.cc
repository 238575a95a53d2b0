// SaveFullCheckpoint on real ranks: the streamed files are byte for byte what LibTorch's own
// archive writer (torch::jit::writeArchiveAndTensors, torch::pickle_save's) writes for the dicts
// FullStateDict and FullOptimStateDict gather, under every sharding strategy, use_orig_params,
// a root unit gathered twice (its parameters come first and last in state_dict order),
// unmanaged parameters and buffers; they load at another world size and wrapping to the same
// state; a write that fails (RLIMIT_FSIZE) is reported on every rank, naming the file, and
// leaves the old checkpoint as it was.
#include "checkpoint/save_full_checkpoint.h"

#include <caffe2/serialize/inline_container.h>
#include <dirent.h>
#include <signal.h>
#include <sys/resource.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/torch.h>

#include <csignal>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "checkpoint/checkpoint_testutil.h"
#include "checkpoint/file_testutil.h"
#include "checkpoint/full_checkpoint.h"
#include "checkpoint/internal/full_checkpoint_pickle.h"
#include "checkpoint/load_full_checkpoint.h"
#include "comm/multiprocess_testutil.h"
#include "fsdp/fsdp_testutil.h"
#include "fsdp/state_dict.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "optim_state/fsdp_optim_state.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::checkpoint {
namespace {

using ::fsdp::testing::IsOk;
using ::fsdp::testing::StatusIs;
using ::fsdp::testing::StrategyCase;
using optim_state::OptimStateDict;
using ::testing::AllOf;
using ::testing::HasSubstr;
using testing::ReadFileBytes;
using testing::RunPhase;

// A Net (with an ignored Linear and a buffer) under FSDP, trained two steps with Adam.
struct Job {
  fsdp::testing::NetPair pair;
  std::unique_ptr<optim_state::OptimizerAdapter> adapter;
};

absl::StatusOr<Job> TrainedJob(comm::ProcessGroup& group, const StrategyCase& c,
                               bool nest_inner_b = true) {
  Job job;
  job.pair.reference = fsdp::testing::Seeded<fsdp::testing::Net>(
      0, fsdp::testing::NetOptions{.with_unmanaged = true});
  FSDP_ASSIGN_OR_RETURN(
      job.pair.fsdp,
      fsdp::testing::WrapNet(fsdp::testing::Seeded<fsdp::testing::Net>(
                                 0, fsdp::testing::NetOptions{.with_unmanaged = true}),
                             fsdp::testing::Borrow(group), c, nest_inner_b));
  job.pair.optim = std::make_unique<torch::optim::Adam>(job.pair.fsdp->parameters(),
                                                        torch::optim::AdamOptions(0.01));
  FSDP_ASSIGN_OR_RETURN(optim_state::OptimizerAdapter adapter,
                        optim_state::OptimizerAdapter::Create(*job.pair.optim));
  job.adapter = std::make_unique<optim_state::OptimizerAdapter>(std::move(adapter));
  for (int step = 0; step < 2; ++step)
    fsdp::testing::TrainStep(*job.pair.fsdp, *job.pair.optim, step);
  return job;
}

// The archive LibTorch's torch::pickle_save writes for `pickled` (its writer, not ours).
void WriteWithLibTorch(const internal::Pickled& pickled, const std::string& path) {
  std::ofstream out(path, std::ios::binary);
  caffe2::serialize::PyTorchStreamWriter writer([&](const void* data, size_t n) {
    out.write(static_cast<const char*>(data), static_cast<std::streamsize>(n));
    return n;
  });
  torch::jit::writeArchiveAndTensors("data", pickled.pickle.data(), pickled.pickle.size(),
                                     pickled.storages, writer);
  writer.writeEndOfFile();
}

class SaveFullCheckpointTest : public ::testing::TestWithParam<StrategyCase> {};

TEST_P(SaveFullCheckpointTest, WritesLibTorchsBytesAndLoadsElsewhere) {
  const StrategyCase c = GetParam();
  const std::string dir = testing::TmpDir(absl::StrCat("streamed_", c.world_size));
  const std::string reference = dir + "_reference";
  RunPhase(1, c.world_size, [&](comm::ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(Job job, TrainedJob(group, c));
    FSDP_ASSERT_OK(SaveFullCheckpoint(dir, *job.pair.fsdp, job.adapter.get(),
                                      {.extra_files = {{"progress.txt", "steps_done=2\n"}}}));
    FSDP_ASSERT_OK_AND_ASSIGN(StateDict model, FullStateDict(*job.pair.fsdp, {.rank0_only = true}));
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict optim,
                              optim_state::FullOptimStateDict(*job.pair.fsdp, *job.adapter, {}));
    if (group.rank() != 0) return;
    ASSERT_EQ(mkdir(reference.c_str(), 0755) == 0 || errno == EEXIST, true);
    FSDP_ASSERT_OK_AND_ASSIGN(internal::Pickled m, internal::PickleModel(model, "model.pt"));
    FSDP_ASSERT_OK_AND_ASSIGN(internal::Pickled o, internal::PickleOptim(optim, "optim.pt"));
    WriteWithLibTorch(m, reference + "/model.pt");
    WriteWithLibTorch(o, reference + "/optim.pt");
    for (const char* name : {"model.pt", "optim.pt"}) {
      SCOPED_TRACE(name);
      const std::string expected = ReadFileBytes(absl::StrCat(reference, "/", name));
      ASSERT_GT(expected.size(), 1000u);
      EXPECT_TRUE(ReadFileBytes(absl::StrCat(dir, "/", name)) == expected);
    }
    EXPECT_EQ(ReadFileBytes(dir + "/progress.txt"), "steps_done=2\n");
  });
  // Another world size and wrapping (inner.b inside inner's unit) loads the same values.
  const StrategyCase other{c.world_size == 2 ? 3 : 2, ShardingStrategy::kFullShard, false};
  RunPhase(2, other.world_size, [&](comm::ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(Job job, TrainedJob(group, other, /*nest_inner_b=*/false));
    FSDP_ASSERT_OK(LoadFullCheckpoint(dir, *job.pair.fsdp, job.adapter.get()));
    FSDP_ASSERT_OK_AND_ASSIGN(StateDict model, FullStateDict(*job.pair.fsdp, {.rank0_only = true}));
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict optim,
                              optim_state::FullOptimStateDict(*job.pair.fsdp, *job.adapter, {}));
    if (group.rank() != 0) return;
    FSDP_ASSERT_OK_AND_ASSIGN(ModelStateDict saved_model, ReadModelStateDict(dir + "/model.pt"));
    FSDP_ASSERT_OK_AND_ASSIGN(OptimStateDict saved_optim, ReadOptimStateDict(dir + "/optim.pt"));
    ASSERT_EQ(model.size(), saved_model.size());
    for (size_t i = 0; i < model.size(); ++i) {
      EXPECT_EQ(model[i].first, saved_model[i].first);
      EXPECT_TRUE(torch::equal(model[i].second, saved_model[i].second)) << model[i].first;
    }
    // Keys come in each optimizer's parameter order, which use_orig_params changes: compare in
    // the file's order.
    OptimStateDict reordered;
    for (const auto& [key, state] : saved_optim.state) {
      const optim_state::ParamState* loaded = optim.state.Find(key);
      ASSERT_NE(loaded, nullptr) << key.ToString();
      reordered.state.Set(key, *loaded);
    }
    reordered.param_groups = saved_optim.param_groups;
    EXPECT_EQ(optim.state.size(), saved_optim.state.size());
    EXPECT_EQ(optim_state::DiffOptimStateDicts(saved_optim, reordered), "");
  });
}

INSTANTIATE_TEST_SUITE_P(Strategies, SaveFullCheckpointTest,
                         ::testing::Values(StrategyCase{2, ShardingStrategy::kFullShard, false},
                                           StrategyCase{3, ShardingStrategy::kFullShard, true},
                                           StrategyCase{2, ShardingStrategy::kShardGradOp, false},
                                           StrategyCase{2, ShardingStrategy::kNoShard, true}),
                         fsdp::testing::StrategyCaseName);

std::vector<std::string> StagingLeftovers(const std::string& dir) {
  const size_t slash = dir.rfind('/');
  const std::string parent = dir.substr(0, slash);
  const std::string prefix = dir.substr(slash + 1) + ".tmp-";
  std::vector<std::string> found;
  if (DIR* d = opendir(parent.c_str())) {
    while (dirent* e = readdir(d)) {
      if (absl::StartsWith(e->d_name, prefix)) found.push_back(e->d_name);
    }
    closedir(d);
  }
  return found;
}

TEST(SaveFullCheckpoint, FailedWriteReportsTheFileOnEveryRankAndKeepsTheOldCheckpoint) {
  const std::string dir = testing::TmpDir("streamed_fsize");
  RunPhase(1, 2, [&](comm::ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(Job job, TrainedJob(group, {2, ShardingStrategy::kFullShard, false}));
    FSDP_ASSERT_OK(SaveFullCheckpoint(dir, *job.pair.fsdp, job.adapter.get()));
    const std::string old_model = ReadFileBytes(dir + "/model.pt");
    const std::string old_optim = ReadFileBytes(dir + "/optim.pt");
    fsdp::testing::TrainStep(*job.pair.fsdp, *job.pair.optim, 2);
    // model.pt fits under the limit, optim.pt does not.
    rlimit old_limit;
    ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old_limit), 0);
    if (group.rank() == 0) {
      std::signal(SIGXFSZ, SIG_IGN);
      rlimit limit = old_limit;
      limit.rlim_cur = old_model.size() + 512;
      ASSERT_LT(limit.rlim_cur, old_optim.size());
      ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &limit), 0);
    }
    EXPECT_THAT(SaveFullCheckpoint(dir, *job.pair.fsdp, job.adapter.get()),
                StatusIs(absl::StatusCode::kInternal,
                         AllOf(HasSubstr("SaveFullCheckpoint(" + dir + "): rank 0: "),
                               HasSubstr("/optim.pt"), HasSubstr("File too large"))));
    if (group.rank() != 0) return;
    ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &old_limit), 0);
    EXPECT_TRUE(ReadFileBytes(dir + "/model.pt") == old_model);
    EXPECT_TRUE(ReadFileBytes(dir + "/optim.pt") == old_optim);
    EXPECT_THAT(StagingLeftovers(dir), ::testing::IsEmpty());
  });
}

TEST(SaveFullCheckpoint, MissingParentDirectoryIsReportedOnEveryRank) {
  const std::string dir = testing::TmpDir("no_such_parent/ckpt");
  RunPhase(1, 2, [&](comm::ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(Job job, TrainedJob(group, {2, ShardingStrategy::kFullShard, false}));
    EXPECT_THAT(SaveFullCheckpoint(dir, *job.pair.fsdp, job.adapter.get()),
                StatusIs(absl::StatusCode::kInternal,
                         AllOf(HasSubstr("rank 0: "), HasSubstr("no_such_parent"))));
  });
}

}  // namespace
}  // namespace fsdp::checkpoint
