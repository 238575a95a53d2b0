// fsdp_step_benchmark: one training step (forward, backward, Adam step) of the 52.5M-parameter
// BenchTransformer (bench_transformer.h) under FSDP's FULL_SHARD (with PyTorch's default
// prefetching, BACKWARD_PRE; without prefetching; with BACKWARD_POST and forward_prefetch),
// SHARD_GRAD_OP and NO_SHARD and unwrapped, on 2 ranks, with each rank's peak memory; and
// PyTorch 2.13's own FULL_SHARD step (FSDP1 and FSDP2) on the same shapes in the same run.
//
//   bazel run -c opt //bench:fsdp_step_benchmark [-- --benchmark_filter=FULL_SHARD]
//       [--glibc_default_malloc] [--benchmark_repetitions=N]
//
// Each rank trains on its own batch of kBatch sequences of kSeq tokens (source and target:
// 2 x kSeq x kBatch tokens per rank and step); wrapped models have one unit per transformer
// layer plus the root. "unwrapped" is the same model and optimizer with no FSDP at all: each
// rank trains alone, nothing is communicated (the compute floor).
//
// Per case, on both ranks: build the model (same seed) and Adam(lr 1e-4), take one warm-up
// step (it creates the Adam state), reset the peak RSS (/proc/self/clear_refs), time
// kIterations steps, read the peak, free everything; then build a NO_SHARD model the same way
// and time as many of its steps: the case's reference, measured in the same run right after,
// so the ratio holds on a noisy machine.
//
// Counters (rank 0's wall time per step; UseRealTime; SetBytesProcessed = parameter bytes per
// step, i.e. the model's weights processed once per step):
//   vs_no_shard        step time / NO_SHARD step time (goal for FULL_SHARD: <= 1.5).
//   vs_pytorch         FULL_SHARD cases: step time / the faster of PyTorch's FSDP1 and FSDP2
//                      FULL_SHARD steps (pytorch_fsdp1_ms, pytorch_fsdp2_ms), measured by
//                      bench/pytorch_fsdp_step.py under torchrun on 2 ranks with the same
//                      threads, batch shapes, step count and allocator setting (see
//                      kMmapThresholdBytes), right before each FULL_SHARD case and repetition
//                      (while our ranks are idle). Its model is BenchTransformer's twin in
//                      torch.nn (PyTorch's attention is scaled_dot_product_attention, ours
//                      bmm + softmax).
//   cpu_ms, faults_per_step  rank 0's CPU time (all threads) and minor page faults per step;
//                      pytorch_fsdp1/2_cpu_ms and _faults the same for PyTorch's rank 0;
//                      cpu_vs_pytorch = cpu_ms / the smaller of PyTorch's (steadier than the
//                      wall-time ratio when other jobs share the cores).
//   no_shard_ms        the reference NO_SHARD step time.
//   peak_rss_rank0/1   each rank's VmHWM during the timed steps (bytes).
//   step_mem_rank0/1   that peak minus the rank's VmRSS before the model was built: the memory
//                      the model, its gradients, Adam state and the step's buffers take.
//   held_mem_rank0     rank 0's VmRSS between steps (after the warm-up step) minus the same
//                      baseline: what stays resident; step_mem - held_mem is the step's
//                      transient memory (activations, gathered units, gradients in flight).
//   local_state_bytes  rank 0's parameters + gradients + Adam state (exp_avg, exp_avg_sq) as
//                      the optimizer holds them (flat shards for FULL_SHARD / SHARD_GRAD_OP).
//   param_bytes, optim_bytes  the whole unsharded model's parameter and Adam-state bytes.
//   largest_unit_bytes the largest unit's padded unsharded flat parameter.
//   mmap_threshold     allocations from this size on are mmapped and unmapped when freed
//                      (kMmapThresholdBytes), so freed gathered units leave the RSS at once.
//   shard_target       (2 x param_bytes + optim_bytes) / 2 + largest_unit_bytes: a rank's
//                      share of parameters, gradients and Adam state plus one gathered unit,
//                      what FULL_SHARD should stay near per rank.
#include <ATen/ATen.h>
#include <benchmark/benchmark.h>
#include <torch/optim/adam.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "bench/bench_transformer.h"
#include "bench/pytorch_reference.h"
#include "bench/rank_harness.h"
#include "bench/rank_util.h"
#include "comm/launcher.h"
#include "comm/process_group.h"
#include "comm/rendezvous.h"
#include "comm/status_macros.h"
#include "fsdp/fully_sharded_data_parallel.h"

namespace fsdp::bench {
namespace {

using comm::ProcessGroup;

constexpr int kLaunchedRanks = 2;
constexpr int64_t kIterations = 2;  // timed steps per case (and reference steps)
constexpr int64_t kSeq = 8;
constexpr int64_t kBatch = 2;
constexpr std::chrono::milliseconds kCollectiveTimeout = std::chrono::minutes(5);
constexpr std::chrono::milliseconds kJobTimeout = std::chrono::minutes(60);
// Allocations from this size on get their own mmap (MmapAllocationsFrom, rank_util.h), so the
// peak RSS counts what the step holds, not freed gathered units that glibc's heap retains
// (measured at world 2, FULL_SHARD: step_mem 592 MiB with glibc's default, 518 MiB with this).
// The same setting is given to PyTorch's ranks (an allocator that reuses freed heap memory
// takes far fewer page faults: both sides must run with the same one). --glibc_default_malloc
// keeps glibc's dynamic threshold on both sides instead (the peaks then count freed memory the
// heap retains).
constexpr int64_t kMmapThresholdBytes = 256 << 10;
bool g_default_malloc = false;

enum class Mode : int64_t {
  kQuit = 0,
  kFullShard = 1,
  kShardGradOp = 2,
  kNoShard = 3,
  kUnwrapped = 4,
  kFullShardNoPrefetch = 5,
  kFullShardPostAndForward = 6,
};

bool IsFullShard(Mode mode) {
  return mode == Mode::kFullShard || mode == Mode::kFullShardNoPrefetch ||
         mode == Mode::kFullShardPostAndForward;
}

const char* ModeName(Mode mode) {
  switch (mode) {
    case Mode::kFullShard:
      return "FULL_SHARD";
    case Mode::kFullShardNoPrefetch:
      return "FULL_SHARD_no_prefetch";
    case Mode::kFullShardPostAndForward:
      return "FULL_SHARD_backward_post_forward_prefetch";
    case Mode::kShardGradOp:
      return "SHARD_GRAD_OP";
    case Mode::kNoShard:
      return "NO_SHARD";
    case Mode::kUnwrapped:
      return "unwrapped";
    case Mode::kQuit:
      break;
  }
  return "quit";
}

struct Command {
  Mode mode = Mode::kQuit;
  int64_t iterations = 0;

  CommandWords Words() const { return {static_cast<int64_t>(mode), iterations}; }
  static Command From(const CommandWords& w) { return {static_cast<Mode>(w[0]), w[1]}; }
};

// A model in one mode with its optimizer and this rank's batch.
struct Trainer {
  BenchTransformer model{nullptr};
  std::unique_ptr<FullyShardedDataParallel> fsdp;  // null when unwrapped
  std::unique_ptr<torch::optim::Adam> adam;
  at::Tensor src, tgt;
  int64_t param_bytes = 0;
  int64_t largest_unit_bytes = 0;

  absl::Status Step() {
    try {
      torch::Tensor tgt_in = tgt.slice(0, 0, -1);
      torch::Tensor logits = fsdp ? fsdp->forward(src, tgt_in) : model->forward(src, tgt_in);
      torch::Tensor loss = model->Loss(logits, tgt);
      adam->zero_grad();
      loss.backward();
      adam->step();
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat("training step: ", e.what()));
    }
    return absl::OkStatus();
  }

  // Parameters, gradients and Adam state this rank's optimizer holds.
  int64_t LocalStateBytes() const {
    int64_t bytes = 0;
    for (const auto& group : adam->param_groups()) {
      for (const at::Tensor& p : group.params()) {
        bytes += p.numel() * static_cast<int64_t>(p.element_size());
        if (p.grad().defined()) bytes += p.grad().numel() * p.grad().element_size();
      }
    }
    for (const auto& item : adam->state()) {
      const auto& s = static_cast<const torch::optim::AdamParamState&>(*item.second);
      bytes += s.exp_avg().numel() * s.exp_avg().element_size();
      bytes += s.exp_avg_sq().numel() * s.exp_avg_sq().element_size();
    }
    return bytes;
  }
};

absl::StatusOr<std::unique_ptr<Trainer>> BuildTrainer(Mode mode,
                                                      std::shared_ptr<ProcessGroup> group) {
  auto trainer = std::make_unique<Trainer>();
  trainer->model = BenchTransformer(BenchTransformerConfig{}, /*seed=*/0);
  for (const at::Tensor& p : trainer->model->parameters()) {
    trainer->param_bytes += p.numel() * static_cast<int64_t>(p.element_size());
  }
  std::vector<at::Tensor> params;
  if (mode == Mode::kUnwrapped) {
    params = trainer->model->parameters();
  } else {
    FsdpOptions options;
    options.sharding_strategy = IsFullShard(mode)            ? ShardingStrategy::kFullShard
                                : mode == Mode::kShardGradOp ? ShardingStrategy::kShardGradOp
                                                             : ShardingStrategy::kNoShard;
    if (mode == Mode::kFullShardNoPrefetch) options.backward_prefetch = BackwardPrefetch::kNone;
    if (mode == Mode::kFullShardPostAndForward) {
      options.backward_prefetch = BackwardPrefetch::kBackwardPost;
      options.forward_prefetch = true;
    }
    options.nested = trainer->model->layer_slots();
    absl::StatusOr<std::unique_ptr<FullyShardedDataParallel>> fsdp =
        FullyShardedDataParallel::Wrap(trainer->model, group, options);
    if (!fsdp.ok()) return fsdp.status();
    trainer->fsdp = *std::move(fsdp);
    params = trainer->fsdp->parameters();
    for (const auto& unit : trainer->fsdp->units()) {
      if (unit.handle == nullptr) continue;
      trainer->largest_unit_bytes =
          std::max<int64_t>(trainer->largest_unit_bytes,
                            unit.handle->padded_numel() *
                                static_cast<int64_t>(unit.handle->flat_param().element_size()));
    }
  }
  trainer->adam =
      std::make_unique<torch::optim::Adam>(std::move(params), torch::optim::AdamOptions(1e-4));
  auto [src, tgt] = trainer->model->MakeBatch(kSeq, kBatch, /*seed=*/1 + group->rank());
  trainer->src = src;
  trainer->tgt = tgt;
  return trainer;
}

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

struct Measured {
  double seconds = 0;      // per step, this rank
  double cpu_seconds = 0;  // per step, this rank's CPU time (all threads)
  double faults = 0;       // per step, this rank's minor page faults
  int64_t peak = 0;
  int64_t step_mem = 0;
  int64_t resident = 0;  // VmRSS right before the timed steps, minus `before`
  int64_t local_state_bytes = 0;
  int64_t param_bytes = 0;
  int64_t largest_unit_bytes = 0;
};

// Builds, warms up, times `iterations` steps (through Google Benchmark's loop when `state` is
// given) and frees one trainer.
absl::StatusOr<Measured> Measure(Mode mode, int64_t iterations, std::shared_ptr<ProcessGroup> group,
                                 benchmark::State* state) {
  Measured m;
  ResetPeakRss();  // trims the heap, so `before` is what this process really holds
  const int64_t before = CurrentRssBytes();
  {
    absl::StatusOr<std::unique_ptr<Trainer>> trainer = BuildTrainer(mode, group);
    if (!trainer.ok()) return trainer.status();
    Trainer& t = **trainer;
    if (absl::Status s = t.Step(); !s.ok()) return s;  // warm-up: creates the Adam state
    if (absl::Status s = group->Barrier(); !s.ok()) return s;
    ResetPeakRss();
    m.resident = CurrentRssBytes() - before;
    const auto start = std::chrono::steady_clock::now();
    const double cpu_start = ProcessCpuSeconds();
    const int64_t faults_start = MinorPageFaults();
    if (state != nullptr) {
      for (auto _ : *state) {
        if (absl::Status s = t.Step(); !s.ok()) return s;
      }
    } else {
      for (int64_t i = 0; i < iterations; ++i) {
        if (absl::Status s = t.Step(); !s.ok()) return s;
      }
    }
    m.seconds = SecondsSince(start) / static_cast<double>(iterations);
    m.cpu_seconds = (ProcessCpuSeconds() - cpu_start) / static_cast<double>(iterations);
    m.faults =
        static_cast<double>(MinorPageFaults() - faults_start) / static_cast<double>(iterations);
    m.peak = PeakRssBytes();
    m.step_mem = m.peak - before;
    m.local_state_bytes = t.LocalStateBytes();
    m.param_bytes = t.param_bytes;
    m.largest_unit_bytes = t.largest_unit_bytes;
  }
  if (absl::Status s = group->Barrier(); !s.ok()) return s;
  return m;
}

struct CaseResult {
  Measured mine;
  double no_shard_seconds = 0;
  std::vector<int64_t> peaks;     // per rank
  std::vector<int64_t> step_mem;  // per rank
};

absl::StatusOr<CaseResult> RunCase(std::shared_ptr<ProcessGroup> world, const Command& command,
                                   benchmark::State* state) {
  CaseResult result;
  absl::StatusOr<Measured> mine = Measure(command.mode, command.iterations, world, state);
  if (!mine.ok()) return mine.status();
  result.mine = *mine;
  absl::StatusOr<std::vector<std::string>> gathered =
      world->AllGatherObject(absl::StrCat(mine->peak, " ", mine->step_mem));
  if (!gathered.ok()) return gathered.status();
  for (const std::string& item : *gathered) {
    const size_t space = item.find(' ');
    result.peaks.push_back(std::stoll(item.substr(0, space)));
    result.step_mem.push_back(std::stoll(item.substr(space + 1)));
  }
  absl::StatusOr<Measured> reference = Measure(Mode::kNoShard, command.iterations, world, nullptr);
  if (!reference.ok()) return reference.status();
  result.no_shard_seconds = reference->seconds;
  return result;
}

// Ranks other than 0: the case rank 0 runs.
absl::Status FollowCommand(const RankGroups& groups, const CommandWords& words) {
  return RunCase(groups.world, Command::From(words), nullptr).status();
}

const RankGroups* g_groups = nullptr;  // rank 0's groups while the benchmarks run

// PyTorch's FULL_SHARD steps (FSDP1, FSDP2): wall and rank 0's CPU ms, rank 0's minor page
// faults, per step.
struct PyTorchStep {
  double fsdp1_ms = 0, fsdp1_cpu_ms = 0, fsdp1_faults = 0;
  double fsdp2_ms = 0, fsdp2_cpu_ms = 0, fsdp2_faults = 0;
};

// Runs bench/pytorch_fsdp_step.py under torchrun (rank 0 only; the other ranks wait idle for
// the next command meanwhile).
absl::StatusOr<PyTorchStep> MeasurePyTorch() {
  FSDP_ASSIGN_OR_RETURN(
      auto lines,
      RunPyTorchReference("bench/pytorch_fsdp_step.py", kLaunchedRanks,
                          {absl::StrCat("--steps=", kIterations), absl::StrCat("--seq=", kSeq),
                           absl::StrCat("--batch=", kBatch)},
                          "PYTORCH_STEP"));
  PyTorchStep step;
  const auto& fields = lines.back();
  FSDP_ASSIGN_OR_RETURN(step.fsdp1_ms, NumberField(fields, "fsdp1_ms"));
  FSDP_ASSIGN_OR_RETURN(step.fsdp1_cpu_ms, NumberField(fields, "fsdp1_cpu_ms"));
  FSDP_ASSIGN_OR_RETURN(step.fsdp1_faults, NumberField(fields, "fsdp1_faults"));
  FSDP_ASSIGN_OR_RETURN(step.fsdp2_ms, NumberField(fields, "fsdp2_ms"));
  FSDP_ASSIGN_OR_RETURN(step.fsdp2_cpu_ms, NumberField(fields, "fsdp2_cpu_ms"));
  FSDP_ASSIGN_OR_RETURN(step.fsdp2_faults, NumberField(fields, "fsdp2_faults"));
  return step;
}

benchmark::Counter Bytes(double value) {
  return benchmark::Counter(value, benchmark::Counter::kDefaults, benchmark::Counter::kIs1024);
}

void BM_Step(benchmark::State& state, Mode mode) {
  if (SkipAfterFailure(state)) return;
  std::shared_ptr<ProcessGroup> world = g_groups->world;
  const Command command{mode, static_cast<int64_t>(state.max_iterations)};
  // Measured again right before every FULL_SHARD case (and repetition), so that each ratio
  // pairs runs close in time on a busy machine.
  std::optional<absl::StatusOr<PyTorchStep>> pytorch;
  if (IsFullShard(mode)) pytorch = MeasurePyTorch();
  if (IsFullShard(mode) && !pytorch->ok()) return FailBenchmark(state, pytorch->status());
  absl::Status status = SendCommand(command.Words());
  absl::StatusOr<CaseResult> result =
      status.ok() ? RunCase(world, command, &state) : absl::StatusOr<CaseResult>(status);
  if (!result.ok()) return FailBenchmark(state, result.status());
  const Measured& m = result->mine;
  const int64_t optim_bytes = 2 * m.param_bytes;  // Adam's exp_avg and exp_avg_sq
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * m.param_bytes);
  state.counters["vs_no_shard"] = m.seconds / result->no_shard_seconds;
  state.counters["no_shard_ms"] = result->no_shard_seconds * 1e3;
  if (IsFullShard(mode)) {
    const PyTorchStep& py = **pytorch;
    state.counters["pytorch_fsdp1_ms"] = py.fsdp1_ms;
    state.counters["pytorch_fsdp2_ms"] = py.fsdp2_ms;
    state.counters["vs_pytorch"] = m.seconds * 1e3 / std::min(py.fsdp1_ms, py.fsdp2_ms);
    state.counters["pytorch_fsdp1_cpu_ms"] = py.fsdp1_cpu_ms;
    state.counters["pytorch_fsdp2_cpu_ms"] = py.fsdp2_cpu_ms;
    state.counters["pytorch_fsdp1_faults"] = py.fsdp1_faults;
    state.counters["pytorch_fsdp2_faults"] = py.fsdp2_faults;
    state.counters["cpu_vs_pytorch"] =
        m.cpu_seconds * 1e3 / std::min(py.fsdp1_cpu_ms, py.fsdp2_cpu_ms);
  }
  state.counters["cpu_ms"] = m.cpu_seconds * 1e3;
  state.counters["faults_per_step"] = m.faults;
  for (size_t r = 0; r < result->peaks.size(); ++r) {
    state.counters[absl::StrCat("peak_rss_rank", r)] = Bytes(static_cast<double>(result->peaks[r]));
    state.counters[absl::StrCat("step_mem_rank", r)] =
        Bytes(static_cast<double>(result->step_mem[r]));
  }
  state.counters["held_mem_rank0"] = Bytes(static_cast<double>(m.resident));
  state.counters["local_state_bytes"] = Bytes(static_cast<double>(m.local_state_bytes));
  state.counters["param_bytes"] = Bytes(static_cast<double>(m.param_bytes));
  state.counters["optim_bytes"] = Bytes(static_cast<double>(optim_bytes));
  state.counters["largest_unit_bytes"] = Bytes(static_cast<double>(m.largest_unit_bytes));
  state.counters["mmap_threshold"] =
      Bytes(g_default_malloc ? 0.0 : static_cast<double>(kMmapThresholdBytes));
  state.counters["shard_target"] =
      Bytes(static_cast<double>((2 * m.param_bytes + optim_bytes) / world->size()) +
            static_cast<double>(m.largest_unit_bytes));
}

void RegisterCases(const RankGroups& groups) {
  g_groups = &groups;
  for (Mode mode : {Mode::kNoShard, Mode::kFullShard, Mode::kFullShardNoPrefetch,
                    Mode::kFullShardPostAndForward, Mode::kShardGradOp, Mode::kUnwrapped}) {
    benchmark::RegisterBenchmark(absl::StrCat("BM_Step/", ModeName(mode), "/world:2").c_str(),
                                 [mode](benchmark::State& state) { BM_Step(state, mode); })
        ->Iterations(kIterations)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
}

int RunRank(int argc, char** argv) {
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (i > 0 && std::string(argv[i]) == "--glibc_default_malloc") {
      g_default_malloc = true;
    } else {
      args.push_back(argv[i]);
    }
  }
  if (!g_default_malloc) {
    if (!MmapAllocationsFrom(kMmapThresholdBytes)) {
      std::fprintf(stderr, "fsdp_step_benchmark: glibc refused M_MMAP_THRESHOLD=%lld\n",
                   static_cast<long long>(kMmapThresholdBytes));
      return 1;
    }
    // PyTorch's ranks (started by rank 0) get the same allocator: glibc reads this at start.
    setenv("MALLOC_MMAP_THRESHOLD_", std::to_string(kMmapThresholdBytes).c_str(), 1);
  }
  RankHarnessOptions options;
  options.name = "fsdp_step_benchmark";
  options.collective_timeout = kCollectiveTimeout;
  options.command_timeout = kJobTimeout;
  return RunRankHarness(static_cast<int>(args.size()), args.data(), options, RegisterCases,
                        FollowCommand);
}

}  // namespace
}  // namespace fsdp::bench

int main(int argc, char** argv) {
  if (!fsdp::comm::LaunchedByLauncher()) {
    return fsdp::bench::LaunchSelfAsRanks(argc, argv, fsdp::bench::kLaunchedRanks,
                                          "fsdp_step_benchmark");
  }
  return fsdp::bench::RunRank(argc, argv);
}
