// Shared pieces of the checkpoint tests: phases of one test run as separate multi-rank jobs
// (save with N ranks, load with M), and a NestedModel training job (PyTorch's test model, root
// not wrapped, so its `bias` is a parameter FSDP does not manage) with Adam or SGD+momentum.
#ifndef FSDP_CPP_CHECKPOINT_CHECKPOINT_TESTUTIL_H_
#define FSDP_CPP_CHECKPOINT_CHECKPOINT_TESTUTIL_H_

#include <sys/resource.h>
#include <sys/stat.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "checkpoint/atomic_dir.h"
#include "comm/launcher.h"
#include "comm/multiprocess_testutil.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "fsdp/state_dict.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "models/nested_model.h"
#include "optim_state/fsdp_optim_state.h"
#include "optim_state/optim_state_dict.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::checkpoint::testing {

using ::fsdp::testing::IsOk;
using ::fsdp::testing::IsRankProcess;
using optim_state::OptimizerAdapter;
using optim_state::OptimStateDict;

// ---------------------------------------------------------------- phases

// Runs `body` on `world_size` ranks as phase `phase` of the current test: rank processes run
// only the body of their phase (a test that saves with 4 ranks and loads with 2 launches twice).
inline void RunPhase(int phase, int world_size, const fsdp::testing::RankBody& body,
                     std::vector<std::pair<std::string, std::string>> env = {},
                     bool expect_success = true) {
  if (IsRankProcess()) {
    const char* p = std::getenv("CKPT_TEST_PHASE");
    if (p == nullptr || std::atoi(p) != phase) return;
    (void)fsdp::testing::RunInRanksWithReport({}, body, nullptr);
    return;
  }
  comm::LaunchOptions options;
  options.world_size = world_size;
  options.timeout = std::chrono::minutes(2);
  options.output = comm::RankOutput::kCapture;
  options.extra_env = std::move(env);
  options.extra_env.emplace_back("CKPT_TEST_PHASE", std::to_string(phase));
  comm::LaunchReport report;
  const absl::Status status = fsdp::testing::RunInRanksWithReport(options, body, &report);
  if (!expect_success) return;
  EXPECT_THAT(status, IsOk()) << "phase " << phase;
  for (const comm::RankExit& exit : report.ranks) {
    const bool ran = exit.output.find("[  PASSED  ] 1 test.") != std::string::npos;
    if (!exit.ok() || !ran) {
      ADD_FAILURE() << "phase " << phase << ": rank " << exit.rank << " of " << world_size << " "
                    << exit.Describe() << "; its output:\n"
                    << exit.output;
    }
  }
}

// Until restored, this process may write no file larger than `bytes`: a write beyond fails with
// EFBIG (SIGXFSZ is ignored), a real write error. Returns the limit to restore.
inline rlimit LimitFileSize(rlim_t bytes) {
  rlimit old_limit;
  EXPECT_EQ(getrlimit(RLIMIT_FSIZE, &old_limit), 0);
  std::signal(SIGXFSZ, SIG_IGN);
  rlimit tiny = old_limit;
  tiny.rlim_cur = bytes;
  EXPECT_EQ(setrlimit(RLIMIT_FSIZE, &tiny), 0);
  return old_limit;
}
inline void RestoreFileSize(const rlimit& limit) { EXPECT_EQ(setrlimit(RLIMIT_FSIZE, &limit), 0); }

inline std::string TmpDir(const std::string& name) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  return absl::StrCat(tmp != nullptr ? tmp : "/tmp", "/", name);
}

inline std::shared_ptr<comm::ProcessGroup> Borrow(comm::ProcessGroup& group) {
  return std::shared_ptr<comm::ProcessGroup>(&group, [](comm::ProcessGroup*) {});
}

// ---------------------------------------------------------------- the training job

enum class Opt { kAdam, kSgd };

struct Config {
  int world_size = 2;
  ShardingStrategy strategy = ShardingStrategy::kFullShard;
  bool use_orig_params = false;
  bool wrap_alt = false;
  Opt opt = Opt::kAdam;
  bool trained = false;  // a loading job that has trained a step first (its optimizer has state)
};

inline std::string Name(const Config& c) {
  return absl::StrCat("ws", c.world_size, "_", std::string(ShardingStrategyName(c.strategy)),
                      c.use_orig_params ? "_orig" : "", c.wrap_alt ? "_alt" : "",
                      c.opt == Opt::kAdam ? "_Adam" : "_SGD", c.trained ? "_trained" : "");
}

// A save with one configuration and a load with another (a parametrized case), named for
// test names ("ws2_FULL_SHARD_Adam_to_ws3_FULL_SHARD_orig_alt_Adam").
struct ReshardCase {
  Config save;
  Config load;
};

inline std::string ReshardCaseName(const ::testing::TestParamInfo<ReshardCase>& info) {
  return absl::StrCat(Name(info.param.save), "_to_", Name(info.param.load));
}

inline Config C(int ws, Opt opt = Opt::kAdam, ShardingStrategy s = ShardingStrategy::kFullShard,
                bool orig = false, bool alt = false) {
  return Config{ws, s, orig, alt, opt};
}

inline Config Trained(Config c) {
  c.trained = true;
  return c;
}

// The launching process empties (or makes) scratch directory `root` before the phases run.
inline void FreshRootDir(const std::string& root) {
  if (IsRankProcess()) return;
  ASSERT_THAT(RemoveTree(root), IsOk());
  mkdir(root.c_str(), 0755);
}

struct Job {
  models::NestedModel model;
  std::unique_ptr<FullyShardedDataParallel> fsdp;
  std::unique_ptr<torch::optim::Optimizer> optim;
  std::unique_ptr<OptimizerAdapter> adapter;
};

inline std::unique_ptr<Job> MakeJob(const Config& c, comm::ProcessGroup& group) {
  auto job = std::make_unique<Job>();
  FsdpOptions options;
  options.sharding_strategy = c.strategy;
  options.use_orig_params = c.use_orig_params;
  options.nested = c.wrap_alt ? job->model->wrap_alt_slots() : job->model->wrap_slots();
  options.wrap_root = false;
  auto fsdp = FullyShardedDataParallel::Wrap(job->model, Borrow(group), options);
  EXPECT_THAT(fsdp, IsOk());
  if (!fsdp.ok()) return nullptr;
  job->fsdp = std::move(*fsdp);
  if (c.opt == Opt::kAdam) {
    job->optim = std::make_unique<torch::optim::Adam>(job->fsdp->parameters(),
                                                      torch::optim::AdamOptions(0.01).eps(1e-3));
  } else {
    job->optim = std::make_unique<torch::optim::SGD>(job->fsdp->parameters(),
                                                     torch::optim::SGDOptions(0.01).momentum(0.9));
  }
  auto adapter = OptimizerAdapter::Create(*job->optim);
  EXPECT_THAT(adapter, IsOk());
  job->adapter = std::make_unique<OptimizerAdapter>(std::move(*adapter));
  return job;
}

// Trains steps [from, to); returns their losses.
inline std::vector<double> Train(Job& job, int from, int to) {
  std::vector<double> losses;
  for (int step = from; step < to; ++step) {
    job.optim->zero_grad();
    torch::manual_seed(100 + step);
    at::Tensor x = job.model->get_input();
    at::Tensor loss = job.model->get_loss(x, job.fsdp->forward(x));
    loss.backward();
    EXPECT_THAT(job.adapter->Step(), IsOk());
    losses.push_back(loss.item<double>());
  }
  return losses;
}

inline void WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::trunc);
  out << text;
}

inline std::string ReadText(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline std::vector<double> ParseLosses(const std::string& text) {
  std::vector<double> out;
  for (absl::string_view s : absl::StrSplit(text, ' ', absl::SkipEmpty())) {
    out.push_back(std::stod(std::string(s)));
  }
  return out;
}

inline std::string LossesText(const std::vector<double>& losses) {
  std::vector<std::string> parts;
  for (double l : losses) parts.push_back(absl::StrFormat("%.17g", l));
  return absl::StrJoin(parts, " ");
}

// The full model and optimizer state (rank 0 returns them; others empty).
struct FullState {
  StateDict model;
  OptimStateDict optim;
};

inline FullState Gather(Job& job) {
  FullState s;
  auto model = FullStateDict(*job.fsdp, {.rank0_only = true});
  EXPECT_THAT(model, IsOk());
  if (model.ok()) s.model = std::move(*model);
  auto optim = optim_state::FullOptimStateDict(*job.fsdp, *job.adapter);
  EXPECT_THAT(optim, IsOk());
  // A snapshot: state of unmanaged parameters shares storage with the optimizer.
  if (optim.ok()) s.optim = optim_state::CloneOptimStateDict(*optim);
  return s;
}

inline void ExpectSameModel(const StateDict& expected, const StateDict& actual) {
  ASSERT_EQ(expected.size(), actual.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(expected[i].first, actual[i].first);
    EXPECT_TRUE(torch::equal(expected[i].second, actual[i].second)) << expected[i].first;
  }
}

// Same state per FQN and state name (orders may differ between wrappings), same groups.
inline void ExpectSameOptim(const OptimStateDict& expected, const OptimStateDict& actual) {
  EXPECT_EQ(expected.state.size(), actual.state.size());
  for (const auto& [key, state] : expected.state) {
    const optim_state::ParamState* other = actual.state.Find(key);
    ASSERT_NE(other, nullptr) << key;
    EXPECT_EQ(state.size(), other->size()) << key;
    for (const auto& [name, value] : state) {
      const optim_state::StateValue* v = other->Find(name);
      ASSERT_NE(v, nullptr) << key << " " << name;
      EXPECT_EQ(optim_state::DiffStateValues(value, *v), "") << key << " " << name;
    }
  }
  ASSERT_EQ(expected.param_groups.size(), actual.param_groups.size());
  for (size_t g = 0; g < expected.param_groups.size(); ++g) {
    for (const auto& [name, value] : expected.param_groups[g].hyper_params) {
      const optim_state::StateValue* v = actual.param_groups[g].hyper_params.Find(name);
      ASSERT_NE(v, nullptr) << name;
      EXPECT_EQ(optim_state::DiffStateValues(value, *v), "") << name;
    }
    auto sorted = [](std::vector<optim_state::ParamKey> keys) {
      std::sort(keys.begin(), keys.end());
      return keys;
    };
    EXPECT_EQ(sorted(expected.param_groups[g].params), sorted(actual.param_groups[g].params));
  }
}

}  // namespace fsdp::checkpoint::testing

#endif  // FSDP_CPP_CHECKPOINT_CHECKPOINT_TESTUTIL_H_
