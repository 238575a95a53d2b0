// optim_state_benchmark: FSDP's optimizer-state dict functions (optim_state/) on a 52.5M-
// parameter transformer with Adam state, each timed against the raw collective that moves the
// same bytes over the same group in the same run.
//
//   bazel run -c opt //bench:optim_state_benchmark [-- --benchmark_filter=Full ...]
//
// Cases (one benchmark per function and world size, world size 2 first, then 4):
//   FullOptimStateDict        GetOptimStateDict, FULL_STATE_DICT, rank0_only, offload_to_cpu
//                             (PyTorch's full_optim_state_dict(rank0_only=True) with CPU
//                             offload). Reference: all-gather of the state bytes.
//   ShardedOptimStateDict     sharded_optim_state_dict (FSDP1's dim-0 chunks). Reference:
//                             all-gather.
//   LocalShardedOptimStateDict  GetOptimStateDict, SHARDED_STATE_DICT with local_shards: this
//                             rank's own flat-shard pieces, views (what FSDP2's
//                             get_optimizer_state_dict does). Reference: all-gather (it moves
//                             nothing, so vs_collective only says how far below that it is).
//   FlattenShardedOptimStateDict/local  flatten_sharded_optim_state_dict of that dict: the
//                             same layout, so nothing moves. Reference: all-gather.
//   OptimStateDictToLoad/sharded_local  optim_state_dict_to_load of that dict with
//                             load_directly (the optimizer adopts the tensors, as
//                             torch.optim's load_state_dict). Reference: all-gather.
//   FlattenShardedOptimStateDict  flatten_sharded_optim_state_dict of the dict the previous
//                             function made. Reference: all-gather.
//   OptimStateDictToLoad/sharded  optim_state_dict_to_load under SHARDED_STATE_DICT with
//                             load_directly (flatten, then load into Adam). Reference:
//                             all-gather.
//   ShardFullOptimStateDict   shard_full_optim_state_dict of a full dict every rank holds.
//                             No communication: the reference is copying this rank's share
//                             of the state bytes (state bytes / world) in memory.
//   ScatterFullOptimStateDict scatter_full_optim_state_dict of a full dict on rank 0 only.
//                             Reference: broadcast of the state bytes from rank 0 (one
//                             broadcast per shard is what the function is documented to do);
//                             also `vs_scatter`, against rank 0 sending each rank only its
//                             shard (send/recv), the least a scatter must move.
//   OptimStateDictToLoad/full_rank0  optim_state_dict_to_load under FULL_STATE_DICT with
//                             rank0_only and load_directly (scatter, then load). Reference:
//                             broadcast (and vs_scatter).
//
// The model: BenchTransformer (bench_transformer.h), FULL_SHARD, one unit per transformer layer
// plus the root, Adam(lr 1e-4) after one real training step (forward, backward,
// OptimizerAdapter::Step), so every flat parameter has `step`, `exp_avg`, `exp_avg_sq`.
// "State bytes" = the bytes of `exp_avg` and `exp_avg_sq` of the whole unsharded model
// (2 x 52.5M float32 = 420 MB): what every function has to move or produce.
//
// Counters (rank 0's wall time per call, from a barrier before to a barrier after it, so the
// slowest rank counts; UseManualTime; SetBytesProcessed = state bytes per iteration):
//   vs_collective   API time / reference time, summed over the iterations (goal: <= 1.5).
//   vs_scatter      (scatter cases) API time / send-recv scatter time.
//   ref_ms          the reference's time per call.
//   peak_rss_rank0  rank 0's VmHWM during the case (reset before it through
//                   /proc/self/clear_refs, after malloc_trim), minus the reference's buffers,
//                   which are resident throughout; includes the model, its Adam state and the
//                   case's input dict, which are resident before the calls.
//   peak_rss_other  the same for the group's other ranks (the largest), bytes.
//   base_rss_rank0  rank 0's VmRSS right before the calls (reference buffers left out).
//   vs_pytorch      (Full, Sharded, LocalSharded, OptimStateDictToLoad/sharded[_local]) API
//                   time / PyTorch 2.13's time for the same operation on the model's twin at the
//                   same world size, the faster of FSDP1 and FSDP2 (pytorch_fsdp: 1 or 2;
//                   pytorch_ms its time), measured by bench/pytorch_optim_state.py under torchrun
//                   from rank 0 once per world size, in the same run (goal: <= 0.5).
//   mem_vs_pytorch  peak_rss_rank0 / that PyTorch run's rank 0 VmHWM during its calls (a whole
//                   Python process's, interpreter included; ours leaves the reference's buffers
//                   out) (goal: < 1).
//
// How it runs: as comm_benchmark, the binary re-executes itself as 4 ranks (OMP_NUM_THREADS=1
// unless set). Rank 0 runs Google Benchmark; before each case it broadcasts a command (case,
// world size, iterations) on the full group; the case's group (ranks {0, 1} or all four)
// builds the model when the world size changes, prepares the case's input dict and the
// reference's buffers, then runs kIterations iterations of: one API call, one reference call
// (and for scatter cases one send/recv scatter), each between barriers. Interleaving them makes
// the API and its reference see the same load on a shared machine. The whole binary takes a
// few minutes.
#include <ATen/ATen.h>
#include <benchmark/benchmark.h>
#include <c10/util/Exception.h>
#include <torch/optim/adam.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "bench/adam_job.h"
#include "bench/bench_transformer.h"
#include "bench/pytorch_reference.h"
#include "bench/rank_harness.h"
#include "bench/rank_util.h"
#include "comm/launcher.h"
#include "comm/process_group.h"
#include "comm/rendezvous.h"
#include "comm/status_macros.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "optim_state/fsdp_optim_state.h"
#include "optim_state/local_sharded_optim_state.h"
#include "optim_state/optim_state_dict.h"
#include "optim_state/optimizer_adapter.h"
#include "optim_state/state_dict_type.h"

namespace fsdp::bench {
namespace {

using comm::ProcessGroup;
using optim_state::OptimizerAdapter;
using optim_state::OptimStateDict;

constexpr int kLaunchedRanks = 4;
constexpr int64_t kIterations = 3;  // timed calls per case
constexpr std::chrono::milliseconds kCollectiveTimeout = std::chrono::minutes(5);
constexpr std::chrono::milliseconds kJobTimeout = std::chrono::minutes(60);

enum class Op : int64_t {
  kQuit = 0,
  kFull = 1,
  kSharded = 2,
  kFlattenSharded = 3,
  kToLoadSharded = 4,
  kShardFull = 5,
  kScatterFull = 6,
  kToLoadFull = 7,
  kLocalSharded = 8,
  kFlattenLocal = 9,
  kToLoadLocal = 10,
};

// The input dict a case needs, prepared before its timed calls.
enum class Input { kNone, kSharded, kLocalSharded, kFullEveryRank, kFullRank0 };

// How a case's reference moves the state bytes.
enum class Reference { kAllGather, kBroadcast, kLocalCopy };

struct Case {
  Op op;
  const char* name;
  Input input;
  Reference reference;
};

// In the order they run at each world size (cases that share an input are adjacent).
constexpr Case kCases[] = {
    {Op::kFull, "FullOptimStateDict/rank0_only_offload", Input::kNone, Reference::kAllGather},
    {Op::kSharded, "ShardedOptimStateDict", Input::kNone, Reference::kAllGather},
    {Op::kFlattenSharded, "FlattenShardedOptimStateDict", Input::kSharded, Reference::kAllGather},
    {Op::kToLoadSharded, "OptimStateDictToLoad/sharded", Input::kSharded, Reference::kAllGather},
    {Op::kLocalSharded, "LocalShardedOptimStateDict", Input::kNone, Reference::kAllGather},
    {Op::kFlattenLocal, "FlattenShardedOptimStateDict/local", Input::kLocalSharded,
     Reference::kAllGather},
    {Op::kToLoadLocal, "OptimStateDictToLoad/sharded_local", Input::kLocalSharded,
     Reference::kAllGather},
    {Op::kShardFull, "ShardFullOptimStateDict", Input::kFullEveryRank, Reference::kLocalCopy},
    {Op::kScatterFull, "ScatterFullOptimStateDict", Input::kFullRank0, Reference::kBroadcast},
    {Op::kToLoadFull, "OptimStateDictToLoad/full_rank0", Input::kFullRank0, Reference::kBroadcast},
};

const Case* FindCase(Op op) {
  for (const Case& c : kCases) {
    if (c.op == op) return &c;
  }
  return nullptr;
}

struct Command {
  Op op = Op::kQuit;
  int64_t world_size = 0;
  int64_t iterations = 0;

  CommandWords Words() const { return {static_cast<int64_t>(op), world_size, iterations}; }
  static Command From(const CommandWords& w) { return {static_cast<Op>(w[0]), w[1], w[2]}; }
};

// One world size's model, optimizer and the current input dict, on the members of its group.
struct Setup : AdamJob {
  int64_t state_bytes = 0;
  Input input_kind = Input::kNone;
  OptimStateDict input;
};

struct RankContext {
  const RankGroups* groups = nullptr;
  std::unique_ptr<Setup> setup;
};

RankContext* g_context = nullptr;

// Builds the model on `group`, wraps it, and takes one Adam step so the state exists.
absl::StatusOr<std::unique_ptr<Setup>> BuildSetup(std::shared_ptr<ProcessGroup> group) {
  auto setup = std::make_unique<Setup>();
  FSDP_RETURN_IF_ERROR(InitAdamJob(*setup, group, BenchTransformerConfig{}, /*seq=*/16));
  setup->state_bytes = 2 * setup->params * static_cast<int64_t>(sizeof(float));
  return setup;
}

absl::Status PrepareInput(Setup& setup, Input kind) {
  if (setup.input_kind == kind) return absl::OkStatus();
  setup.input = OptimStateDict();
  setup.input_kind = Input::kNone;
  absl::StatusOr<OptimStateDict> input = OptimStateDict();
  switch (kind) {
    case Input::kNone:
      break;
    case Input::kSharded:
      input = optim_state::ShardedOptimStateDict(*setup.fsdp, *setup.adapter);
      break;
    case Input::kLocalSharded:
      input = optim_state::LocalShardedOptimStateDict(*setup.fsdp, *setup.adapter);
      break;
    case Input::kFullEveryRank:
    case Input::kFullRank0: {
      optim_state::FullOptimStateDictOptions options;
      options.rank0_only = kind == Input::kFullRank0;
      input = optim_state::FullOptimStateDict(*setup.fsdp, *setup.adapter, options);
      break;
    }
  }
  if (!input.ok()) return input.status();
  setup.input = *std::move(input);
  setup.input_kind = kind;
  return absl::OkStatus();
}

// One call of the case's function; the result is dropped.
absl::Status RunOp(Setup& setup, Op op) {
  using optim_state::StateDictSettings;
  using optim_state::StateDictType;
  absl::StatusOr<OptimStateDict> result = OptimStateDict();
  switch (op) {
    case Op::kFull: {
      StateDictSettings settings;
      settings.state_dict_type = StateDictType::kFullStateDict;
      settings.full_optim_config.rank0_only = true;
      settings.full_optim_config.offload_to_cpu = true;
      result = optim_state::GetOptimStateDict(*setup.fsdp, *setup.adapter, settings);
      break;
    }
    case Op::kSharded:
      result = optim_state::ShardedOptimStateDict(*setup.fsdp, *setup.adapter);
      break;
    case Op::kLocalSharded: {
      StateDictSettings settings;
      settings.state_dict_type = StateDictType::kShardedStateDict;
      settings.sharded_optim_config.local_shards = true;
      result = optim_state::GetOptimStateDict(*setup.fsdp, *setup.adapter, settings);
      break;
    }
    case Op::kFlattenSharded:
    case Op::kFlattenLocal:
      result = optim_state::FlattenShardedOptimStateDict(setup.input, *setup.fsdp, *setup.adapter);
      break;
    case Op::kToLoadSharded:
    case Op::kToLoadLocal: {
      StateDictSettings settings;
      settings.state_dict_type = StateDictType::kShardedStateDict;
      settings.sharded_optim_config.local_shards = op == Op::kToLoadLocal;
      optim_state::OptimStateDictToLoadOptions options;
      options.load_directly = true;
      result = optim_state::OptimStateDictToLoad(*setup.fsdp, *setup.adapter, setup.input, settings,
                                                 options);
      break;
    }
    case Op::kShardFull:
      result = optim_state::ShardFullOptimStateDict(setup.input, *setup.fsdp, *setup.adapter);
      break;
    case Op::kScatterFull:
      result = optim_state::ScatterFullOptimStateDict(setup.input, *setup.fsdp, *setup.adapter);
      break;
    case Op::kToLoadFull: {
      StateDictSettings settings;
      settings.state_dict_type = StateDictType::kFullStateDict;
      settings.full_optim_config.rank0_only = true;
      optim_state::OptimStateDictToLoadOptions options;
      options.load_directly = true;
      result = optim_state::OptimStateDictToLoad(*setup.fsdp, *setup.adapter, setup.input, settings,
                                                 options);
      break;
    }
    case Op::kQuit:
      return absl::InvalidArgumentError("optim_state_benchmark: not a case");
  }
  return result.status();
}

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// The reference's buffers (float32, `bytes` split into `world` shards), allocated and touched
// before the clock starts and resident during the whole case.
struct ReferenceBuffers {
  int64_t shard_numel = 0;
  at::Tensor full;   // all-gather output / broadcast buffer (rank 0's scatter source)
  at::Tensor shard;  // all-gather input / scatter destination / copy source
  at::Tensor copy_target;

  ReferenceBuffers(Reference reference, int64_t bytes, int world) {
    shard_numel = (bytes / static_cast<int64_t>(sizeof(float)) + world - 1) / world;
    shard = at::ones({shard_numel}, at::kFloat);
    if (reference == Reference::kLocalCopy) {
      copy_target = at::zeros({shard_numel}, at::kFloat);
    } else {
      full = at::ones({shard_numel * world}, at::kFloat);
    }
  }
  int64_t resident_bytes() const {
    int64_t n = shard.numel();
    if (full.defined()) n += full.numel();
    if (copy_target.defined()) n += copy_target.numel();
    return n * static_cast<int64_t>(sizeof(float));
  }
};

// One call of the reference over `group` (every member calls it).
absl::Status RunReference(ProcessGroup& group, Reference reference, ReferenceBuffers& buffers) {
  switch (reference) {
    case Reference::kAllGather:
      return group.AllGatherIntoTensor(buffers.full, buffers.shard);
    case Reference::kBroadcast:
      return group.Broadcast(buffers.full, /*root=*/0);
    case Reference::kLocalCopy:
      buffers.copy_target.copy_(buffers.shard);
      return absl::OkStatus();
  }
  return absl::InvalidArgumentError("not a reference");
}

// The least a scatter moves: rank 0 sends each other rank its 1 / world of the bytes.
absl::Status RunSendRecvScatter(ProcessGroup& group, ReferenceBuffers& buffers, int tag) {
  const int64_t n = buffers.shard_numel;
  if (group.rank() != 0) return group.Recv(buffers.shard, 0, tag);
  for (int r = 1; r < group.size(); ++r) {
    if (absl::Status s = group.Send(buffers.full.narrow(0, r * n, n), r, tag); !s.ok()) return s;
  }
  buffers.shard.copy_(buffers.full.narrow(0, 0, n));
  return absl::OkStatus();
}

// Seconds `fn` takes on this rank, started right after a barrier of the group (so no rank's
// time includes waiting for a straggler from the previous step) and ended by a barrier (so
// the slowest rank counts).
template <typename Fn>
absl::StatusOr<double> TimeBetweenBarriers(ProcessGroup& group, Fn&& fn) {
  if (absl::Status s = group.Barrier(); !s.ok()) return s;
  const auto start = std::chrono::steady_clock::now();
  if (absl::Status s = fn(); !s.ok()) return s;
  if (absl::Status s = group.Barrier(); !s.ok()) return s;
  return SecondsSince(start);
}

struct CaseResult {
  double api_seconds = 0;  // per call
  double reference_seconds = 0;
  double scatter_seconds = 0;  // scatter cases only
  int64_t peak_rank0 = 0;
  int64_t peak_other = 0;
  int64_t base_rank0 = 0;
  int64_t state_bytes = 0;
};

// Every member of the command's group runs this; on rank 0 `state` is Google Benchmark's
// (manual time: each iteration reports the API call's time), elsewhere null. Non-members
// return right away. Each iteration runs the API call, then the reference (and the send/recv
// scatter), each between barriers, so API and reference see the same load on a busy machine.
absl::StatusOr<CaseResult> RunCase(RankContext& context, const Command& command,
                                   benchmark::State* state) {
  std::shared_ptr<ProcessGroup> group = context.groups->ForSize(command.world_size);
  if (group == nullptr) return CaseResult{};
  const Case* c = FindCase(command.op);
  if (c == nullptr) return absl::InvalidArgumentError("unknown case");
  if (context.setup == nullptr || context.setup->world_size != command.world_size) {
    context.setup.reset();  // frees the other world size's model first
    absl::StatusOr<std::unique_ptr<Setup>> setup = BuildSetup(group);
    if (!setup.ok()) return setup.status();
    context.setup = *std::move(setup);
  }
  Setup& setup = *context.setup;
  if (absl::Status s = PrepareInput(setup, c->input); !s.ok()) return s;
  ReferenceBuffers buffers(c->reference, setup.state_bytes, group->size());

  CaseResult result;
  result.state_bytes = setup.state_bytes;
  ResetPeakRss();
  // The reference's buffers stay resident throughout: left out of the reported memory.
  const int64_t excluded = buffers.resident_bytes();
  result.base_rank0 = CurrentRssBytes() - excluded;
  double api_total = 0, reference_total = 0, scatter_total = 0;
  auto iteration = [&](int64_t i) -> absl::Status {
    absl::StatusOr<double> api = TimeBetweenBarriers(*group, [&] { return RunOp(setup, c->op); });
    if (!api.ok()) return api.status();
    if (state != nullptr) state->SetIterationTime(*api);
    api_total += *api;
    absl::StatusOr<double> reference =
        TimeBetweenBarriers(*group, [&] { return RunReference(*group, c->reference, buffers); });
    if (!reference.ok()) return reference.status();
    reference_total += *reference;
    if (c->reference == Reference::kBroadcast) {
      absl::StatusOr<double> scatter = TimeBetweenBarriers(
          *group, [&] { return RunSendRecvScatter(*group, buffers, static_cast<int>(i)); });
      if (!scatter.ok()) return scatter.status();
      scatter_total += *scatter;
    }
    return absl::OkStatus();
  };
  if (state != nullptr) {
    int64_t i = 0;
    for (auto _ : *state) {
      if (absl::Status s = iteration(i++); !s.ok()) return s;
    }
  } else {
    for (int64_t i = 0; i < command.iterations; ++i) {
      if (absl::Status s = iteration(i); !s.ok()) return s;
    }
  }
  const double n = static_cast<double>(command.iterations);
  result.api_seconds = api_total / n;
  result.reference_seconds = reference_total / n;
  result.scatter_seconds = scatter_total / n;
  const int64_t peak = PeakRssBytes() - excluded;

  absl::StatusOr<std::vector<std::string>> peaks = group->AllGatherObject(std::to_string(peak));
  if (!peaks.ok()) return peaks.status();
  result.peak_rank0 = std::stoll((*peaks)[0]);
  for (size_t r = 1; r < peaks->size(); ++r) {
    result.peak_other = std::max<int64_t>(result.peak_other, std::stoll((*peaks)[r]));
  }
  return result;
}

// Ranks other than 0: the case rank 0 runs, if this rank is in its group.
absl::Status FollowCommand(const RankGroups& groups, const CommandWords& words) {
  g_context->groups = &groups;
  return RunCase(*g_context, Command::From(words), nullptr).status();
}

benchmark::Counter Bytes(double value) {
  return benchmark::Counter(value, benchmark::Counter::kDefaults, benchmark::Counter::kIs1024);
}

// PyTorch's name (bench/pytorch_optim_state.py's op) of the case's operation; null when PyTorch
// has none to compare with.
const char* PyTorchOp(Op op) {
  switch (op) {
    case Op::kFull:
      return "full";
    case Op::kSharded:
    case Op::kLocalSharded:
      return "sharded";
    case Op::kToLoadSharded:
    case Op::kToLoadLocal:
      return "load";
    default:
      return nullptr;
  }
}

// PyTorch 2.13's figures for `op` at `world_size` (FSDP1 and FSDP2, each a line), measured once
// per world size by bench/pytorch_optim_state.py under torchrun.
absl::StatusOr<std::vector<std::map<std::string, std::string>>> PyTorchFigures(int64_t world_size,
                                                                               const char* op) {
  static std::map<int64_t, absl::StatusOr<std::vector<std::map<std::string, std::string>>>> runs;
  auto it = runs.find(world_size);
  if (it == runs.end()) {
    it = runs.emplace(world_size, RunPyTorchReference("bench/pytorch_optim_state.py",
                                                      static_cast<int>(world_size),
                                                      {absl::StrCat("--iterations=", kIterations)},
                                                      "PYTORCH_OPTIM_STATE"))
             .first;
  }
  if (!it->second.ok()) return it->second.status();
  std::vector<std::map<std::string, std::string>> lines;
  for (const auto& fields : *it->second) {
    auto found = fields.find("op");
    if (found != fields.end() && found->second == op) lines.push_back(fields);
  }
  return lines;
}

// vs_pytorch (our time / the faster PyTorch wrapper's), pytorch_ms, pytorch_fsdp (which one:
// 1 or 2) and mem_vs_pytorch (our rank 0 peak / that wrapper's rank 0 peak).
absl::Status AddPyTorchCounters(benchmark::State& state, Op op, int64_t world_size,
                                const CaseResult& result) {
  const char* name = PyTorchOp(op);
  if (name == nullptr) return absl::OkStatus();
  FSDP_ASSIGN_OR_RETURN(auto lines, PyTorchFigures(world_size, name));
  double best_ms = 0, best_peak = 0, best_fsdp = 0;
  for (const auto& fields : lines) {
    FSDP_ASSIGN_OR_RETURN(const double ms, NumberField(fields, "ms"));
    FSDP_ASSIGN_OR_RETURN(const double peak, NumberField(fields, "peak_rss"));
    if (best_ms == 0 || ms < best_ms) {
      best_ms = ms;
      best_peak = peak;
      best_fsdp = fields.at("wrapper") == "fsdp1" ? 1 : 2;
    }
  }
  if (best_ms == 0) {
    return absl::InternalError(absl::StrCat("PyTorch's reference printed no '", name, "' line"));
  }
  state.counters["pytorch_ms"] = best_ms;
  state.counters["pytorch_fsdp"] = best_fsdp;
  state.counters["vs_pytorch"] = result.api_seconds * 1e3 / best_ms;
  state.counters["mem_vs_pytorch"] = static_cast<double>(result.peak_rank0) / best_peak;
  return absl::OkStatus();
}

void BM_OptimState(benchmark::State& state, Op op, int64_t world_size) {
  RankContext& context = *g_context;
  if (SkipAfterFailure(state)) return;
  if (context.groups->ForSize(world_size) == nullptr) {
    state.SkipWithError(absl::StrCat("no group of ", world_size, " ranks").c_str());
    return;
  }
  const Command command{op, world_size, static_cast<int64_t>(state.max_iterations)};
  absl::Status status = SendCommand(command.Words());
  absl::StatusOr<CaseResult> result =
      status.ok() ? RunCase(context, command, &state) : absl::StatusOr<CaseResult>(status);
  if (!result.ok()) return FailBenchmark(state, result.status());
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * result->state_bytes);
  state.counters["vs_collective"] = result->api_seconds / result->reference_seconds;
  if (result->scatter_seconds > 0) {
    state.counters["vs_scatter"] = result->api_seconds / result->scatter_seconds;
  }
  state.counters["ref_ms"] = result->reference_seconds * 1e3;
  state.counters["peak_rss_rank0"] = Bytes(static_cast<double>(result->peak_rank0));
  state.counters["peak_rss_other"] = Bytes(static_cast<double>(result->peak_other));
  state.counters["base_rss_rank0"] = Bytes(static_cast<double>(result->base_rank0));
  state.counters["state_bytes"] = Bytes(static_cast<double>(result->state_bytes));
  if (absl::Status pytorch = AddPyTorchCounters(state, op, world_size, *result); !pytorch.ok()) {
    return FailBenchmark(state, pytorch);
  }
}

void RegisterCases(const RankGroups& groups) {
  g_context->groups = &groups;
  for (int64_t world_size : {2, 4}) {
    for (const Case& c : kCases) {
      const Op op = c.op;
      benchmark::RegisterBenchmark(
          absl::StrCat("BM_", c.name, "/world:", world_size).c_str(),
          [op, world_size](benchmark::State& state) { BM_OptimState(state, op, world_size); })
          ->Iterations(kIterations)
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond);
    }
  }
}

int RunRank(int argc, char** argv) {
  RankHarnessOptions options;
  options.name = "optim_state_benchmark";
  options.collective_timeout = kCollectiveTimeout;
  options.command_timeout = kJobTimeout;
  options.subgroup_sizes = {2};
  RankContext context;
  g_context = &context;
  const int exit_code = RunRankHarness(argc, argv, options, RegisterCases, FollowCommand);
  g_context = nullptr;
  return exit_code;
}

}  // namespace
}  // namespace fsdp::bench

int main(int argc, char** argv) {
  if (!fsdp::comm::LaunchedByLauncher()) {
    return fsdp::bench::LaunchSelfAsRanks(argc, argv, fsdp::bench::kLaunchedRanks,
                                          "optim_state_benchmark");
  }
  return fsdp::bench::RunRank(argc, argv);
}
