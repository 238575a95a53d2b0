// The sharded format offline (no process group): a checkpoint written from whole tensors reads
// back equal (whole tensors, ranges, full contents); Verify reports each damaged range;
// hostile metadata (sizes far beyond the files) is refused before anything is allocated;
// DetectCheckpointKind; a save SIGKILLed at each crash point leaves the old or the new
// checkpoint, complete.
#include "checkpoint/sharded_format.h"

#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "checkpoint/atomic_dir.h"
#include "checkpoint/file_testutil.h"
#include "comm/multiprocess_testutil.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "optim_state/optim_state_dict.h"

namespace fsdp::checkpoint {
namespace {

using ::fsdp::testing::IsOk;
using ::fsdp::testing::StatusIs;
using optim_state::OptimStateDict;
using optim_state::ParamKey;
using optim_state::StateValue;
using ::testing::HasSubstr;
using testing::FreshTestDir;
using testing::ReadFileBytes;
using testing::WriteFileBytes;

using Model = std::vector<std::pair<std::string, at::Tensor>>;

// A model with a shared tensor, int64 and bool buffers, and an optimizer dict with every kind
// of value; all values offset by `v`.
Model MakeModel(float v) {
  at::Tensor shared = torch::arange(60, torch::kFloat).view({6, 10}) + v;
  return {{"emb.weight", shared},
          {"out.weight", shared},
          {"out.bias", torch::linspace(-1, 1, 7) + v},
          {"bn.num_batches_tracked", torch::tensor(int64_t{7})},
          {"mask", torch::tensor({true, false, true})},
          {"empty", torch::zeros({0, 3})}};
}

OptimStateDict MakeOptim(float v) {
  OptimStateDict d;
  optim_state::ParamState s;
  s.Set("exp_avg", StateValue(torch::randn({6, 10}) + v));
  s.Set("step", StateValue(torch::tensor(3.0f + v)));
  s.Set("value1", StateValue(2.74));
  s.Set("value2", StateValue::None());
  s.Set("nan", StateValue(std::nan("")));
  d.state.Set(ParamKey::Fqn("emb.weight"), s);
  optim_state::ParamGroup g;
  g.hyper_params.Set("lr", StateValue(0.01));
  g.hyper_params.Set("betas", StateValue::Tuple({StateValue(0.9), StateValue(0.999)}));
  g.hyper_params.Set("weight_decay", StateValue(0));
  g.hyper_params.Set("foreach", StateValue::None());
  g.hyper_params.Set("name", StateValue("group0"));
  g.params = {ParamKey::Fqn("emb.weight"), ParamKey::Fqn("out.bias")};
  d.param_groups.push_back(g);
  return d;
}

// Full contents equal (full_optim_state_dict's value order: tensors, zero-dim, others by name).
void ExpectContents(const FullContents& c, const Model& model, const OptimStateDict& optim) {
  ASSERT_EQ(c.model.size(), model.size());
  for (size_t i = 0; i < model.size(); ++i) {
    EXPECT_EQ(c.model[i].first, model[i].first);
    EXPECT_TRUE(torch::equal(c.model[i].second, model[i].second)) << model[i].first;
  }
  ASSERT_TRUE(c.has_optim);
  const optim_state::ParamState& got = *c.optim.state.Find(ParamKey::Fqn("emb.weight"));
  const optim_state::ParamState& want = *optim.state.Find(ParamKey::Fqn("emb.weight"));
  EXPECT_EQ(got.Keys(), (std::vector<std::string>{"exp_avg", "step", "nan", "value1", "value2"}));
  for (const auto& [name, value] : want) {
    EXPECT_EQ(optim_state::DiffStateValues(value, *got.Find(name)), "") << name;
  }
  ASSERT_EQ(c.optim.param_groups.size(), 1u);
  EXPECT_EQ(optim_state::DiffOptimStateDicts(OptimStateDict{{}, optim.param_groups, true},
                                             OptimStateDict{{}, c.optim.param_groups, true}),
            "");
}

TEST(ShardedFormat, OfflineWriteThenReadGivesTheSameContents) {
  const std::string dir = FreshTestDir("fmt_roundtrip");
  const Model model = MakeModel(0);
  const OptimStateDict optim = MakeOptim(0);
  ASSERT_THAT(WriteShardedFromFull(dir, model, &optim, 3, /*block_bytes=*/16), IsOk());
  auto kind = DetectCheckpointKind(dir);
  ASSERT_THAT(kind, IsOk());
  EXPECT_EQ(*kind, CheckpointKind::kSharded);
  auto reader = ShardedCheckpointReader::Open(dir);
  ASSERT_THAT(reader, IsOk());
  const ShardedMetadata& m = (*reader)->metadata();
  EXPECT_EQ(m.world_size, 3);
  EXPECT_EQ(m.files.size(), 3u);
  // The shared tensor is stored once.
  EXPECT_EQ(m.FindTensor("model/out.weight"), nullptr);
  EXPECT_EQ(m.model_keys[1], (std::pair<std::string, std::string>("out.weight", "emb.weight")));
  auto contents = ReadFullContents(**reader);
  ASSERT_THAT(contents, IsOk());
  ExpectContents(*contents, model, optim);
  // A range across pieces.
  at::Tensor out = at::empty({25});
  ASSERT_THAT((*reader)->ReadRange(*m.FindTensor("model/emb.weight"), 13, 38, out), IsOk());
  EXPECT_TRUE(torch::equal(out, torch::arange(13, 38, torch::kFloat)));
  auto bad = (*reader)->Verify();
  ASSERT_THAT(bad, IsOk());
  EXPECT_TRUE(bad->empty());
}

TEST(ShardedFormat, VerifyReportsEachDamagedRange) {
  const std::string dir = FreshTestDir("fmt_verify");
  const Model model = MakeModel(0);
  ASSERT_THAT(WriteShardedFromFull(dir, model, nullptr, 2, /*block_bytes=*/16), IsOk());
  auto reader = ShardedCheckpointReader::Open(dir);
  ASSERT_THAT(reader, IsOk());
  const PieceRecord p = (*reader)->metadata().FindTensor("model/emb.weight")->pieces[1];
  ASSERT_EQ(p.file, 1);
  reader->reset();
  const std::string file = dir + "/rank-1-of-2.safetensors";
  std::string bytes = ReadFileBytes(file);
  bytes[static_cast<size_t>(p.offset + 3)] ^= 1;   // block 0 of the piece
  bytes[static_cast<size_t>(p.offset + 40)] ^= 1;  // block 2
  WriteFileBytes(file, bytes);
  reader = ShardedCheckpointReader::Open(dir);
  ASSERT_THAT(reader, IsOk());
  auto bad = (*reader)->Verify();
  ASSERT_THAT(bad, IsOk());
  ASSERT_EQ(bad->size(), 2u);
  EXPECT_EQ((*bad)[0].file, "rank-1-of-2.safetensors");
  EXPECT_EQ((*bad)[0].tensor, "model/emb.weight");
  EXPECT_EQ((*bad)[0].offset, p.offset);
  EXPECT_EQ((*bad)[0].bytes, 16);
  EXPECT_EQ((*bad)[1].offset, p.offset + 32);
  // Reading the damaged tensor fails; a range in an intact block of it still reads.
  EXPECT_THAT((*reader)->ReadTensor(*(*reader)->metadata().FindTensor("model/emb.weight")),
              StatusIs(absl::StatusCode::kDataLoss,
                       HasSubstr("rank-1-of-2.safetensors: checksum mismatch in bytes")));
  at::Tensor out = at::empty({2});
  const int64_t begin = p.begin + 4;  // bytes 16..24 of the piece: block 1, intact
  EXPECT_THAT((*reader)->ReadRange(*(*reader)->metadata().FindTensor("model/emb.weight"), begin,
                                   begin + 2, out),
              IsOk());
}

TEST(ShardedFormat, HostileSizesAreRefusedBeforeAllocating) {
  const std::string dir = FreshTestDir("fmt_hostile");
  ASSERT_THAT(WriteShardedFromFull(dir, MakeModel(0), nullptr, 2), IsOk());
  const std::string meta = ReadFileBytes(dir + "/metadata.json");
  auto expect = [&](const std::string& from, const std::string& to, absl::StatusCode code,
                    const std::string& text) {
    ASSERT_NE(meta.find(from), std::string::npos) << from;
    WriteFileBytes(dir + "/metadata.json", absl::StrReplaceAll(meta, {{from, to}}));
    auto reader = ShardedCheckpointReader::Open(dir);
    absl::Status s = reader.status();
    if (s.ok()) {
      s = (*reader)->ReadTensor((*reader)->metadata().tensors[0]).status();
    }
    EXPECT_THAT(s, StatusIs(code, HasSubstr(text))) << from << " -> " << to;
  };
  // A header far larger than any file, a file "size" of a petabyte (the real file is small),
  // a shape of 2^80 elements, negative sizes.
  expect("\"header_bytes\": ", "\"header_bytes\": 9", absl::StatusCode::kInvalidArgument,
         "out of bounds");
  expect("\"size\": ", "\"size\": 1000000000", absl::StatusCode::kDataLoss, "truncated");
  expect("\"shape\": [\n    6,", "\"shape\": [\n    1099511627776, 1099511627776,",
         absl::StatusCode::kInvalidArgument, "shape too large");
  expect("\"begin\": 0", "\"begin\": -5", absl::StatusCode::kInvalidArgument, "do not tile");
  // A 100-byte data file whose header claims 2^60 bytes.
  WriteFileBytes(dir + "/metadata.json", meta);
  std::string tiny(100, ' ');
  tiny[7] = 0x10;
  WriteFileBytes(dir + "/rank-0-of-2.safetensors", tiny);
  auto reader = ShardedCheckpointReader::Open(dir);
  ASSERT_THAT(reader, IsOk());
  EXPECT_THAT((*reader)->ReadTensor((*reader)->metadata().tensors[0]),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("rank-0-of-2.safetensors")));
}

int OpenDescriptors() {
  int n = 0;
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    (void)entry;
    ++n;
  }
  return n;
}

// Found by sharded_data_fuzz: each read of a data file that had failed its checks opened the
// file again and leaked the descriptor of the previous attempt.
TEST(ShardedFormat, ARefusedDataFileLeavesNoDescriptorOpen) {
  const std::string dir = FreshTestDir("fmt_fd_leak");
  ASSERT_THAT(WriteShardedFromFull(dir, MakeModel(0), nullptr, 2), IsOk());
  const std::string file = dir + "/rank-0-of-2.safetensors";
  std::string bytes = ReadFileBytes(file);
  bytes[10] ^= 1;  // inside the header: its checksum no longer matches
  WriteFileBytes(file, bytes);
  const int before = OpenDescriptors();
  {
    auto reader = ShardedCheckpointReader::Open(dir);
    ASSERT_THAT(reader, IsOk());
    const TensorRecord& t = *(*reader)->metadata().FindTensor("model/emb.weight");
    for (int i = 0; i < 20; ++i) {
      EXPECT_THAT((*reader)->ReadTensor(t),
                  StatusIs(absl::StatusCode::kDataLoss,
                           HasSubstr("rank-0-of-2.safetensors: header checksum mismatch")));
    }
    auto bad = (*reader)->Verify();
    ASSERT_THAT(bad, IsOk());
    EXPECT_FALSE(bad->empty());
    EXPECT_LE(OpenDescriptors(), before + 2);  // at most one per data file
  }
  EXPECT_EQ(OpenDescriptors(), before);
}

// Rewrites DIR/metadata.json after `edit` (the metadata as read).
template <typename Edit>
void EditMetadata(const std::string& dir, Edit edit) {
  auto m = MetadataFromJson(ReadFileBytes(dir + "/metadata.json"), "metadata.json");
  ASSERT_THAT(m, IsOk());
  edit(*m);
  WriteFileBytes(dir + "/metadata.json", MetadataToJson(*m));
}

// Found while writing sharded_data_fuzz (its inputs are regress_claimed_*_bytes in
// fuzz_corpus/sharded_data/): a few hundred bytes of metadata.json sized allocations of
// gigabytes to terabytes, by claims that only later reads would have refuted.
TEST(ShardedFormat, ClaimedSizesDoNotSizeAllocations) {
  const std::string dir = FreshTestDir("fmt_claims");
  const OptimStateDict optim = MakeOptim(0);
  ASSERT_THAT(WriteShardedFromFull(dir, MakeModel(0), &optim, 1, /*block_bytes=*/16), IsOk());
  const std::string intact = ReadFileBytes(dir + "/metadata.json");

  // 1. A 4 TiB piece in a file whose claimed size makes room for it, with 1 TiB blocks so that
  // four checksums cover it: the real file is checked before the tensor is allocated.
  EditMetadata(dir, [](ShardedMetadata& m) {
    m.block_bytes = int64_t{1} << 40;
    for (TensorRecord& t : m.tensors) {
      for (PieceRecord& p : t.pieces) p.block_xxh64.resize(p.bytes > 0 ? 1 : 0);
    }
    TensorRecord& t = m.tensors[0];
    t.shape = {int64_t{1} << 40};
    t.pieces[0].end = int64_t{1} << 40;
    t.pieces[0].bytes = int64_t{4} << 40;
    t.pieces[0].block_xxh64.resize(4);
    t.pieces[0].offset = m.files[0].size;  // after every other piece's bytes
    m.files[0].size = t.pieces[0].offset + t.pieces[0].bytes + 100;
  });
  auto reader = ShardedCheckpointReader::Open(dir);
  ASSERT_THAT(reader, IsOk());
  EXPECT_THAT(
      (*reader)->ReadTensor((*reader)->metadata().tensors[0]),
      StatusIs(absl::StatusCode::kDataLoss, HasSubstr("rank-0-of-1.safetensors: truncated: ")));

  // 2. Zeros (state no rank held) of 24 GiB for a parameter of 60 elements.
  WriteFileBytes(dir + "/metadata.json", intact);
  EditMetadata(dir, [](ShardedMetadata& m) {
    for (TensorRecord& t : m.tensors) {
      if (t.key != "optim/emb.weight/exp_avg") continue;
      t.shape = {6, int64_t{1} << 30};
      t.pieces.push_back(PieceRecord{-1, t.pieces.back().end, t.numel(), 0, 0, {}});
    }
  });
  EXPECT_THAT(ShardedCheckpointReader::Open(dir).status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("tensor 'optim/emb.weight/exp_avg' holds zeros (state no rank "
                                 "held) but is not shaped as the stored parameter "
                                 "'model/emb.weight'")));

  // Zeros shaped as their parameter (what a save with use_orig_params writes) still read.
  WriteFileBytes(dir + "/metadata.json", intact);
  EditMetadata(dir, [](ShardedMetadata& m) {
    for (TensorRecord& t : m.tensors) {
      if (t.key == "optim/emb.weight/exp_avg") t.pieces = {PieceRecord{-1, 0, 60, 0, 0, {}}};
    }
  });
  reader = ShardedCheckpointReader::Open(dir);
  ASSERT_THAT(reader, IsOk());
  auto zeros = (*reader)->ReadTensor(*(*reader)->metadata().FindTensor("optim/emb.weight/exp_avg"));
  ASSERT_THAT(zeros, IsOk());
  EXPECT_TRUE(torch::equal(*zeros, torch::zeros({6, 10})));

  // 3. One stretch of file bytes claimed by two pieces (a tensor could repeat a file's bytes as
  // often as metadata.json lists them).
  WriteFileBytes(dir + "/metadata.json", intact);
  EditMetadata(dir, [](ShardedMetadata& m) {
    for (TensorRecord& t : m.tensors) {
      if (t.key != "model/out.bias") continue;
      PieceRecord again = t.pieces[0];
      again.begin = 7;
      again.end = 14;
      t.shape = {14};
      t.pieces.push_back(again);
    }
  });
  EXPECT_THAT(
      ShardedCheckpointReader::Open(dir).status(),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("tensor 'model/out.bias': bytes ")));
  EXPECT_THAT(ShardedCheckpointReader::Open(dir).status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("of 'rank-0-of-1.safetensors' overlap those of tensor "
                                 "'model/out.bias'")));
}

TEST(ShardedFormat, UserMetadataSurvivesTheRoundTripAndMustHoldStrings) {
  const std::string dir = FreshTestDir("fmt_user_metadata");
  ASSERT_THAT(WriteShardedFromFull(dir, MakeModel(0), nullptr, 2), IsOk());
  auto reader = ShardedCheckpointReader::Open(dir);
  ASSERT_THAT(reader, IsOk());
  ShardedMetadata metadata = (*reader)->metadata();
  EXPECT_TRUE(metadata.user_metadata.empty());
  metadata.user_metadata = {{"steps_done", "80"}, {"note", "after \"warmup\""}};
  auto parsed = MetadataFromJson(MetadataToJson(metadata), "metadata.json");
  ASSERT_THAT(parsed, IsOk());
  EXPECT_EQ(parsed->user_metadata, metadata.user_metadata);
  std::string text = MetadataToJson(metadata);
  const std::string from = "\"steps_done\": \"80\"";
  ASSERT_NE(text.find(from), std::string::npos) << text;
  text.replace(text.find(from), from.size(), "\"steps_done\": 80");
  EXPECT_THAT(MetadataFromJson(text, "metadata.json").status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("user_metadata[\"steps_done\"] is not a string")));
}

TEST(ShardedFormat, DetectCheckpointKindRefusesWhatItDoesNotKnow) {
  const std::string dir = FreshTestDir("fmt_kind");
  EXPECT_THAT(DetectCheckpointKind(dir), StatusIs(absl::StatusCode::kNotFound, HasSubstr(dir)));
  mkdir(dir.c_str(), 0755);
  EXPECT_THAT(DetectCheckpointKind(dir),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("neither")));
  WriteFileBytes(dir + "/metadata.json", "{\"format\": \"other\"}");
  EXPECT_THAT(DetectCheckpointKind(dir),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not an fsdp-cpp-sharded")));
}

TEST(ShardedFormat, AKilledSaveLeavesTheOldOrTheNewCheckpoint) {
  const std::string dir = FreshTestDir("fmt_killed");
  const OptimStateDict old_optim = MakeOptim(1);
  const OptimStateDict new_optim = MakeOptim(2);
  int points = 0;
  for (int k = 1; k < 60; ++k) {
    SCOPED_TRACE(absl::StrCat("crash point ", k));
    ASSERT_THAT(WriteShardedFromFull(dir, MakeModel(1), &old_optim, 2), IsOk());
    const pid_t pid = fork();
    if (pid == 0) {
      setenv("FSDP_CHECKPOINT_CRASH_AT", std::to_string(k).c_str(), 1);
      ResetCrashPointCounter();
      _exit(WriteShardedFromFull(dir, MakeModel(2), &new_optim, 2).ok() ? 0 : 3);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    auto reader = ShardedCheckpointReader::Open(dir);
    ASSERT_THAT(reader, IsOk());
    auto contents = ReadFullContents(**reader);
    ASSERT_THAT(contents, IsOk());
    const float v =
        contents->model[2].second[3].item<float>() - torch::linspace(-1, 1, 7)[3].item<float>();
    ASSERT_TRUE(v == 1 || v == 2) << v;
    ExpectContents(*contents, MakeModel(v), v == 1 ? old_optim : new_optim);
    if (!WIFSIGNALED(status)) {
      EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
      EXPECT_EQ(v, 2);
      points = k - 1;
      break;
    }
  }
  // Staging created; per data file: half written, written, fsynced; metadata.json written,
  // fsynced; staging fsynced, renamed, parent fsynced, old removed.
  EXPECT_EQ(points, 13);
}

}  // namespace
}  // namespace fsdp::checkpoint
