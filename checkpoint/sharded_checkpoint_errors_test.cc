// Sharded checkpoints that must be refused, on real ranks: truncated, flipped, missing,
// foreign and damaged files, metadata of another model, unknown formats and versions. Each
// gets its own error naming the file (and tensor), the same on every rank, and leaves the model
// and the optimizer exactly as they were. Also: how many bytes each rank reads.
#include <sys/stat.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "checkpoint/atomic_dir.h"
#include "checkpoint/checkpoint_testutil.h"
#include "checkpoint/sharded_checkpoint.h"
#include "checkpoint/file_testutil.h"
#include "checkpoint/sharded_format.h"
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

// A wide MLP (4 x Linear(d, d)), only the root wrapped: for byte counts and timings.
class WideImpl : public torch::nn::Module {
 public:
  explicit WideImpl(int64_t d) {
    for (int i = 0; i < 4; ++i) {
      layers.push_back(register_module(absl::StrCat("l", i), torch::nn::Linear(d, d)));
    }
  }
  torch::Tensor forward(torch::Tensor x) {
    for (auto& l : layers) x = torch::relu(l->forward(x));
    return x;
  }
  std::vector<torch::nn::Linear> layers;
};
TORCH_MODULE(Wide);

struct WideJob {
  Wide model{nullptr};
  std::unique_ptr<FullyShardedDataParallel> fsdp;
  std::unique_ptr<torch::optim::Adam> optim;
  std::unique_ptr<optim_state::OptimizerAdapter> adapter;
};

std::unique_ptr<WideJob> MakeWide(int64_t d, comm::ProcessGroup& group) {
  auto job = std::make_unique<WideJob>();
  torch::manual_seed(0);
  job->model = Wide(d);
  auto fsdp = FullyShardedDataParallel::Wrap(job->model, Borrow(group), {});
  EXPECT_THAT(fsdp, IsOk());
  if (!fsdp.ok()) return nullptr;
  job->fsdp = std::move(*fsdp);
  job->optim = std::make_unique<torch::optim::Adam>(job->fsdp->parameters(),
                                                    torch::optim::AdamOptions(1e-3));
  auto adapter = optim_state::OptimizerAdapter::Create(*job->optim);
  EXPECT_THAT(adapter, IsOk());
  job->adapter = std::make_unique<optim_state::OptimizerAdapter>(std::move(*adapter));
  job->optim->zero_grad();
  torch::manual_seed(1);
  job->fsdp->forward(torch::randn({4, d})).sum().backward();
  EXPECT_THAT(job->adapter->Step(), IsOk());
  return job;
}

// ---------------------------------------------------------------- files

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

struct Damage {
  std::string name;
  absl::StatusCode code;
  std::vector<std::string> substrings;
};

// The damaged checkpoints (made by the test process from `good`, `good2` and `other`).
std::vector<Damage> Damages() {
  using C = absl::StatusCode;
  return {
      {"truncated", C::kDataLoss, {"rank-1-of-2.safetensors", "truncated"}},
      {"flipped", C::kDataLoss, {"rank-0-of-2.safetensors", "checksum mismatch", "optim/"}},
      {"missing", C::kNotFound, {"rank-1-of-2.safetensors", "no such file"}},
      {"foreign", C::kDataLoss, {"rank-1-of-2.safetensors", "belongs to another checkpoint"}},
      {"header", C::kDataLoss, {"rank-0-of-2.safetensors", "header JSON is damaged"}},
      {"other_model",
       C::kInvalidArgument,
       {"does not fit the model", "Missing key(s)", "\"bias\"", "Unexpected key(s)",
        "\"l0.weight\""}},
      {"shape",
       C::kInvalidArgument,
       {"size mismatch for block0.weight", "torch.Size([3, 5]) from checkpoint"}},
      {"no_metadata", C::kNotFound, {"metadata.json: no such file"}},
      {"version", C::kInvalidArgument, {"metadata.json", "format version 7 is not supported"}},
      {"foreign_metadata", C::kInvalidArgument, {"not an fsdp-cpp-sharded checkpoint"}},
      {"metadata_truncated", C::kDataLoss, {"metadata.json: not valid JSON"}},
      {"size_out_of_bounds", C::kInvalidArgument, {"metadata.json", "out of bounds"}},
  };
}

void MakeDamaged(const std::string& root) {
  const std::string good = root + "/good";
  for (const Damage& d : Damages()) {
    const std::string dir = absl::StrCat(root, "/", d.name);
    CopyCheckpoint(d.name == "other_model" ? root + "/other" : good, dir);
    const std::string r0 = dir + "/rank-0-of-2.safetensors";
    const std::string r1 = dir + "/rank-1-of-2.safetensors";
    const std::string meta = dir + "/metadata.json";
    if (d.name == "truncated") {
      ASSERT_EQ(truncate(r1.c_str(), static_cast<off_t>(ReadFileBytes(r1).size() - 7)), 0);
    } else if (d.name == "flipped") {
      std::string bytes = ReadFileBytes(r0);
      bytes[bytes.size() - 3] ^= 0x10;  // in the last piece's data (optimizer state)
      WriteFileBytes(r0, bytes);
    } else if (d.name == "missing") {
      ASSERT_EQ(unlink(r1.c_str()), 0);
    } else if (d.name == "foreign") {
      CopyFile(root + "/good2/rank-1-of-2.safetensors", r1);
    } else if (d.name == "header") {
      std::string bytes = ReadFileBytes(r0);
      bytes[9] = '#';  // inside the JSON header
      WriteFileBytes(r0, bytes);
    } else if (d.name == "shape") {
      std::string text = ReadFileBytes(meta);
      const std::string from =
          "\"fqn\": \"block0.weight\",\n   \"state\": \"\",\n   \"shape\": [\n    5,\n    3\n   ]";
      ASSERT_NE(text.find(from), std::string::npos);
      // [5, 3] -> [3, 5]: the pieces still tile the 15 elements, the shape differs.
      text = absl::StrReplaceAll(text,
                                 {{from, absl::StrReplaceAll(from, {{"5,\n    3", "3,\n    5"}})}});
      WriteFileBytes(meta, text);
    } else if (d.name == "no_metadata") {
      ASSERT_EQ(unlink(meta.c_str()), 0);
    } else if (d.name == "version") {
      WriteFileBytes(meta, absl::StrReplaceAll(ReadFileBytes(meta), {{"\"version\": 1,", "\"version\": 7,"}}));
    } else if (d.name == "foreign_metadata") {
      WriteFileBytes(meta, "{\"format\": \"something-else\", \"tensors\": []}");
    } else if (d.name == "metadata_truncated") {
      const std::string text = ReadFileBytes(meta);
      WriteFileBytes(meta, text.substr(0, text.size() / 2));
    } else if (d.name == "size_out_of_bounds") {
      std::string text = ReadFileBytes(meta);
      const size_t at = text.find("\"header_bytes\": ");
      ASSERT_NE(at, std::string::npos);
      const size_t end = text.find(',', at);
      text = text.substr(0, at) + "\"header_bytes\": 99999999999" + text.substr(end);
      WriteFileBytes(meta, text);
    }
  }
}

// Everything a load could change on this rank: flat shards, unmanaged parameters, optimizer.
struct Snapshot {
  std::vector<at::Tensor> tensors;
  optim_state::OptimStateDict optim;
};

Snapshot Take(Job& job) {
  Snapshot s;
  for (const at::Tensor& p : job.fsdp->parameters()) s.tensors.push_back(p.detach().clone());
  auto optim = job.adapter->StateDict();
  EXPECT_THAT(optim, IsOk());
  s.optim = optim_state::CloneOptimStateDict(*optim);
  return s;
}

void ExpectUnchanged(const Snapshot& before, Job& job) {
  const Snapshot now = Take(job);
  ASSERT_EQ(before.tensors.size(), now.tensors.size());
  for (size_t i = 0; i < now.tensors.size(); ++i) {
    EXPECT_TRUE(torch::equal(before.tensors[i], now.tensors[i])) << "parameter " << i;
  }
  EXPECT_EQ(optim_state::DiffOptimStateDicts(before.optim, now.optim), "");
}

TEST(ShardedCheckpointErrors, DamagedCheckpointsAreRefusedAndChangeNothing) {
  const std::string root = TmpDir("damage");
  if (!IsRankProcess()) {
    ASSERT_THAT(RemoveTree(root), IsOk());
    mkdir(root.c_str(), 0755);
  }
  RunPhase(1, 2, [&](comm::ProcessGroup& group) {
    auto job = MakeJob(Config{}, group);
    ASSERT_NE(job, nullptr);
    Train(*job, 0, 1);
    ASSERT_THAT(SaveShardedCheckpoint(root + "/good", *job->fsdp, job->adapter.get()), IsOk());
    ASSERT_THAT(SaveShardedCheckpoint(root + "/good2", *job->fsdp, job->adapter.get()), IsOk());
    auto wide = MakeWide(8, group);
    ASSERT_NE(wide, nullptr);
    ASSERT_THAT(SaveShardedCheckpoint(root + "/other", *wide->fsdp, wide->adapter.get()), IsOk());
  });
  if (!IsRankProcess()) MakeDamaged(root);
  RunPhase(2, 2, [&](comm::ProcessGroup& group) {
    auto job = MakeJob(Config{}, group);
    ASSERT_NE(job, nullptr);
    Train(*job, 0, 2);  // differs from the checkpoint
    for (const Damage& d : Damages()) {
      SCOPED_TRACE(d.name);
      const Snapshot before = Take(*job);
      auto loaded =
          LoadShardedCheckpoint(absl::StrCat(root, "/", d.name), *job->fsdp, job->adapter.get());
      EXPECT_THAT(loaded, StatusIs(d.code, HasSubstr("LoadShardedCheckpoint")));
      for (const std::string& s : d.substrings) {
        EXPECT_THAT(loaded, StatusIs(d.code, HasSubstr(s)));
      }
      ExpectUnchanged(before, *job);
    }
    // The intact checkpoint loads.
    EXPECT_THAT(LoadShardedCheckpoint(root + "/good", *job->fsdp, job->adapter.get()), IsOk());
  });
}

TEST(ShardedCheckpointErrors, OptimizerMismatchesAreRefusedAndChangeNothing) {
  const std::string root = TmpDir("optim_mismatch");
  if (!IsRankProcess()) {
    ASSERT_THAT(RemoveTree(root), IsOk());
    mkdir(root.c_str(), 0755);
  }
  RunPhase(1, 2, [&](comm::ProcessGroup& group) {
    auto job = MakeJob(Config{}, group);
    ASSERT_NE(job, nullptr);
    Train(*job, 0, 1);
    ASSERT_THAT(SaveShardedCheckpoint(root + "/adam", *job->fsdp, job->adapter.get()), IsOk());
    ASSERT_THAT(SaveShardedCheckpoint(root + "/model_only", *job->fsdp, nullptr), IsOk());

    // Adam state into SGD.
    Config sgd;
    sgd.opt = Opt::kSgd;
    auto other = MakeJob(sgd, group);
    ASSERT_NE(other, nullptr);
    Train(*other, 0, 1);
    Snapshot before = Take(*other);
    EXPECT_THAT(LoadShardedCheckpoint(root + "/adam", *other->fsdp, other->adapter.get()),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'step'")));
    ExpectUnchanged(before, *other);

    // No optimizer state in the checkpoint.
    before = Take(*job);
    EXPECT_THAT(
        LoadShardedCheckpoint(root + "/model_only", *job->fsdp, job->adapter.get()),
        StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("holds no optimizer state")));
    ExpectUnchanged(before, *job);
    // ... but the model alone loads.
    EXPECT_THAT(LoadShardedCheckpoint(root + "/model_only", *job->fsdp, nullptr), IsOk());
  });
}

// Rank r of M reads about 1/M of the data (plus metadata.json and headers).
TEST(ShardedCheckpointBytes, EachRankReadsOnlyItsShare) {
  const std::string root = TmpDir("bytes");
  constexpr int64_t kBlock = 16 << 10;
  constexpr int64_t kDim = 512;
  if (!IsRankProcess()) {
    ASSERT_THAT(RemoveTree(root), IsOk());
    mkdir(root.c_str(), 0755);
  }
  RunPhase(1, 4, [&](comm::ProcessGroup& group) {
    auto job = MakeWide(kDim, group);
    ASSERT_NE(job, nullptr);
    auto saved = SaveShardedCheckpoint(root + "/ckpt", *job->fsdp, job->adapter.get(),
                                       {.block_bytes = kBlock});
    ASSERT_THAT(saved, IsOk());
    std::ofstream(absl::StrCat(root, "/save-", group.rank()))
        << saved->seconds << " " << saved->bytes_written;
  });
  for (int m : {2, 3}) {
    RunPhase(1 + m, m, [&](comm::ProcessGroup& group) {
      auto job = MakeWide(kDim, group);
      ASSERT_NE(job, nullptr);
      auto loaded = LoadShardedCheckpoint(root + "/ckpt", *job->fsdp, job->adapter.get());
      ASSERT_THAT(loaded, IsOk());
      std::ofstream(absl::StrCat(root, "/load-", m, "-", group.rank()))
          << loaded->seconds << " " << loaded->read.bytes_read << " "
          << loaded->read.data_bytes_read;
    });
  }
  if (IsRankProcess()) return;
  auto reader = ShardedCheckpointReader::Open(root + "/ckpt");
  ASSERT_THAT(reader, IsOk());
  int64_t data = 0, pieces = 0;
  for (const TensorRecord& t : (*reader)->metadata().tensors) {
    for (const PieceRecord& p : t.pieces) {
      data += p.bytes;
      ++pieces;
    }
  }
  double save_seconds = 0;
  int64_t written = 0;
  std::ifstream(root + "/save-0") >> save_seconds >> written;
  std::cout << "checkpoint of Wide(" << kDim << ") + Adam: " << data << " data bytes in " << pieces
            << " pieces over 4 files; rank 0 saved in " << save_seconds << " s\n";
  for (int m : {2, 3}) {
    int64_t sum = 0;
    for (int r = 0; r < m; ++r) {
      double seconds = 0;
      int64_t bytes = 0, data_bytes = 0;
      std::ifstream(absl::StrCat(root, "/load-", m, "-", r)) >> seconds >> bytes >> data_bytes;
      std::cout << "load at world size " << m << ", rank " << r << ": read " << bytes << " bytes ("
                << data_bytes << " data) in " << seconds << " s\n";
      // Its share, plus at most two partial blocks per piece it touches.
      EXPECT_LE(data_bytes, data / m + 2 * kBlock * pieces) << "rank " << r << " of " << m;
      EXPECT_GE(data_bytes, data / m / 2) << "rank " << r << " of " << m;
      EXPECT_LE(bytes - data_bytes, int64_t{1} << 20) << "metadata and headers";
      sum += data_bytes;
    }
    EXPECT_GE(sum, data);
  }
}

}  // namespace
}  // namespace fsdp::checkpoint
