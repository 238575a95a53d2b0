// End to end: `train` on real rank processes against plain PyTorch 2.13 (tools/python) training
// the same model in one process. Per-step losses must agree. (tests/pytorch_peer compares with
// PyTorch's FSDP itself.)
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "checkpoint/dcp_reader.h"
#include "checkpoint/full_checkpoint.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "models/nested_model.h"
#include "optim_state/optim_state_dict.h"
#include "tools/python_testutil.h"

namespace {

using ::testing::HasSubstr;

using ::fsdp::testing::CommandResult;
using ::fsdp::testing::RunCommand;
using ::fsdp::testing::Runfile;
using ::fsdp::testing::StepLosses;

const std::vector<double>& PyTorchLosses(const std::string& model, const std::string& optimizer,
                                         int steps, int param_groups, double clip = 0,
                                         int grad_accum = 1) {
  static std::map<std::string, std::vector<double>> cache;
  const std::string key = absl::StrCat(model, "/", optimizer, "/", steps, "/", param_groups, "/",
                                       clip, "/", grad_accum);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  const std::string models_dir = Runfile("models/testdata");
  CommandResult run = RunCommand(absl::StrCat(
      fsdp::testing::PythonCommand(), " ", Runfile("examples/testdata/pytorch_train.py"), " ",
      models_dir, " ", model, " ", optimizer, " 0.01 ", steps, " ", param_groups,
      clip > 0 ? absl::StrCat(" --clip_grad_norm=", clip) : "",
      grad_accum > 1 ? absl::StrCat(" --grad_accum=", grad_accum) : ""));
  EXPECT_EQ(run.exit_code, 0) << run.output;
  return cache[key] = StepLosses(run.output);
}

struct Case {
  std::string model;  // nested_1.13: --model=nested --nested_dims=1.13
  int world_size;
  std::string strategy;
  bool use_orig_params;
  std::string optimizer;
  std::string wrap;  // empty: the model's default (nested: wrap, transformer: layers)
  int param_groups = 1;
  double clip = 0;     // --clip_grad_norm
  int grad_accum = 1;  // --grad_accum
};

class TrainTest : public ::testing::TestWithParam<Case> {};

TEST_P(TrainTest, LossesMatchPlainPyTorch) {
  const Case& c = GetParam();
  constexpr int kSteps = 5;
  const std::string model_flags = c.model == "nested_1.13" ? "nested --nested_dims=1.13" : c.model;
  CommandResult run = RunCommand(absl::StrCat(
      Runfile("examples/train"), " --model=", model_flags, " --world_size=", c.world_size,
      " --sharding_strategy=", c.strategy, " --optimizer=", c.optimizer, " --steps=", kSteps,
      c.wrap.empty() ? "" : " --wrap=", c.wrap, " --param_groups=", c.param_groups,
      c.use_orig_params ? " --use_orig_params" : "",
      c.clip > 0 ? absl::StrCat(" --clip_grad_norm=", c.clip) : "",
      c.grad_accum > 1 ? absl::StrCat(" --grad_accum=", c.grad_accum) : "",
      absl::StartsWith(c.strategy, "hybrid") ? " --shard_group_size=2" : "", " --timeout_s=120"));
  ASSERT_EQ(run.exit_code, 0) << run.output;
  const std::vector<double> losses = StepLosses(run.output);
  const std::vector<double>& expected =
      PyTorchLosses(c.model, c.optimizer, kSteps, c.param_groups, c.clip, c.grad_accum);
  ASSERT_EQ(losses.size(), static_cast<size_t>(kSteps)) << run.output;
  ASSERT_EQ(expected.size(), static_cast<size_t>(kSteps));
  for (int i = 0; i < kSteps; ++i) {
    EXPECT_NEAR(losses[i], expected[i], 1e-5 * std::max(1.0, std::abs(expected[i])))
        << "step " << i << "\n"
        << run.output;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Grid, TrainTest,
    ::testing::Values(Case{"nested", 2, "full_shard", false, "adam"},
                      Case{"nested", 3, "shard_grad_op", true, "sgd"},
                      Case{"nested", 4, "full_shard", true, "adamw", "wrap_alt"},
                      Case{"nested", 1, "no_shard", false, "rmsprop", "none"},
                      Case{"nested", 2, "full_shard", false, "adagrad", "none"},
                      Case{"nested", 2, "full_shard", false, "adam", "wrap", 2},
                      Case{"nested", 3, "shard_grad_op", true, "sgd", "wrap_alt", 2},
                      Case{"nested_1.13", 4, "full_shard", false, "adam"},
                      Case{"nested", 3, "full_shard", false, "sgd", "wrap", 1, 1.0},
                      Case{"transformer", 2, "shard_grad_op", true, "adam", "", 1, 0.5},
                      Case{"nested", 4, "full_shard", false, "adam", "wrap", 1, 0, 4},
                      Case{"nested", 3, "no_shard", true, "adagrad", "none", 1, 1.0, 2},
                      Case{"transformer", 2, "full_shard", false, "adam"},
                      Case{"transformer", 3, "no_shard", true, "sgd"},
                      // 2 x 2 and 3 x 2 meshes: shard groups of 2 ranks, replicated.
                      Case{"nested", 4, "hybrid_shard", false, "adam", "wrap_root"},
                      Case{"transformer", 6, "hybrid_shard_zero2", true, "sgd"}),
    [](const ::testing::TestParamInfo<Case>& info) {
      const Case& c = info.param;
      return absl::StrCat(absl::StrReplaceAll(c.model, {{".", "_"}}), "_ws", c.world_size, "_",
                          c.strategy, c.use_orig_params ? "_orig_" : "_", c.optimizer, "_",
                          c.wrap.empty() ? "default_wrap" : c.wrap,
                          c.param_groups == 2 ? "_2groups" : "", c.clip > 0 ? "_clipped" : "",
                          c.grad_accum > 1 ? absl::StrCat("_accum", c.grad_accum) : "");
    });

std::string TempDir(const std::string& name) {
  const char* root = std::getenv("TEST_TMPDIR");
  return absl::StrCat(root != nullptr ? root : "/tmp", "/", name);
}

struct ResumeCase {
  std::string model;
  std::string optimizer;
  int save_world_size;
  std::string save_flags;
  int load_world_size;
  std::string load_flags;
};

class TrainResumeTest : public ::testing::TestWithParam<ResumeCase> {};

// Saving halfway and resuming at another world size and wrapping continues the same losses
// as training straight through, and the files match plain PyTorch's model and optimizer.
TEST_P(TrainResumeTest, ResumedRunContinuesTheLossAndFilesMatchPyTorch) {
  const ResumeCase& c = GetParam();
  const std::string train = Runfile("examples/train");
  const std::string common =
      absl::StrCat(" --model=", c.model, " --optimizer=", c.optimizer, " --timeout_s=120");
  CommandResult straight = RunCommand(absl::StrCat(
      train, common, " --steps=6 --world_size=", c.save_world_size, " ", c.save_flags));
  ASSERT_EQ(straight.exit_code, 0) << straight.output;
  const std::string dir = TempDir(absl::StrCat("ckpt_", c.model, "_", c.optimizer, "_",
                                               c.save_world_size, "_", c.load_world_size));
  CommandResult first =
      RunCommand(absl::StrCat(train, common, " --steps=3 --world_size=", c.save_world_size, " ",
                              c.save_flags, " --save=", dir));
  ASSERT_EQ(first.exit_code, 0) << first.output;
  EXPECT_THAT(first.output, HasSubstr("saved a full checkpoint in " + dir));
  // Python's torch.load reads both files and they hold what PyTorch's own training holds.
  CommandResult check = RunCommand(absl::StrCat(
      fsdp::testing::PythonCommand(), " ", Runfile("examples/testdata/check_full_checkpoint.py"),
      " ", Runfile("models/testdata"), " ", c.model, " ", c.optimizer, " 3 ", dir));
  EXPECT_EQ(check.exit_code, 0) << check.output;
  EXPECT_THAT(check.output, HasSubstr("checkpoint matches PyTorch"));
  CommandResult resumed =
      RunCommand(absl::StrCat(train, common, " --steps=3 --world_size=", c.load_world_size, " ",
                              c.load_flags, " --load=", dir));
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
  const std::vector<double> all = StepLosses(straight.output);
  const std::vector<double> tail = StepLosses(resumed.output);
  ASSERT_EQ(all.size(), 6u) << straight.output;
  ASSERT_EQ(tail.size(), 3u) << resumed.output;
  EXPECT_THAT(resumed.output, HasSubstr("step=3 loss="));
  for (int i = 0; i < 3; ++i) {
    EXPECT_NEAR(tail[i], all[3 + i], 1e-5 * std::max(1.0, std::abs(all[3 + i])))
        << "step " << 3 + i << "\n"
        << resumed.output;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Grid, TrainResumeTest,
    ::testing::Values(ResumeCase{"nested", "adam", 2, "--wrap=wrap", 3, "--wrap=none"},
                      ResumeCase{"nested", "sgd", 4, "--wrap=wrap_alt", 2,
                                 "--wrap=wrap --sharding_strategy=shard_grad_op --use_orig_params"},
                      // SGD: Adam turns the rounding noise on each in_proj_bias's key part (its
                      // gradient is zero in exact arithmetic; PyTorch 2.x computes attention with
                      // scaled_dot_product_attention, LibTorch with bmm + softmax) into +-lr steps
                      // (see tests/pytorch_peer/pytorch_peer_test.cc).
                      ResumeCase{"transformer", "sgd", 2, "", 3, "--sharding_strategy=no_shard"}),
    [](const ::testing::TestParamInfo<ResumeCase>& info) {
      const ResumeCase& c = info.param;
      return absl::StrCat(c.model, "_", c.optimizer, "_ws", c.save_world_size, "_to_ws",
                          c.load_world_size);
    });

// A --resume_world_size demonstration's output (steps 0-5, then the resumed 3-5): the resumed
// steps' losses equal the uninterrupted run's.
void ExpectResumedLikeUninterrupted(const std::string& output) {
  const std::vector<double> losses = StepLosses(output);
  ASSERT_EQ(losses.size(), 9u) << output;
  for (int i = 0; i < 3; ++i) {
    EXPECT_NEAR(losses[6 + i], losses[3 + i], 1e-5 * std::max(1.0, std::abs(losses[3 + i])))
        << "step " << 3 + i << "\n"
        << output;
  }
}

// The main job's demonstration at a small size: train, save halfway, train on; a second job at
// another world size and wrapping loads the checkpoint and its losses match the first's.
TEST(Train, LanguageModelResumesAtAnotherWorldSizeAndDrawsTheCurve) {
  const std::string out = TempDir("lm_demo");
  CommandResult run = RunCommand(absl::StrCat(
      Runfile("examples/train"),
      " --model=lm --d_model=32 --num_layers=2 --nhead=2 --context=16 --global_batch=12",
      " --steps=6 --save_at_step=3 --world_size=2 --resume_world_size=3 --resume_wrap=none",
      " --timeout_s=120 --state_dict_type=sharded --save=", out, "/checkpoint"));
  ASSERT_EQ(run.exit_code, 0) << run.output;
  EXPECT_THAT(run.output, HasSubstr("saved a sharded checkpoint in " + out + "/checkpoint"));
  EXPECT_THAT(run.output, HasSubstr("part 2 of 2: 3 ranks, wrap=none"));
  EXPECT_THAT(run.output, HasSubstr("resuming at step 3"));
  ExpectResumedLikeUninterrupted(run.output);
  EXPECT_THAT(run.output, HasSubstr("loss curve:  " + out + "/loss_curve.png"));
  FILE* png = std::fopen((out + "/loss_curve.png").c_str(), "rb");
  ASSERT_NE(png, nullptr);
  char signature[8] = {};
  EXPECT_EQ(std::fread(signature, 1, 8, png), 8u);
  std::fclose(png);
  EXPECT_EQ(std::string(signature, 8), std::string("\x89PNG\r\n\x1a\n", 8));
}

// --async_save: the checkpoint is copied (staged) while the next step's forward and backward run
// and written while training goes on, and a job at another world size resumes from it with the
// losses of the uninterrupted run (so the staging saved the state at the save, untorn).
TEST(Train, AsyncSaveResumesLikeASynchronousSave) {
  const std::string out = TempDir("async_save");
  CommandResult run = RunCommand(absl::StrCat(
      Runfile("examples/train"), " --model=nested --optimizer=adam --wrap=wrap",
      " --steps=6 --save_at_step=3 --world_size=2 --resume_world_size=3 --resume_wrap=none",
      " --timeout_s=120 --state_dict_type=sharded --async_save --save=", out, "/checkpoint"));
  ASSERT_EQ(run.exit_code, 0) << run.output;
  EXPECT_THAT(run.output, HasSubstr("saving a sharded checkpoint in " + out +
                                    "/checkpoint after step 2 in the background"));
  // The next optimizer step waits for the staging copy, forward and backward need not.
  EXPECT_THAT(run.output,
              HasSubstr("the background save's staging is done before optimizer step 3"));
  EXPECT_THAT(run.output, HasSubstr("the background save is committed"));
  EXPECT_THAT(run.output, HasSubstr("resuming at step 3"));
  ExpectResumedLikeUninterrupted(run.output);
}

TEST(Train, AsyncSaveNeedsAShardedCheckpoint) {
  CommandResult run = RunCommand(absl::StrCat(
      Runfile("examples/train"), " --model=nested --steps=1 --world_size=2",
      " --state_dict_type=full --async_save --save=", TempDir("async_full"), "/checkpoint"));
  EXPECT_NE(run.exit_code, 0);
  EXPECT_THAT(run.output, HasSubstr("--async_save needs --state_dict_type=sharded"));
}

struct PyTorchCheckpointCase {
  std::string model;
  std::string optimizer;
  int protocol;
  int world_size;
  std::string flags;
};

class TrainLoadsPyTorchCheckpointTest : public ::testing::TestWithParam<PyTorchCheckpointCase> {};

// PyTorch trains, saves model.pt/optim.pt with torch.save (pickle protocol 2 or 4) halfway and
// trains on; train loads that checkpoint at some world size and wrapping and continues with
// PyTorch's losses.
TEST_P(TrainLoadsPyTorchCheckpointTest, ContinuesWithPyTorchsLosses) {
  const PyTorchCheckpointCase& c = GetParam();
  const std::string dir = TempDir(absl::StrCat("pytorch_ckpt_", c.model, "_", c.optimizer, "_p",
                                               c.protocol, "_ws", c.world_size));
  CommandResult python = RunCommand(
      absl::StrCat(fsdp::testing::PythonCommand(), " ",
                   Runfile("examples/testdata/pytorch_train.py"), " ", Runfile("models/testdata"),
                   " ", c.model, " ", c.optimizer, " 0.01 6 1 3 ", dir, " ", c.protocol));
  ASSERT_EQ(python.exit_code, 0) << python.output;
  const std::vector<double> expected = StepLosses(python.output);
  ASSERT_EQ(expected.size(), 6u) << python.output;
  CommandResult resumed = RunCommand(absl::StrCat(
      Runfile("examples/train"), " --model=", c.model, " --optimizer=", c.optimizer,
      " --world_size=", c.world_size, " --steps=3 --timeout_s=120 --load=", dir, " ", c.flags));
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
  EXPECT_THAT(resumed.output, HasSubstr("resuming at step 3"));
  const std::vector<double> tail = StepLosses(resumed.output);
  ASSERT_EQ(tail.size(), 3u) << resumed.output;
  for (int i = 0; i < 3; ++i) {
    EXPECT_NEAR(tail[i], expected[3 + i], 1e-5 * std::max(1.0, std::abs(expected[3 + i])))
        << "step " << 3 + i << "\n"
        << resumed.output;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Grid, TrainLoadsPyTorchCheckpointTest,
    ::testing::Values(PyTorchCheckpointCase{"nested", "adam", 2, 2, "--wrap=wrap"},
                      PyTorchCheckpointCase{"nested", "sgd", 4, 3, "--wrap=wrap_alt"},
                      PyTorchCheckpointCase{"transformer", "adam", 4, 2, "--use_orig_params"}),
    [](const ::testing::TestParamInfo<PyTorchCheckpointCase>& info) {
      const PyTorchCheckpointCase& c = info.param;
      return absl::StrCat(c.model, "_", c.optimizer, "_protocol", c.protocol, "_ws", c.world_size);
    });

// A full checkpoint saved from a wrapped PyTorch 2.13 model (torch.compile of DDP of a model
// whose block2 carries checkpoint_wrapper: "_orig_mod.module.bias", optimizer keys like
// "_orig_mod.module.block2._checkpoint_wrapped_module.0.weight";
// tests/optim_state/wrapped_checkpoints.py) is refused naming its first key, and loads with
// --strip_key_prefixes=pytorch: saved again at once, it holds Python's values under the
// unwrapped names.
TEST(Train, LoadsAWrappedPyTorchModelsCheckpointWithStripKeyPrefixes) {
  const std::string out = TempDir("wrapped_checkpoints");
  fsdp::models::NestedModel model;  // the files must have train's NestedModel shapes
  const int64_t hidden =
      fsdp::models::SlotAs<fsdp::models::BlockBImpl>(model->block0)->weight.size(1);
  CommandResult python = RunCommand(absl::StrCat(
      fsdp::testing::PythonCommand(), " ", Runfile("tests/optim_state/wrapped_checkpoints.py"), " ",
      Runfile("models/testdata"), " ", Runfile("examples/testdata"), " ", out, " ", hidden));
  ASSERT_EQ(python.exit_code, 0) << python.output;
  const std::string dir = out + "/ddp_compile_checkpoint_wrapper";
  const std::string train = absl::StrCat(
      Runfile("examples/train"), " --model=nested --world_size=2 --timeout_s=120 --load=", dir,
      " --state_dict_type=full");
  CommandResult refused = RunCommand(absl::StrCat(train, " --steps=1"));
  EXPECT_NE(refused.exit_code, 0);
  EXPECT_THAT(refused.output,
              HasSubstr(absl::StrCat(dir,
                                     "/model.pt: key \"_orig_mod.module.bias\" names no "
                                     "parameter or buffer of the model")));
  EXPECT_THAT(refused.output, HasSubstr("(--strip_key_prefixes)"));

  const std::string saved = TempDir("wrapped_checkpoint_loaded");
  CommandResult loaded =
      RunCommand(absl::StrCat(train, " --strip_key_prefixes=pytorch --steps=0 --save=", saved));
  ASSERT_EQ(loaded.exit_code, 0) << loaded.output;
  auto expected_model = fsdp::checkpoint::ReadModelStateDict(dir + "/expected_model.pt");
  auto saved_model = fsdp::checkpoint::ReadModelStateDict(saved + "/model.pt");
  ASSERT_TRUE(expected_model.ok() && saved_model.ok());
  std::map<std::string, at::Tensor> by_name(saved_model->begin(), saved_model->end());
  ASSERT_EQ(by_name.size(), expected_model->size());
  for (const auto& [name, tensor] : *expected_model) {
    ASSERT_EQ(by_name.count(name), 1u) << name;
    EXPECT_TRUE(by_name[name].equal(tensor)) << name;
  }
  auto expected_optim = fsdp::checkpoint::ReadOptimStateDict(dir + "/expected_optim.pt");
  auto saved_optim = fsdp::checkpoint::ReadOptimStateDict(saved + "/optim.pt");
  ASSERT_TRUE(expected_optim.ok() && saved_optim.ok());
  ASSERT_EQ(saved_optim->state.size(), expected_optim->state.size());
  for (const auto& [key, state] : expected_optim->state) {
    const fsdp::optim_state::ParamState* mine = saved_optim->state.Find(key);
    ASSERT_NE(mine, nullptr) << key;
    for (const auto& [state_name, value] : state) {
      ASSERT_NE(mine->Find(state_name), nullptr) << key << " " << state_name;
      EXPECT_EQ(fsdp::optim_state::DiffStateValues(value, *mine->Find(state_name)), "")
          << key << " " << state_name;
    }
  }
}

// --deferred_init: every rank materialises the same values (FqnSeededInit), so the job trains
// the same model at world sizes 2 and 4 (equal losses, as FSDP at 2 and 4 equals the unwrapped
// model), which is not the default-initialised one. (NestedModel under a root unit: FSDP
// materialises only what its units manage, and the `wrap` layout leaves the root's bias out.)
TEST(Train, DeferredInitTrainsOneModelAtAnyWorldSize) {
  std::vector<std::vector<double>> losses;
  for (const char* flags :
       {"--world_size=2 --deferred_init", "--world_size=4 --deferred_init", "--world_size=2"}) {
    CommandResult run = RunCommand(absl::StrCat(
        Runfile("examples/train"), " --model=nested --wrap=wrap_root --steps=3 ", flags));
    ASSERT_EQ(run.exit_code, 0) << run.output;
    losses.push_back(StepLosses(run.output));
    ASSERT_EQ(losses.back().size(), 3u) << run.output;
  }
  EXPECT_EQ(losses[0], losses[1]);
  EXPECT_NE(losses[0], losses[2]);
}

TEST(Train, LoadingAMissingCheckpointNamesTheFile) {
  CommandResult run = RunCommand(absl::StrCat(
      Runfile("examples/train"),
      " --world_size=2 --steps=1 --model=nested --load=", TempDir("no_such_checkpoint")));
  EXPECT_NE(run.exit_code, 0);
  EXPECT_THAT(run.output, HasSubstr("no_such_checkpoint"));
}

// HYBRID_SHARD saves once: a sharded checkpoint from the first replica's shard group (two rank
// files, not four; also when saved in the background), a full one from rank 0. A FULL_SHARD job at
// world size 3 resumes from the sharded one, a hybrid job of two one-rank replicas (loading on
// every replica) from the full one, both with the uninterrupted hybrid run's losses.
TEST(Train, HybridShardSavesOnceAndResumesUnderAnotherLayout) {
  const std::string train = Runfile("examples/train");
  const std::string common = " --model=nested --optimizer=adam --wrap=wrap_root --timeout_s=120";
  const std::string hybrid =
      " --world_size=4 --sharding_strategy=hybrid_shard --shard_group_size=2";
  CommandResult straight = RunCommand(absl::StrCat(train, common, hybrid, " --steps=6"));
  ASSERT_EQ(straight.exit_code, 0) << straight.output;
  const std::vector<double> all = StepLosses(straight.output);
  ASSERT_EQ(all.size(), 6u) << straight.output;
  struct SaveAndLoad {
    const char* name;
    const char* save;
    const char* loader;
  };
  const SaveAndLoad kCases[] = {
      {"sharded", " --state_dict_type=sharded", " --world_size=3 --sharding_strategy=full_shard"},
      {"async", " --state_dict_type=sharded --async_save",
       " --world_size=3 --sharding_strategy=full_shard"},
      {"full", " --state_dict_type=full",
       " --world_size=2 --sharding_strategy=hybrid_shard --shard_group_size=1"},
  };
  for (const auto& [name, save, loader] : kCases) {
    SCOPED_TRACE(name);
    const std::string dir = TempDir(absl::StrCat("hybrid_", name));
    CommandResult first =
        RunCommand(absl::StrCat(train, common, hybrid, " --steps=3", save, " --save=", dir));
    ASSERT_EQ(first.exit_code, 0) << first.output;
    if (absl::StrContains(save, "async")) {
      EXPECT_THAT(first.output, HasSubstr("the background save is committed")) << first.output;
    }
    if (absl::StrContains(save, "sharded")) {
      int rank_files = 0;
      for (const auto& entry : std::filesystem::directory_iterator(dir)) {
        rank_files += absl::StartsWith(entry.path().filename().string(), "rank-");
      }
      EXPECT_EQ(rank_files, 2) << "one file per rank of one shard group";
    }
    CommandResult resumed =
        RunCommand(absl::StrCat(train, common, loader, " --steps=3 --load=", dir));
    ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
    const std::vector<double> tail = StepLosses(resumed.output);
    ASSERT_EQ(tail.size(), 3u) << resumed.output;
    for (int i = 0; i < 3; ++i) {
      EXPECT_NEAR(tail[i], all[3 + i], 1e-5 * std::max(1.0, std::abs(all[3 + i])))
          << "step " << 3 + i << "\n"
          << resumed.output;
    }
  }
}

// --state_dict_type=dcp: a 3-rank job's DCP directory holds, under torchtitan's keys, exactly
// the full checkpoint the same job saves (PyTorch loading it: //tests/pytorch_peer).
TEST(Train, DcpSaveHoldsTheStateOfTheFullCheckpoint) {
  const std::string out = TempDir("dcp_save");
  const std::string train = absl::StrCat(Runfile("examples/train"),
                                         " --model=nested --optimizer=adam --wrap=wrap --steps=3",
                                         " --world_size=3 --timeout_s=120");
  CommandResult dcp_run =
      RunCommand(absl::StrCat(train, " --state_dict_type=dcp --save=", out, "/dcp"));
  ASSERT_EQ(dcp_run.exit_code, 0) << dcp_run.output;
  EXPECT_THAT(dcp_run.output, HasSubstr("saved a dcp checkpoint in " + out + "/dcp after step 2"));
  CommandResult full_run =
      RunCommand(absl::StrCat(train, " --state_dict_type=full --save=", out, "/full"));
  ASSERT_EQ(full_run.exit_code, 0) << full_run.output;
  EXPECT_EQ(StepLosses(dcp_run.output), StepLosses(full_run.output));

  auto reader = fsdp::checkpoint::dcp::DcpReader::Open(out + "/dcp");
  ASSERT_TRUE(reader.ok()) << reader.status();
  auto model = fsdp::checkpoint::ReadModelStateDict(out + "/full/model.pt");
  auto optim = fsdp::checkpoint::ReadOptimStateDict(out + "/full/optim.pt");
  ASSERT_TRUE(model.ok() && optim.ok());
  size_t tensors = 0;
  auto expect_same = [&](const std::string& key, const at::Tensor& want) {
    auto got = (*reader)->ReadTensor(key);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->scalar_type(), want.scalar_type()) << key;
    EXPECT_TRUE(torch::equal(*got, want)) << key;
    ++tensors;
  };
  for (const auto& [fqn, t] : *model) expect_same("model." + fqn, t);
  for (const auto& [key, state] : optim->state) {
    for (const auto& [name, value] : state) {
      expect_same(absl::StrCat("optimizer.state.", key.fqn(), ".", name), value.Get<at::Tensor>());
    }
  }
  size_t dcp_tensors = 0;
  for (const auto& [key, entry] : (*reader)->metadata().state_dict_metadata) {
    dcp_tensors += std::holds_alternative<fsdp::checkpoint::dcp::TensorStorageMetadata>(entry);
  }
  EXPECT_EQ(dcp_tensors, tensors);
  EXPECT_EQ(fsdp::testing::ReadFileLines(out + "/dcp/progress.txt"),
            std::vector<std::string>{"steps_done=3"});
}

TEST(Train, BadFlagsAreRefusedByName) {
  const std::pair<const char*, const char*> kCases[] = {
      {" --world_size=1 --optimizer=lamb", "--optimizer=lamb is not one of"},
      {" --world_size=2 --sharding_strategy=hybrid", "--sharding_strategy=hybrid is not one of"},
      {" --world_size=2 --sharding_strategy=hybrid_shard",
       "shard group size 0 does not divide the world size 2"},
      {" --world_size=2 --shard_group_size=2", "--shard_group_size is for"},
      {" --world_size=1 --model=nested --nested_dims=1.12",
       "--nested_dims=1.12 is not one of 2.x, 1.13"},
      {" --world_size=1 --model=nested --clip_grad_norm=-1", "--clip_grad_norm=-1 is negative"},
      {" --world_size=1 --model=nested --grad_accum=0", "--grad_accum=0 is not positive"},
      {" --world_size=1 --state_dict_type=torch_save",
       "--state_dict_type=torch_save is not one of full, sharded, dcp"},
      {" --world_size=1 --strip_key_prefixes=module",
       "--strip_key_prefixes: key prefixes \"module\": cannot read"},
  };
  for (const auto& [flags, message] : kCases) {
    CommandResult run = RunCommand(absl::StrCat(Runfile("examples/train"), flags, " --steps=1"));
    EXPECT_NE(run.exit_code, 0) << flags;
    EXPECT_THAT(run.output, HasSubstr(message)) << flags;
  }
}

}  // namespace
