// A collective sharded save (2 real ranks) killed with SIGKILL at each of its crash points, on
// rank 0 and on rank 1: afterwards DIR holds the old checkpoint or the new one, complete (read
// whole and checksum-verified), and the next save cleans up what the killed one left.
#include <sys/stat.h>
#include <torch/torch.h>

#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "checkpoint/atomic_dir.h"
#include "checkpoint/checkpoint_testutil.h"
#include "checkpoint/sharded_checkpoint.h"
#include "checkpoint/sharded_format.h"
#include "comm/multiprocess_testutil.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fsdp::checkpoint {
namespace {

using ::fsdp::testing::IsOk;
using ::fsdp::testing::IsRankProcess;
using namespace ::fsdp::checkpoint::testing;  // NOLINT

void CopyFile(const std::string& from, const std::string& to) {
  std::ifstream in(from, std::ios::binary);
  std::ofstream out(to, std::ios::binary | std::ios::trunc);
  out << in.rdbuf();
}

void CopyCheckpoint(const std::string& from, const std::string& to) {
  ASSERT_THAT(RemoveTree(to), IsOk());
  mkdir(to.c_str(), 0755);
  for (const char* name : {"metadata.json", "rank-0-of-2.safetensors", "rank-1-of-2.safetensors"}) {
    CopyFile(absl::StrCat(from, "/", name), absl::StrCat(to, "/", name));
  }
}

// Everything in the checkpoint, read whole (verifying every block read).
FullContents Contents(const std::string& dir) {
  auto reader = ShardedCheckpointReader::Open(dir);
  EXPECT_THAT(reader, IsOk());
  if (!reader.ok()) return {};
  auto contents = ReadFullContents(**reader);
  EXPECT_THAT(contents, IsOk());
  return contents.ok() ? *contents : FullContents{};
}

// "" if equal, else the first difference.
std::string Diff(const FullContents& a, const FullContents& b) {
  if (a.model.empty() || a.model.size() != b.model.size()) return "model keys differ";
  for (size_t i = 0; i < a.model.size(); ++i) {
    if (a.model[i].first != b.model[i].first ||
        !torch::equal(a.model[i].second, b.model[i].second)) {
      return absl::StrCat("model tensor ", a.model[i].first, " differs");
    }
  }
  return optim_state::DiffOptimStateDicts(a.optim, b.optim);
}

bool Same(const FullContents& a, const FullContents& b) { return Diff(a, b).empty(); }

TEST(ShardedCheckpointCrash, AKilledSaveLeavesTheOldOrTheNewCheckpoint) {
  const std::string root = TmpDir("crash");
  const std::string dir = root + "/ckpt";
  if (!IsRankProcess()) {
    ASSERT_THAT(RemoveTree(root), IsOk());
    mkdir(root.c_str(), 0755);
  }
  // The old checkpoint (1 step) and the new one (2 steps), for reference.
  RunPhase(1, 2, [&](comm::ProcessGroup& group) {
    auto job = MakeJob(Config{}, group);
    ASSERT_NE(job, nullptr);
    Train(*job, 0, 1);
    ASSERT_THAT(SaveShardedCheckpoint(root + "/old", *job->fsdp, job->adapter.get()), IsOk());
    Train(*job, 1, 2);
    ASSERT_THAT(SaveShardedCheckpoint(root + "/new", *job->fsdp, job->adapter.get()), IsOk());
  });
  FullContents old_contents, new_contents;
  if (!IsRankProcess()) {
    old_contents = Contents(root + "/old");
    new_contents = Contents(root + "/new");
    ASSERT_FALSE(Same(old_contents, new_contents));
  }
  int killed_runs = 0;
  for (int crash_rank : {0, 1}) {
    for (int k = 1; k < 30; ++k) {
      // The same number in the test process and in the rank processes (which run every
      // iteration's RunPhase and act on their own phase only).
      const int phase = 2 + 100 * crash_rank + k;
      SCOPED_TRACE(absl::StrCat("rank ", crash_rank, " killed at crash point ", k));
      const std::string done = absl::StrCat(root, "/done-", phase);
      if (!IsRankProcess()) CopyCheckpoint(root + "/old", dir);
      RunPhase(
          phase, 2,
          [&](comm::ProcessGroup& group) {
            auto job = MakeJob(Config{}, group);
            ASSERT_NE(job, nullptr);
            Train(*job, 0, 2);
            ASSERT_THAT(SaveShardedCheckpoint(dir, *job->fsdp, job->adapter.get()), IsOk());
            if (group.rank() == crash_rank) std::ofstream(done) << "done";
          },
          {{"FSDP_CHECKPOINT_CRASH_AT", std::to_string(k)},
           {"FSDP_CHECKPOINT_CRASH_RANK", std::to_string(crash_rank)}},
          /*expect_success=*/false);
      if (IsRankProcess()) continue;
      const FullContents now = Contents(dir);
      const bool is_old = Same(now, old_contents);
      const bool is_new = Same(now, new_contents);
      EXPECT_TRUE(is_old || is_new) << "from the old: " << Diff(old_contents, now)
                                    << "\nfrom the new: " << Diff(new_contents, now);
      struct stat st;
      if (stat(done.c_str(), &st) == 0) {  // the save ran to its end: no point k
        EXPECT_TRUE(is_new);
        EXPECT_GE(k, crash_rank == 0 ? 10 : 3);
        break;
      }
      ++killed_runs;
    }
  }
  if (IsRankProcess()) return;
  EXPECT_GE(killed_runs, 13);
  std::cout << killed_runs << " saves killed, each left a complete checkpoint\n";
}

}  // namespace
}  // namespace fsdp::checkpoint
