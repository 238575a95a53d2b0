// deferred_init_benchmark: each rank's peak memory while wrapping a model whose float32
// parameters take 2 GiB, at world size 2, built eagerly (every rank holds the whole model before
// FSDP shards it) and on the meta device (FSDP materialises and shards it one unit at a time,
// fsdp/deferred_init.h).
//
//   bazel run -c opt //bench:deferred_init_benchmark
//
// The model: kLayers Linear(kWidth, kWidth) layers in slots, one FSDP unit each, plus the (empty)
// root: 128 MiB a unit. "eager" builds it with LibTorch's constructors and wraps it; "deferred"
// builds each layer with fsdp::MakeMeta (a layer is allocated by its constructor and freed at
// once) and wraps it without a param_init_fn (each unit is reset_parameters()'d, as FSDP1).
//
// Per case, on both ranks in step: trim the heap and reset VmHWM (/proc/self/clear_refs), build
// and wrap, read VmHWM, free everything. Counters:
//   peak_rss_rank0/1  each rank's VmHWM over the case (bytes, the process's whole RSS).
//   wrap_mem_rank0/1  that peak minus the rank's VmRSS before the case.
//   param_bytes       the whole model's parameters; shard_bytes, a rank's share of them.
//   unit_bytes        one unit's parameters.
//   bound             shard_bytes + 2 x unit_bytes: what deferred init should stay near (the
//                     shards, plus the unit being sharded and its flattened copy).
//   limit             kRankLimitBytes: the memory a rank is held to. The deferred case fails
//                     if a rank's VmHWM exceeds it (checked here from /proc, not by setrlimit:
//                     RLIMIT_AS counts glibc's per-thread arenas and LibTorch's reserved address
//                     space, far above what is resident). The eager case only reports.
#include <benchmark/benchmark.h>
#include <torch/nn/modules/linear.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "bench/rank_harness.h"
#include "bench/rank_util.h"
#include "comm/process_group.h"
#include "fsdp/deferred_init.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "fsdp/module_slot.h"

namespace fsdp::bench {
namespace {

using comm::ProcessGroup;

constexpr int kLaunchedRanks = 2;
constexpr int kLayers = 16;
constexpr int64_t kWidth = 5792;  // 5792^2 + 5792 floats: 128.0 MiB a layer, 2.0 GiB in all
constexpr int64_t kRankLimitBytes = int64_t{3} << 29;  // 1.5 GiB
constexpr int64_t kMmapThresholdBytes = 256 << 10;     // freed layers leave the RSS at once

enum class Mode : int64_t { kQuit = 0, kEager = 1, kDeferred = 2 };

struct StackImpl : torch::nn::Module {
  explicit StackImpl(bool meta) {
    for (int i = 0; i < kLayers; ++i) {
      torch::nn::Linear layer(kWidth, kWidth);
      if (meta) ToMeta(*layer);
      layers.push_back(std::make_unique<ModuleSlot>(register_module(absl::StrCat(i), layer)));
    }
  }
  torch::Tensor forward(torch::Tensor x) {
    for (auto& layer : layers) x = layer->forward(x);
    return x;
  }
  std::vector<std::unique_ptr<ModuleSlot>> layers;
};
TORCH_MODULE(Stack);

struct Measured {
  int64_t peak = 0;
  int64_t wrap_mem = 0;
};

absl::StatusOr<Measured> Measure(Mode mode, const std::shared_ptr<ProcessGroup>& group) {
  if (absl::Status s = group->Barrier(); !s.ok()) return s;
  ResetPeakRss();
  const int64_t before = CurrentRssBytes();
  {
    Stack stack(mode == Mode::kDeferred);
    FsdpOptions options;
    for (auto& slot : stack->layers) options.nested.push_back(slot.get());
    auto fsdp = FullyShardedDataParallel::Wrap(stack, group, options);
    if (!fsdp.ok()) return fsdp.status();
  }
  Measured m;
  m.peak = PeakRssBytes();
  m.wrap_mem = m.peak - before;
  if (absl::Status s = group->Barrier(); !s.ok()) return s;
  return m;
}

absl::StatusOr<std::vector<Measured>> RunCase(const std::shared_ptr<ProcessGroup>& world,
                                              Mode mode) {
  absl::StatusOr<Measured> mine = Measure(mode, world);
  if (!mine.ok()) return mine.status();
  absl::StatusOr<std::vector<std::string>> gathered =
      world->AllGatherObject(absl::StrCat(mine->peak, " ", mine->wrap_mem));
  if (!gathered.ok()) return gathered.status();
  std::vector<Measured> out;
  for (const std::string& item : *gathered) {
    const size_t space = item.find(' ');
    out.push_back({std::stoll(item.substr(0, space)), std::stoll(item.substr(space + 1))});
  }
  return out;
}

absl::Status FollowCommand(const RankGroups& groups, const CommandWords& words) {
  return RunCase(groups.world, static_cast<Mode>(words[0])).status();
}

const RankGroups* g_groups = nullptr;  // rank 0's groups while the benchmarks run

benchmark::Counter Bytes(double value) {
  return benchmark::Counter(value, benchmark::Counter::kDefaults, benchmark::Counter::kIs1024);
}

void BM_WrapPeakMemory(benchmark::State& state, Mode mode) {
  if (SkipAfterFailure(state)) return;
  absl::StatusOr<std::vector<Measured>> result;
  for (auto _ : state) {
    absl::Status status = SendCommand({static_cast<int64_t>(mode)});
    result = status.ok() ? RunCase(g_groups->world, mode)
                         : absl::StatusOr<std::vector<Measured>>(status);
    if (!result.ok()) return FailBenchmark(state, result.status());
  }
  const int64_t unit_bytes = (kWidth * kWidth + kWidth) * 4;
  const int64_t param_bytes = kLayers * unit_bytes;
  const int64_t shard_bytes = param_bytes / kLaunchedRanks;
  for (size_t r = 0; r < result->size(); ++r) {
    state.counters[absl::StrCat("peak_rss_rank", r)] = Bytes((*result)[r].peak);
    state.counters[absl::StrCat("wrap_mem_rank", r)] = Bytes((*result)[r].wrap_mem);
  }
  state.counters["param_bytes"] = Bytes(param_bytes);
  state.counters["shard_bytes"] = Bytes(shard_bytes);
  state.counters["unit_bytes"] = Bytes(unit_bytes);
  state.counters["bound"] = Bytes(shard_bytes + 2 * unit_bytes);
  state.counters["limit"] = Bytes(kRankLimitBytes);
  if (mode != Mode::kDeferred) return;
  for (size_t r = 0; r < result->size(); ++r) {
    if ((*result)[r].peak > kRankLimitBytes) {
      return FailBenchmark(state, absl::ResourceExhaustedError(absl::StrCat(
                                      "deferred init: rank ", r, " peaked at ", (*result)[r].peak,
                                      " bytes resident, over the limit of ", kRankLimitBytes)));
    }
  }
}

void RegisterCases(const RankGroups& groups) {
  g_groups = &groups;
  for (Mode mode : {Mode::kEager, Mode::kDeferred}) {
    benchmark::RegisterBenchmark(
        absl::StrCat("BM_WrapPeakMemory/", mode == Mode::kEager ? "eager" : "deferred", "/world:2")
            .c_str(),
        [mode](benchmark::State& state) { BM_WrapPeakMemory(state, mode); })
        ->Iterations(1)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
}

}  // namespace
}  // namespace fsdp::bench

int main(int argc, char** argv) {
  using fsdp::bench::RankHarnessOptions;
  const RankHarnessOptions options{.name = "deferred_init_benchmark",
                                   .mmap_threshold_bytes = fsdp::bench::kMmapThresholdBytes};
  return fsdp::bench::RankBenchmarkMain(argc, argv, fsdp::bench::kLaunchedRanks, options,
                                        fsdp::bench::RegisterCases, fsdp::bench::FollowCommand);
}
