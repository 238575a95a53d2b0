// shard_copy_benchmark: why ShardFullOptimStateDict misses its goal, and what a fix would
// reach. One process, no communication: rank 0's shard of BenchTransformer's full Adam state
// (exp_avg and exp_avg_sq of every parameter, as a full optimizer state dict holds them:
// one tensor per parameter, grouped by FSDP unit), built three ways:
//
//   BM_CatPadClone     as optim_state's ShardFullOptimStateDict does it today per unit and
//                      state: at::cat of every parameter's state, at::zeros of the padded
//                      size plus a copy into it, then .clone() of this rank's shard.
//   BM_OverlapCopy     the proposed fix: one at::empty shard per unit and state, into which
//                      only the part of each parameter's state that falls in this rank's
//                      range of the flat parameter is copied (padding zeroed).
//   BM_ShardCopy       the reference optim_state_benchmark uses for ShardFullOptimStateDict:
//                      one copy of this rank's share of the state bytes into a resident
//                      buffer.
//
//   bazel run -c opt //bench:shard_copy_benchmark
//
// Counter vs_copy: time / BM_ShardCopy's time at the same world size (measured in the same
// run, right before; run the three together). Args: world size 2 and 4 (rank 0's shard).
#include <ATen/ATen.h>
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <map>
#include <vector>

#include "bench/bench_transformer.h"

namespace fsdp::bench {
namespace {

constexpr int kStates = 2;  // exp_avg, exp_avg_sq
constexpr int kRank = 0;

// Per FSDP unit (one per transformer layer, then the root's remaining parameters), one tensor
// per parameter and state, shaped as the parameter.
struct FullState {
  std::vector<std::vector<at::Tensor>> units;  // [unit][param * kStates + state]
  int64_t numel = 0;                           // of one state over all units
};

const FullState& TheFullState() {
  static const FullState* state = [] {
    auto* s = new FullState;
    BenchTransformer model(BenchTransformerConfig{}, /*seed=*/0);
    std::vector<std::vector<at::Tensor>> unit_params;
    for (fsdp::ModuleSlot* slot : model->layer_slots()) {
      unit_params.emplace_back();
      for (const at::Tensor& p : slot->module()->parameters()) unit_params.back().push_back(p);
    }
    std::vector<at::Tensor> root;
    for (const at::Tensor& p : model->parameters()) {
      bool in_layer = false;
      for (const auto& u : unit_params) {
        for (const at::Tensor& q : u) in_layer = in_layer || q.is_same(p);
      }
      if (!in_layer) root.push_back(p);
    }
    unit_params.push_back(root);
    for (const auto& u : unit_params) {
      s->units.emplace_back();
      for (const at::Tensor& p : u) {
        for (int k = 0; k < kStates; ++k) s->units.back().push_back(at::rand(p.sizes()));
        s->numel += p.numel();
      }
    }
    return s;
  }();
  return *state;
}

std::map<int64_t, double> g_shard_copy_seconds;  // by world size

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double BM_ShardCopy(benchmark::State& state) {
  const int64_t world = state.range(0);
  const int64_t numel = kStates * TheFullState().numel / world;
  at::Tensor source = at::ones({numel});
  at::Tensor target = at::zeros({numel});
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) target.copy_(source);
  const double seconds = SecondsSince(start);
  state.SetBytesProcessed(state.iterations() * numel * static_cast<int64_t>(sizeof(float)));
  return seconds;
}

double BM_CatPadClone(benchmark::State& state) {
  const int64_t world = state.range(0);
  const FullState& full = TheFullState();
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    for (const auto& unit : full.units) {
      for (int k = 0; k < kStates; ++k) {
        std::vector<at::Tensor> parts;
        for (size_t i = k; i < unit.size(); i += kStates) parts.push_back(unit[i].reshape({-1}));
        at::Tensor flat = at::cat(parts);
        const int64_t shard = (flat.numel() + world - 1) / world;
        at::Tensor padded = at::zeros({shard * world});
        padded.narrow(0, 0, flat.numel()).copy_(flat);
        at::Tensor mine = padded.narrow(0, kRank * shard, shard).clone();
        benchmark::DoNotOptimize(mine.data_ptr());
      }
    }
  }
  const double seconds = SecondsSince(start);
  state.SetBytesProcessed(state.iterations() * kStates * full.numel / world *
                          static_cast<int64_t>(sizeof(float)));
  return seconds;
}

double BM_OverlapCopy(benchmark::State& state) {
  const int64_t world = state.range(0);
  const FullState& full = TheFullState();
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    for (const auto& unit : full.units) {
      for (int k = 0; k < kStates; ++k) {
        int64_t numel = 0;
        for (size_t i = k; i < unit.size(); i += kStates) numel += unit[i].numel();
        const int64_t shard = (numel + world - 1) / world;
        const int64_t lo = kRank * shard;
        const int64_t hi = lo + shard;
        at::Tensor mine = at::empty({shard});
        int64_t offset = 0;
        int64_t filled = 0;
        for (size_t i = k; i < unit.size(); i += kStates) {
          const int64_t begin = std::max(offset, lo);
          const int64_t end = std::min(offset + unit[i].numel(), hi);
          if (begin < end) {
            mine.narrow(0, begin - lo, end - begin)
                .copy_(unit[i].reshape({-1}).narrow(0, begin - offset, end - begin));
            filled = end - lo;
          }
          offset += unit[i].numel();
        }
        if (filled < shard) mine.narrow(0, filled, shard - filled).zero_();
        benchmark::DoNotOptimize(mine.data_ptr());
      }
    }
  }
  const double seconds = SecondsSince(start);
  state.SetBytesProcessed(state.iterations() * kStates * full.numel / world *
                          static_cast<int64_t>(sizeof(float)));
  return seconds;
}

// Runs `Bench` and reports its loop time per iteration against BM_ShardCopy's.
template <double (*Bench)(benchmark::State&)>
void WithVsCopy(benchmark::State& state) {
  TheFullState();  // built outside the timed loop
  const double seconds = Bench(state) / static_cast<double>(state.iterations());
  if (Bench == BM_ShardCopy) {
    g_shard_copy_seconds[state.range(0)] = seconds;
  } else if (auto it = g_shard_copy_seconds.find(state.range(0));
             it != g_shard_copy_seconds.end()) {
    state.counters["vs_copy"] = seconds / it->second;
  }
}

void Args(benchmark::internal::Benchmark* b) {
  b->ArgName("world")->Arg(2)->Arg(4)->Iterations(5)->UseRealTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK(WithVsCopy<BM_ShardCopy>)->Name("BM_ShardCopy")->Apply(Args);
BENCHMARK(WithVsCopy<BM_CatPadClone>)->Name("BM_CatPadClone")->Apply(Args);
BENCHMARK(WithVsCopy<BM_OverlapCopy>)->Name("BM_OverlapCopy")->Apply(Args);

}  // namespace
}  // namespace fsdp::bench

BENCHMARK_MAIN();
