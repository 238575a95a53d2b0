// SaveDcpCheckpoint on real ranks: every rank writes its own __<rank>_0.distcp and the
// directory holds, read back by DcpReader, exactly the full model and optimizer state (FSDP's
// full_optim_state_dict) of the saving job, bit for bit, under torchtitan's keys, for flat and
// use_orig_params shards, NO_SHARD and at 2 and 3 ranks; WriteDcpFromFull writes the same
// entries from the full state. A failed write (RLIMIT_FSIZE on rank 1) fails on every rank naming
// rank 1's file, and the previous checkpoint stays whole. (PyTorch itself loads what we save in
// //tests/pytorch_peer:pytorch_peer_test, and //checkpoint:dcp_writer_test checks the format.)
#include "checkpoint/dcp_save.h"

#include <sys/resource.h>

#include <csignal>
#include <filesystem>
#include <string>
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

}  // namespace
}  // namespace fsdp::checkpoint
