// scale_benchmark: how each operation's time and per-rank peak memory grow with the model's size
// and the world size, ours beside PyTorch 2.13's at the same points in the same run.
//
//   bazel run -c opt //bench:scale_benchmark [-- --widths=128,256,512 --worlds=1,2,4,8
//                                                --iterations=2 --out_dir=DIR]
//
// Models: BenchTransformer (bench_transformer.h) at d_model 128, 256 and 512 (dim_feedforward
// 4 * d_model; vocab 8192, 8 heads, 6 + 6 layers as the default): 4.9M, 15.2M and 52.5M
// parameters (the last is the default model). FULL_SHARD, one unit per layer plus the root,
// Adam(lr 1e-4) after one warm-up step. World sizes 1, 2, 4, 8 (the binary starts as many ranks
// as the largest; the cases of a smaller world run on ranks {0, ..., N - 1} while the others
// wait). Cases, `BM_Scale/<op>/d_model:<w>/world:<N>`, each timed between barriers (the slowest
// rank counts), --iterations calls:
//   Step                       forward, cross-entropy backward and Adam step on this rank's
//                              batch (2 sequences of 8 tokens, as fsdp_step_benchmark).
//   FullOptimStateDict         GetOptimStateDict, FULL_STATE_DICT, rank0_only, offload_to_cpu.
//   ShardedOptimStateDict      ShardedOptimStateDict.
//   LoadShardedOptimStateDict  OptimStateDictToLoad of that dict (built untimed first),
//                              SHARDED_STATE_DICT, load_directly.
//   SaveSharded                SaveShardedCheckpoint of model + optimizer into a fresh
//                              directory (the previous call's removed, untimed).
//   LoadSharded                LoadShardedCheckpoint of that checkpoint.
// PyTorch (bench/pytorch_scale.py, under torchrun at the same world size, once per world size
// for every width, before our cases of that world size while every C++ rank holds no model):
// step by FSDP1 and FSDP2 (the faster counts), the full dict by FSDP1 (rank0_only), the sharded
// dict and its load by FSDP2, the save and load by dcp.save / dcp.load of FSDP2's state dicts.
//
// Counters: params; peak_rss_rank0 and peak_rss_max (VmHWM during the calls, reset after
// malloc_trim before them: rank 0's and the largest rank's; they include the model shard and
// Adam state resident before, base_rss_rank0); pytorch_ms, pytorch_fsdp, vs_pytorch,
// pytorch_peak_rss_rank0, pytorch_peak_rss_max, mem_vs_pytorch (pytorch_scale_reference.h).
// bench/render_results.py draws the curves (bench/render_scale.py).
//
// Cost: 8 ranks on 2 cores are slow, so each point runs few calls (2 by default) on a 16-token
// batch; the whole default grid took 8.5 minutes here at load 8-15 (bench/README.md).
// Errors: a bad flag exits 2 naming it; a failed call or PyTorch run skips that case and every
// later one with the status, and the binary exits non-zero.
#include <ATen/ATen.h>
#include <benchmark/benchmark.h>
#include <torch/optim/adam.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "bench/adam_job.h"
#include "bench/bench_transformer.h"
#include "bench/pytorch_scale_reference.h"
#include "bench/rank_harness.h"
#include "bench/rank_util.h"
#include "checkpoint/atomic_dir.h"
#include "checkpoint/sharded_checkpoint.h"
#include "comm/process_group.h"
#include "comm/rendezvous.h"
#include "comm/status_macros.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "optim_state/fsdp_optim_state.h"
#include "optim_state/optim_state_dict.h"
#include "optim_state/optimizer_adapter.h"
#include "optim_state/state_dict_type.h"

namespace fsdp::bench {
namespace {

using comm::ProcessGroup;
using optim_state::OptimizerAdapter;
using optim_state::OptimStateDict;

// Command word 0; kQuit (0) is the harness's; kFree: every rank drops its model (before
// PyTorch runs).
enum class Op : int64_t {
  kQuit,
  kStep,
  kFullOptim,
  kShardedOptim,
  kLoadShardedOptim,
  kSaveSharded,
  kLoadSharded,
  kFree
};

struct OpName {
  Op op;
  const char* ours;     // the case's name
  const char* pytorch;  // pytorch_scale.py's op
};
constexpr OpName kOps[] = {
    {Op::kStep, "Step", "step"},
    {Op::kFullOptim, "FullOptimStateDict", "full"},
    {Op::kShardedOptim, "ShardedOptimStateDict", "sharded"},
    {Op::kLoadShardedOptim, "LoadShardedOptimStateDict", "load"},
    {Op::kSaveSharded, "SaveSharded", "save"},
    {Op::kLoadSharded, "LoadSharded", "ckpt_load"},
};

struct Flags {
  std::vector<int64_t> widths = {128, 256, 512};
  std::vector<int64_t> worlds = {1, 2, 4, 8};
  int64_t iterations = 2;
  std::string out_dir;
};

struct Command {
  Op op = Op::kQuit;
  int64_t world_size = 0;
  int64_t width = 0;
  int64_t iterations = 0;

  CommandWords Words() const { return {static_cast<int64_t>(op), world_size, width, iterations}; }
  static Command From(const CommandWords& w) { return {static_cast<Op>(w[0]), w[1], w[2], w[3]}; }
};

// One point's model, its batch and optimizer, on the members of its group.
struct Setup : AdamJob {
  int64_t width = 0;
};

struct RankContext {
  Flags flags;
  const RankGroups* groups = nullptr;
  std::unique_ptr<Setup> setup;
  // Every rank's: --out_dir/fsdp-scalebench-<the launcher's pid>, which all ranks share without a
  // message; rank 0 makes it before the first case and removes it at the end.
  std::string run_dir;
  std::map<int64_t, PyTorchScaleFigures> pytorch;  // rank 0, by world size
};
RankContext* g_context = nullptr;

BenchTransformerConfig ConfigOfWidth(int64_t width) {
  BenchTransformerConfig config;
  config.d_model = width;
  config.dim_feedforward = 4 * width;
  return config;
}

// Builds the model of `width` on `group`, wraps it and takes one step (Adam's state).
absl::StatusOr<std::unique_ptr<Setup>> BuildSetup(std::shared_ptr<ProcessGroup> group,
                                                  int64_t width) {
  auto setup = std::make_unique<Setup>();
  setup->width = width;
  FSDP_RETURN_IF_ERROR(InitAdamJob(*setup, group, ConfigOfWidth(width), /*seq=*/8));
  return setup;
}

std::string CheckpointDir(const RankContext& context, const Setup& setup) {
  return absl::StrCat(context.run_dir, "/ours-w", setup.world_size, "-d", setup.width);
}

struct PointResult {
  double seconds = 0;  // per call
  int64_t params = 0;
  int64_t peak_rank0 = 0, peak_max = 0, base_rank0 = 0;
};

// What a case needs before its calls, untimed: the sharded dict it loads, or the checkpoint.
absl::StatusOr<OptimStateDict> Prepare(RankContext& context, Setup& setup, Op op) {
  if (op == Op::kLoadShardedOptim) {
    return optim_state::ShardedOptimStateDict(*setup.fsdp, *setup.adapter);
  }
  if (op == Op::kLoadSharded) {
    // Every rank asks rank 0 whether a SaveSharded case left the checkpoint.
    const std::string dir = CheckpointDir(context, setup);
    FSDP_ASSIGN_OR_RETURN(std::string there,
                          setup.group->BroadcastObject(
                              std::filesystem::exists(dir + "/metadata.json") ? "y" : "n", 0));
    if (there != "y") {
      FSDP_RETURN_IF_ERROR(
          checkpoint::SaveShardedCheckpoint(dir, *setup.fsdp, &*setup.adapter).status());
    }
  }
  return OptimStateDict();
}

// One call of the case's operation.
absl::Status Call(RankContext& context, Setup& setup, Op op, const OptimStateDict& input) {
  using optim_state::StateDictSettings;
  using optim_state::StateDictType;
  StateDictSettings settings;
  switch (op) {
    case Op::kStep:
      return TrainStep(setup);
    case Op::kFullOptim:
      settings.state_dict_type = StateDictType::kFullStateDict;
      settings.full_optim_config.rank0_only = true;
      settings.full_optim_config.offload_to_cpu = true;
      return optim_state::GetOptimStateDict(*setup.fsdp, *setup.adapter, settings).status();
    case Op::kShardedOptim:
      return optim_state::ShardedOptimStateDict(*setup.fsdp, *setup.adapter).status();
    case Op::kLoadShardedOptim: {
      settings.state_dict_type = StateDictType::kShardedStateDict;
      optim_state::OptimStateDictToLoadOptions options;
      options.load_directly = true;
      return optim_state::OptimStateDictToLoad(*setup.fsdp, *setup.adapter, input, settings,
                                               options)
          .status();
    }
    case Op::kSaveSharded:
      return checkpoint::SaveShardedCheckpoint(CheckpointDir(context, setup), *setup.fsdp,
                                               &*setup.adapter)
          .status();
    case Op::kLoadSharded:
      return checkpoint::LoadShardedCheckpoint(CheckpointDir(context, setup), *setup.fsdp,
                                               &*setup.adapter)
          .status();
    default:
      return absl::InvalidArgumentError("scale_benchmark: not a case");
  }
}

// Rank 0's value and the largest of the group's.
absl::StatusOr<std::pair<int64_t, int64_t>> Rank0AndMax(ProcessGroup& group, int64_t value) {
  FSDP_ASSIGN_OR_RETURN(std::vector<std::string> all, group.AllGatherObject(absl::StrCat(value)));
  int64_t largest = 0;
  for (const std::string& v : all) largest = std::max<int64_t>(largest, std::stoll(v));
  return std::make_pair(std::stoll(all.at(0)), largest);
}

// The case's calls on one member of its group, each between barriers; the previous save's
// directory is removed (untimed) before each SaveSharded call.
absl::StatusOr<PointResult> TimePoint(RankContext& context, Setup& setup, const Command& command) {
  ProcessGroup& g = *setup.group;
  FSDP_ASSIGN_OR_RETURN(OptimStateDict input, Prepare(context, setup, command.op));
  PointResult result;
  result.params = setup.params;
  ResetPeakRss();
  const int64_t base = CurrentRssBytes();
  double total = 0;
  for (int64_t i = 0; i < command.iterations; ++i) {
    if (command.op == Op::kSaveSharded && g.rank() == 0) {
      FSDP_RETURN_IF_ERROR(checkpoint::RemoveTree(CheckpointDir(context, setup)));
    }
    FSDP_RETURN_IF_ERROR(g.Barrier());
    const auto start = std::chrono::steady_clock::now();
    FSDP_RETURN_IF_ERROR(Call(context, setup, command.op, input));
    FSDP_RETURN_IF_ERROR(g.Barrier());
    total += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  result.seconds = total / static_cast<double>(std::max<int64_t>(command.iterations, 1));
  FSDP_ASSIGN_OR_RETURN(std::tie(result.peak_rank0, result.peak_max),
                        Rank0AndMax(g, PeakRssBytes()));
  result.base_rank0 = base;
  return result;
}

// Every rank runs this; ranks outside the command's group free their model and return.
absl::StatusOr<PointResult> RunCase(RankContext& context, const Command& command) {
  std::shared_ptr<ProcessGroup> group = context.groups->ForSize(command.world_size);
  if (command.op == Op::kFree || group == nullptr) {
    context.setup.reset();
    return PointResult{};
  }
  if (context.setup == nullptr || context.setup->world_size != command.world_size ||
      context.setup->width != command.width) {
    context.setup.reset();  // the previous point's model first
    FSDP_ASSIGN_OR_RETURN(context.setup, BuildSetup(group, command.width));
  }
  return TimePoint(context, *context.setup, command);
}

absl::Status FollowCommand(const RankGroups& groups, const CommandWords& words) {
  g_context->groups = &groups;
  return RunCase(*g_context, Command::From(words)).status();
}

// Rank 0: the case on every rank of the world (the others follow the command).
absl::StatusOr<PointResult> Dispatch(RankContext& context, const Command& command) {
  FSDP_RETURN_IF_ERROR(SendCommand(command.Words()));
  return RunCase(context, command);
}

// Rank 0: PyTorch's figures at `world_size` for every width, measured once while no C++ rank
// holds a model.
absl::StatusOr<const PyTorchScaleFigures*> PyTorchAt(RankContext& context, int64_t world_size) {
  auto it = context.pytorch.find(world_size);
  if (it != context.pytorch.end()) return &it->second;
  FSDP_RETURN_IF_ERROR(Dispatch(context, Command{Op::kFree, world_size, 0, 0}).status());
  PyTorchScaleRequest request;
  request.world_size = static_cast<int>(world_size);
  request.widths = context.flags.widths;
  request.iterations = static_cast<int>(context.flags.iterations);
  request.out_dir = context.run_dir;
  FSDP_ASSIGN_OR_RETURN(PyTorchScaleFigures figures, RunPyTorchScale(request));
  return &context.pytorch.emplace(world_size, std::move(figures)).first->second;
}

benchmark::Counter Bytes(double value) {
  return benchmark::Counter(value, benchmark::Counter::kDefaults, benchmark::Counter::kIs1024);
}

void BM_Scale(benchmark::State& state, const OpName& op, int64_t width, int64_t world_size) {
  RankContext& context = *g_context;
  if (SkipAfterFailure(state)) return;
  const PyTorchScaleFigures* pytorch = nullptr;
  absl::StatusOr<PointResult> result = [&]() -> absl::StatusOr<PointResult> {
    FSDP_ASSIGN_OR_RETURN(pytorch, PyTorchAt(context, world_size));
    return Dispatch(context, Command{op.op, world_size, width, context.flags.iterations});
  }();
  if (!result.ok()) return FailBenchmark(state, result.status());
  for (auto _ : state) state.SetIterationTime(result->seconds);
  state.counters["params"] = static_cast<double>(result->params);
  state.counters["peak_rss_rank0"] = Bytes(static_cast<double>(result->peak_rank0));
  state.counters["peak_rss_max"] = Bytes(static_cast<double>(result->peak_max));
  state.counters["base_rss_rank0"] = Bytes(static_cast<double>(result->base_rank0));
  auto theirs = pytorch->find({width, op.pytorch});
  if (theirs == pytorch->end()) {
    return FailBenchmark(state, absl::InternalError(absl::StrCat("PyTorch's reference printed no ",
                                                                 op.pytorch, " at d_model ", width,
                                                                 ", world size ", world_size)));
  }
  AddVsPyTorchCounters(state, result->seconds * 1e3, static_cast<double>(result->peak_rank0),
                       theirs->second);
}

void RegisterCases(const RankGroups& groups) {
  RankContext& context = *g_context;
  context.groups = &groups;
  // In the JSON's context, so that the rendered results say which grid they are.
  benchmark::AddCustomContext("scale_settings",
                              absl::StrCat("widths=", absl::StrJoin(context.flags.widths, ","),
                                           " worlds=", absl::StrJoin(context.flags.worlds, ","),
                                           " iterations=", context.flags.iterations));
  // World size outermost, then width: each model is built once for its six cases.
  for (int64_t world : context.flags.worlds) {
    for (int64_t width : context.flags.widths) {
      for (const OpName& op : kOps) {
        benchmark::RegisterBenchmark(
            absl::StrCat("BM_Scale/", op.ours, "/d_model:", width, "/world:", world).c_str(),
            [&op, width, world](benchmark::State& state) { BM_Scale(state, op, width, world); })
            ->Iterations(context.flags.iterations)
            ->UseManualTime()
            ->Unit(benchmark::kMillisecond);
      }
    }
  }
}

absl::StatusOr<std::vector<int64_t>> ParseList(const std::string& flag, const std::string& text) {
  std::vector<int64_t> values;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    int64_t v = 0;
    if (!absl::SimpleAtoi(part, &v) || v <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(flag, "=", text, ": expected positive integers separated by commas"));
    }
    values.push_back(v);
  }
  return values;
}

// Our flags out of argv (the rest goes to Google Benchmark).
absl::StatusOr<Flags> ParseFlags(int argc, char** argv, std::vector<char*>& rest) {
  Flags flags;
  const char* tmp = std::getenv("TMPDIR");
  flags.out_dir = tmp != nullptr && *tmp != '\0' ? tmp : "/tmp";
  for (int i = 0; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto value = [&](absl::string_view name) { return arg.substr(name.size()); };
    if (i > 0 && arg.rfind("--widths=", 0) == 0) {
      FSDP_ASSIGN_OR_RETURN(flags.widths, ParseList("--widths", value("--widths=")));
    } else if (i > 0 && arg.rfind("--worlds=", 0) == 0) {
      FSDP_ASSIGN_OR_RETURN(flags.worlds, ParseList("--worlds", value("--worlds=")));
    } else if (i > 0 && arg.rfind("--iterations=", 0) == 0) {
      FSDP_ASSIGN_OR_RETURN(std::vector<int64_t> n,
                            ParseList("--iterations", value("--iterations=")));
      flags.iterations = n.at(0);
    } else if (i > 0 && arg.rfind("--out_dir=", 0) == 0) {
      flags.out_dir = value("--out_dir=");
    } else {
      rest.push_back(argv[i]);
    }
  }
  for (int64_t width : flags.widths) {
    if (width % 8 != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("--widths: ", width, " is not a multiple of the 8 attention heads"));
    }
  }
  return flags;
}

int Main(int argc, char** argv) {
  RankContext context;
  std::vector<char*> args;
  absl::StatusOr<Flags> flags = ParseFlags(argc, argv, args);
  if (!flags.ok()) {
    std::fprintf(stderr, "scale_benchmark: %s\n", std::string(flags.status().message()).c_str());
    return 2;
  }
  context.flags = *std::move(flags);
  const int64_t ranks = *std::max_element(context.flags.worlds.begin(), context.flags.worlds.end());
  if (!comm::LaunchedByLauncher()) {
    return LaunchSelfAsRanks(argc, argv, static_cast<int>(ranks), "scale_benchmark");
  }
  RankHarnessOptions options;
  options.name = "scale_benchmark";
  options.collective_timeout = std::chrono::minutes(10);
  options.command_timeout = std::chrono::minutes(90);
  options.subgroup_sizes.assign(context.flags.worlds.begin(), context.flags.worlds.end());
  context.run_dir = absl::StrCat(context.flags.out_dir, "/fsdp-scalebench-", getppid());
  std::error_code error;
  const bool rank0 = std::getenv("RANK") != nullptr && std::string(std::getenv("RANK")) == "0";
  if (rank0 && !std::filesystem::create_directories(context.run_dir, error)) {
    std::fprintf(stderr, "scale_benchmark: cannot create %s: %s\n", context.run_dir.c_str(),
                 error ? error.message().c_str() : "it exists");
    return 1;
  }
  g_context = &context;
  const int exit_code = RunRankHarness(static_cast<int>(args.size()), args.data(), options,
                                       RegisterCases, FollowCommand);
  g_context = nullptr;
  context.setup.reset();
  if (rank0) std::filesystem::remove_all(context.run_dir, error);
  return exit_code;
}

}  // namespace
}  // namespace fsdp::bench

int main(int argc, char** argv) { return fsdp::bench::Main(argc, argv); }
