// Full checkpoints written as a pair, atomically: read back equal, recognised by
// DetectCheckpointKind, torch::pickle_save's format without its type tags (which Python's
// torch.load(weights_only=True) reads; examples/train_test loads ours in Python), write errors reported, and a save SIGKILLed
// at each of its crash points leaves DIR with the old pair or the new one, never a mix.
#include "checkpoint/full_checkpoint.h"

#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "checkpoint/atomic_dir.h"
#include "checkpoint/file_testutil.h"
#include "checkpoint/sharded_format.h"
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

// A model dict and an Adam-like optimizer dict whose every value is `v`.
ModelStateDict Model(float v) {
  return {{"a.weight", torch::full({3, 4}, v)}, {"a.bias", torch::full({4}, v)}};
}

OptimStateDict Optim(float v) {
  OptimStateDict d;
  optim_state::ParamState s;
  s.Set("step", StateValue(torch::tensor(v)));
  s.Set("exp_avg", StateValue(torch::full({3, 4}, v)));
  d.state.Set(ParamKey::Fqn("a.weight"), s);
  optim_state::ParamGroup g;
  g.hyper_params.Set("lr", StateValue(0.01));
  g.hyper_params.Set("betas", StateValue::Tuple({StateValue(0.9), StateValue(0.999)}));
  g.params = {ParamKey::Fqn("a.weight"), ParamKey::Fqn("a.bias")};
  d.param_groups.push_back(g);
  return d;
}

// The value every tensor of DIR's pair holds, or -1 if the pair is missing, unreadable or mixed.
float PairValue(const std::string& dir) {
  auto model = ReadModelStateDict(dir + "/model.pt");
  auto optim = ReadOptimStateDict(dir + "/optim.pt");
  if (!model.ok() || !optim.ok()) return -1;
  const float v = (*model)[0].second.flatten()[0].item<float>();
  if (optim_state::DiffOptimStateDicts(Optim(v), *optim) != "") return -1;
  for (const auto& [k, t] : *model) {
    if (!torch::equal(t, torch::full_like(t, v))) return -1;
  }
  return v;
}

TEST(FullCheckpoint, WritesThePairAtomicallyAndReadsItBack) {
  const std::string dir = FreshTestDir("full_pair");
  const OptimStateDict optim = Optim(2);
  ASSERT_THAT(WriteFullCheckpoint(dir, Model(2), &optim), IsOk());
  EXPECT_EQ(PairValue(dir), 2);
  auto kind = DetectCheckpointKind(dir);
  ASSERT_THAT(kind, IsOk());
  EXPECT_EQ(*kind, CheckpointKind::kFull);
  const OptimStateDict optim3 = Optim(3);
  ASSERT_THAT(WriteFullCheckpoint(dir, Model(3), &optim3), IsOk());
  EXPECT_EQ(PairValue(dir), 3);
}

TEST(FullCheckpoint, ModelOnly) {
  const std::string dir = FreshTestDir("full_model_only");
  ASSERT_THAT(WriteFullCheckpoint(dir, Model(1), nullptr), IsOk());
  EXPECT_THAT(ReadModelStateDict(dir + "/model.pt"), IsOk());
  struct stat st;
  EXPECT_NE(stat((dir + "/optim.pt").c_str(), &st), 0);
}

std::vector<char> FileBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// torch::pickle_save's archive, but without the TorchScript type tags that PyTorch 2.x's
// torch.load(weights_only=True) refuses (examples:train_test loads our files that way in Python).
TEST(FullCheckpoint, ModelFileIsPickleSaveWithoutTypeTags) {
  const std::string dir = FreshTestDir("full_bytes");
  ASSERT_EQ(mkdir(dir.c_str(), 0755), 0);
  // Two tensors sharing one storage (stored once), a non-contiguous one, an empty one, and one
  // larger than a page.
  const torch::Tensor base = torch::arange(24, torch::kFloat);
  const ModelStateDict model = {{"a.weight", base.view({4, 6})},
                                {"a.bias", base.narrow(0, 6, 6)},
                                {"b.weight", torch::arange(12, torch::kDouble).view({3, 4}).t()},
                                {"b.bias", torch::empty({0})},
                                {"c.weight", torch::randn({300, 70})}};
  const std::string path = dir + "/model.pt";
  ASSERT_THAT(WriteModelStateDict(model, path), IsOk());
  c10::impl::GenericDict dict(c10::StringType::get(), c10::TensorType::get());
  for (const auto& [fqn, tensor] : model) dict.insert(fqn, tensor.detach().contiguous());
  const std::vector<char> tagged = torch::pickle_save(c10::IValue(dict));
  const std::vector<char> ours = FileBytes(path);
  constexpr absl::string_view kTag = "restore_type_tag";
  EXPECT_NE(absl::string_view(tagged.data(), tagged.size()).find(kTag), absl::string_view::npos);
  EXPECT_EQ(absl::string_view(ours.data(), ours.size()).find(kTag), absl::string_view::npos);
  // Both hold the same storages in the same order; only data.pkl differs.
  EXPECT_TRUE(torch::equal(torch::pickle_load(ours).toGenericDict().at("c.weight").toTensor(),
                           model[4].second));
  auto read = ReadModelStateDict(path);
  ASSERT_THAT(read, IsOk());
  ASSERT_EQ(read->size(), model.size());
  for (size_t i = 0; i < model.size(); ++i) {
    EXPECT_EQ((*read)[i].first, model[i].first);
    EXPECT_TRUE(torch::equal((*read)[i].second, model[i].second)) << model[i].first;
  }
}

TEST(FullCheckpoint, AFailingWriteIsAnErrorNamingTheFile) {
  struct stat st;
  if (stat("/dev/full", &st) != 0) GTEST_SKIP() << "no /dev/full here";
  EXPECT_THAT(WriteModelStateDict(Model(1), "/dev/full"),
              StatusIs(absl::StatusCode::kInternal, HasSubstr("cannot write /dev/full")));
  EXPECT_THAT(WriteOptimStateDict(Optim(1), "/dev/full"),
              StatusIs(absl::StatusCode::kInternal, HasSubstr("cannot write /dev/full")));
}

TEST(FullCheckpoint, AKilledSaveLeavesTheOldOrTheNewPair) {
  const std::string dir = FreshTestDir("full_killed");
  const OptimStateDict old_optim = Optim(1);
  const OptimStateDict new_optim = Optim(2);
  int points = 0;
  for (int k = 1; k < 40; ++k) {
    SCOPED_TRACE(absl::StrCat("crash point ", k));
    ASSERT_THAT(WriteFullCheckpoint(dir, Model(1), &old_optim), IsOk());
    const pid_t pid = fork();
    if (pid == 0) {
      setenv("FSDP_CHECKPOINT_CRASH_AT", std::to_string(k).c_str(), 1);
      ResetCrashPointCounter();
      _exit(WriteFullCheckpoint(dir, Model(2), &new_optim).ok() ? 0 : 3);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    const float v = PairValue(dir);
    EXPECT_TRUE(v == 1 || v == 2) << v;
    if (!WIFSIGNALED(status)) {
      EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
      EXPECT_EQ(v, 2);
      points = k - 1;
      break;
    }
  }
  // staging created, 2 x (written, fsynced), staging fsynced, renamed, parent fsynced, old
  // removed.
  EXPECT_EQ(points, 9);
}

}  // namespace
}  // namespace fsdp::checkpoint
