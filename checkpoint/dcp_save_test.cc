// SaveDcpCheckpoint on real ranks: every rank writes its own __<rank>_0.distcp and the
// directory holds, read back by DcpReader, exactly the full model and optimizer state (FSDP's
// full_optim_state_dict) of the saving job, bit for bit, under torchtitan's keys, for flat and
// use_orig_params shards, NO_SHARD and at 2 and 3 ranks; WriteDcpFromFull writes the same
// entries from the full state. A failed write (RLIMIT_FSIZE on rank 1) fails on every rank
// naming rank 1's file, and the previous checkpoint stays whole; a save SIGKILLed at any of its
// crash points on either rank leaves the old or the new checkpoint, complete. (PyTorch itself
// loads what we save in //tests/pytorch_peer:pytorch_peer_test, and //checkpoint:dcp_writer_test
// checks the format.)
#include "checkpoint/dcp_save.h"

#include <sys/resource.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <string>
#include <variant>
#include <vector>

#include "absl/strings/str_cat.h"
#include "checkpoint/checkpoint_testutil.h"
#include "checkpoint/dcp_reader.h"
#include "comm/multiprocess_testutil.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fsdp::checkpoint {
namespace {

using ::fsdp::testing::IsOk;
using ::fsdp::testing::IsRankProcess;
using ::fsdp::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;
using namespace ::fsdp::checkpoint::testing;  // NOLINT
using optim_state::StateValue;

// Python equality of a value read back and the one saved (floats bit for bit).
bool SameValue(const PyValue& got, const StateValue& want) {
  if (want.IsNone()) return got.is_none();
  if (const bool* b = want.GetIf<bool>()) return got.is_bool() && got.as_bool() == *b;
  if (const int64_t* i = want.GetIf<int64_t>()) return got.is_int() && got.as_int() == *i;
  if (const double* d = want.GetIf<double>()) return got.is_float() && got.as_float() == *d;
  if (const std::string* s = want.GetIf<std::string>()) return got.is_str() && got.as_str() == *s;
  if (const auto* seq = want.GetIf<optim_state::StateSequence>()) {
    if ((seq->is_tuple ? !got.is_tuple() : !got.is_list()) ||
        got.items().size() != seq->items.size()) {
      return false;
    }
    for (size_t k = 0; k < seq->items.size(); ++k) {
      if (!SameValue(got.items()[k], seq->items[k])) return false;
    }
    return true;
  }
  return false;
}

void ExpectSameTensor(dcp::DcpReader& reader, const std::string& key, const at::Tensor& want) {
  absl::StatusOr<at::Tensor> got = reader.ReadTensor(key);
  ASSERT_THAT(got, IsOk()) << key;
  EXPECT_EQ(got->scalar_type(), want.scalar_type()) << key;
  EXPECT_TRUE(torch::equal(*got, want.contiguous())) << key;
}

// DIR holds exactly `full`, under torchtitan's keys.
void ExpectDcpHolds(const std::string& dir, const FullState& full) {
  absl::StatusOr<std::unique_ptr<dcp::DcpReader>> reader = dcp::DcpReader::Open(dir);
  ASSERT_THAT(reader, IsOk());
  const dcp::DcpLayout layout = dcp::TorchtitanLayout();
  size_t entries = 0;
  for (const auto& [fqn, t] : full.model) {
    ExpectSameTensor(**reader, dcp::DcpModelKey(layout, fqn).key, t);
    ++entries;
  }
  for (const auto& [key, state] : full.optim.state) {
    for (const auto& [name, value] : state) {
      const std::string k = dcp::DcpOptimStateKey(layout, key.fqn(), name).key;
      ASSERT_TRUE(value.Is<at::Tensor>()) << k;
      ExpectSameTensor(**reader, k, value.Get<at::Tensor>());
      ++entries;
    }
  }
  for (size_t g = 0; g < full.optim.param_groups.size(); ++g) {
    const optim_state::ParamGroup& group = full.optim.param_groups[g];
    for (const auto& [name, value] : group.hyper_params) {
      const std::string k = dcp::DcpParamGroupKey(layout, static_cast<int64_t>(g), name).key;
      absl::StatusOr<PyValue> got = (*reader)->ReadObject(k);
      ASSERT_THAT(got, IsOk()) << k;
      EXPECT_TRUE(SameValue(*got, value)) << k << ": " << got->DebugString();
      ++entries;
    }
    absl::StatusOr<PyValue> params =
        (*reader)->ReadObject(dcp::DcpParamGroupKey(layout, static_cast<int64_t>(g), "params").key);
    ASSERT_THAT(params, IsOk());
    std::vector<StateValue> fqns;
    for (const optim_state::ParamKey& p : group.params) fqns.emplace_back(p.fqn());
    EXPECT_TRUE(SameValue(*params, StateValue::List(fqns))) << params->DebugString();
    ++entries;
  }
  EXPECT_EQ((*reader)->metadata().state_dict_metadata.size(), entries);
}

class DcpSaveTest : public ::testing::TestWithParam<Config> {};

TEST_P(DcpSaveTest, EveryRankWritesItsChunksAndTheDirectoryHoldsTheFullState) {
  const Config c = GetParam();
  const std::string root = TmpDir(absl::StrCat("dcp_save_", Name(c)));
  FreshRootDir(root);
  RunPhase(1, c.world_size, [&](comm::ProcessGroup& group) {
    auto job = MakeJob(c, group);
    ASSERT_NE(job, nullptr);
    Train(*job, 0, 2);
    const FullState full = Gather(*job);
    absl::StatusOr<SaveStats> saved =
        SaveDcpCheckpoint(root + "/dcp", *job->fsdp, job->adapter.get());
    ASSERT_THAT(saved, IsOk());
    if (group.rank() != 0) return;  // NO_SHARD: rank 0 writes everything, rank 1 an empty file
    EXPECT_GT(saved->bytes_written, 0);
    for (int r = 0; r < c.world_size; ++r) {
      EXPECT_TRUE(std::filesystem::exists(absl::StrCat(root, "/dcp/__", r, "_0.distcp"))) << r;
    }
    ExpectDcpHolds(root + "/dcp", full);
    // The same entries from the full state, as 3 ranks would lay them out.
    ASSERT_THAT(WriteDcpFromFull(root + "/from_full", full.model, &full.optim, 3), IsOk());
    ExpectDcpHolds(root + "/from_full", full);
  });
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, DcpSaveTest,
    ::testing::Values(C(3), C(3, Opt::kAdam, ShardingStrategy::kShardGradOp, true, true),
                      C(2, Opt::kSgd, ShardingStrategy::kNoShard)),
    [](const ::testing::TestParamInfo<Config>& info) { return Name(info.param); });

// Rank 1 may write no file larger than this during the failing save (SIGXFSZ ignored: its
// write fails with EFBIG, a real write error).
constexpr rlim_t kTinyFileLimit = 64;

TEST(DcpSave, FailedWriteFailsEveryRankNamingTheFileAndKeepsTheOldCheckpoint) {
  const std::string root = TmpDir("dcp_save_failed_write");
  const std::string dir = root + "/dcp";
  FreshRootDir(root);
  RunPhase(1, 2, [&](comm::ProcessGroup& group) {
    auto job = MakeJob(C(2), group);
    ASSERT_NE(job, nullptr);
    Train(*job, 0, 1);
    const FullState first = Gather(*job);
    ASSERT_THAT(SaveDcpCheckpoint(dir, *job->fsdp, job->adapter.get()), IsOk());
    Train(*job, 1, 2);

    rlimit old_limit;
    if (group.rank() == 1) old_limit = LimitFileSize(kTinyFileLimit);
    EXPECT_THAT(SaveDcpCheckpoint(dir, *job->fsdp, job->adapter.get()),
                StatusIs(absl::StatusCode::kInternal,
                         AllOf(HasSubstr("SaveDcpCheckpoint"), HasSubstr(dir),
                               HasSubstr("nothing saved: rank 1 failed"), HasSubstr("__1_0.distcp"),
                               HasSubstr("File too large"))));
    if (group.rank() == 1) RestoreFileSize(old_limit);
    if (group.rank() != 0) return;
    ExpectDcpHolds(dir, first);
    for (const auto& entry : std::filesystem::directory_iterator(root)) {
      EXPECT_EQ(entry.path().filename(), "dcp") << "a staging directory was left";
    }
  });
}

// Every entry of a DCP directory: tensors whole, bytes entries as stored. Empty if unreadable.
std::map<std::string, std::variant<at::Tensor, std::string>> DcpContents(const std::string& dir) {
  std::map<std::string, std::variant<at::Tensor, std::string>> out;
  auto reader = dcp::DcpReader::Open(dir);
  EXPECT_THAT(reader, IsOk());
  if (!reader.ok()) return out;
  for (const auto& [key, entry] : (*reader)->metadata().state_dict_metadata) {
    if (std::holds_alternative<dcp::TensorStorageMetadata>(entry)) {
      auto t = (*reader)->ReadTensor(key);
      EXPECT_THAT(t, IsOk());
      if (t.ok()) out.emplace(key, *t);
    } else {
      auto b = (*reader)->ReadBytes(key);
      EXPECT_THAT(b, IsOk());
      if (b.ok()) out.emplace(key, *b);
    }
  }
  return out;
}

bool SameContents(const std::map<std::string, std::variant<at::Tensor, std::string>>& a,
                  const std::map<std::string, std::variant<at::Tensor, std::string>>& b) {
  if (a.empty() || a.size() != b.size()) return false;
  for (const auto& [key, value] : a) {
    auto it = b.find(key);
    if (it == b.end() || value.index() != it->second.index()) return false;
    const bool same = value.index() == 0 ? torch::equal(std::get<0>(value), std::get<0>(it->second))
                                         : std::get<1>(value) == std::get<1>(it->second);
    if (!same) return false;
  }
  return true;
}

// A 2-rank DCP save SIGKILLed at each of its crash points, on rank 0 and on rank 1: DIR holds
// the old checkpoint or the new one, complete, every time.
TEST(DcpSave, AKilledSaveLeavesTheOldOrTheNewCheckpoint) {
  const std::string root = TmpDir("dcp_save_crash");
  const std::string dir = root + "/dcp";
  FreshRootDir(root);
  RunPhase(1, 2, [&](comm::ProcessGroup& group) {
    auto job = MakeJob(C(2), group);
    ASSERT_NE(job, nullptr);
    Train(*job, 0, 1);
    ASSERT_THAT(SaveDcpCheckpoint(root + "/old", *job->fsdp, job->adapter.get()), IsOk());
    Train(*job, 1, 2);
    ASSERT_THAT(SaveDcpCheckpoint(root + "/new", *job->fsdp, job->adapter.get()), IsOk());
  });
  const bool launcher = !IsRankProcess();
  const auto old_contents = launcher ? DcpContents(root + "/old") : decltype(DcpContents("")){};
  const auto new_contents = launcher ? DcpContents(root + "/new") : decltype(DcpContents("")){};
  if (launcher) {
    ASSERT_FALSE(SameContents(old_contents, new_contents));
  }
  int killed = 0;
  for (int crash_rank : {0, 1}) {
    for (int k = 1; k < 20; ++k) {
      const int phase = 2 + 100 * crash_rank + k;  // the same in every process
      SCOPED_TRACE(absl::StrCat("rank ", crash_rank, " killed at crash point ", k));
      const std::string done = absl::StrCat(root, "/done-", phase);
      if (launcher) {
        ASSERT_THAT(RemoveTree(dir), IsOk());
        std::filesystem::copy(root + "/old", dir);
      }
      RunPhase(
          phase, 2,
          [&](comm::ProcessGroup& group) {
            auto job = MakeJob(C(2), group);
            ASSERT_NE(job, nullptr);
            Train(*job, 0, 2);
            ASSERT_THAT(SaveDcpCheckpoint(dir, *job->fsdp, job->adapter.get()), IsOk());
            if (group.rank() == crash_rank) std::ofstream(done) << "done";
          },
          {{"FSDP_CHECKPOINT_CRASH_AT", std::to_string(k)},
           {"FSDP_CHECKPOINT_CRASH_RANK", std::to_string(crash_rank)}},
          /*expect_success=*/false);
      if (!launcher) continue;
      const auto now = DcpContents(dir);
      const bool is_new = SameContents(now, new_contents);
      EXPECT_TRUE(is_new || SameContents(now, old_contents));
      if (std::filesystem::exists(done)) {  // the save ran to its end: no point k
        EXPECT_TRUE(is_new);
        break;
      }
      ++killed;
    }
  }
  if (!launcher) return;
  EXPECT_GE(killed, 6);
  std::cout << killed << " DCP saves killed, each left a complete checkpoint\n";
}

}  // namespace
}  // namespace fsdp::checkpoint
