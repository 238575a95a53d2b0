// comm_benchmark: throughput of ProcessGroup's collectives over real Gloo process groups.
//
// Measures ProcessGroup::AllGatherIntoTensor (BM_AllGather), ProcessGroup::ReduceScatterTensor
// (BM_ReduceScatter, kSum) and ProcessGroup::Broadcast (BM_Broadcast, root 0) on float32 buffers,
// each rank a separate OS process talking over loopback TCP.
//
//   bazel run -c opt //bench:comm_benchmark [-- --benchmark_filter=ReduceScatter ...]
//
// Argument grid, Args({MiB, world}):
//   MiB   = 1, 4, 16, 64, 256: the full (unsharded) buffer size. All-gather fills it from
//           shards of MiB / world; reduce-scatter reduces it into shards of MiB / world;
//           broadcast sends all of it.
//   world = 2 (sub-group of ranks {0, 1}) and 4 (all ranks).
//
// How it runs: started without RANK in the environment, the binary re-executes itself as 4
// rank processes (comm::Launch; OMP_NUM_THREADS=1 unless set, as torchrun does) and prints rank
// 0's output. Rank 0 runs Google Benchmark; ranks 1..3 run a worker loop. Before each
// benchmark's timed loop rank 0 broadcasts a command (op, bytes, world size, iterations =
// state.max_iterations) on the full group, so nothing but the collective itself is inside the
// timed loop; the ranks of the benchmarked group then prepare their buffers and meet at a
// barrier. Ranks outside that group (2 and 3 at world 2) wait for the next command.
//
// Reported per benchmark: time per iteration (real time, at rank 0), bytes_per_second (full
// buffer bytes per second) and counters
//   busbw_GBps    bus bandwidth, nccl-tests style: bytes * (world - 1) / world / time for
//                 all-gather and reduce-scatter, bytes / time for broadcast (GB = 1e9 bytes).
//   vs_allgather  (BM_ReduceScatter only) reduce-scatter time per iteration divided by the
//                 all-gather time per iteration of the same full size over the same group,
//                 measured right after the timed loop (a few repetitions). Both move the same
//                 bytes per rank, so a bandwidth-optimal reduce-scatter stays at or below ~1.25.
//
// Each benchmark runs for --benchmark_min_time=0.2 s unless that flag is given. A failed
// collective skips the benchmark with the status message (as do all later ones, since the
// group is no longer usable), and the binary exits non-zero; a failed worker exits non-zero
// and the launcher stops the job. Every collective has the group's timeout.
#include <ATen/ATen.h>
#include <benchmark/benchmark.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "comm/launcher.h"
#include "comm/process_group.h"
#include "comm/rendezvous.h"

namespace fsdp::bench {
namespace {

using comm::CollectiveOptions;
using comm::ProcessGroup;

constexpr int kLaunchedRanks = 4;
// Bounds every collective of a benchmark.
constexpr std::chrono::milliseconds kCollectiveTimeout = std::chrono::minutes(2);
// Bounds the wait for the next command (rank 0 may be busy with a group the waiting rank is
// not in) and the whole job.
constexpr std::chrono::milliseconds kJobTimeout = std::chrono::minutes(60);
// Wall time the all-gather comparison of BM_ReduceScatter aims for (at least kMinCompareReps).
constexpr double kCompareSeconds = 0.1;
constexpr int64_t kMinCompareReps = 3;
constexpr int64_t kMaxCompareReps = 1000;

enum class Op : int64_t { kQuit = 0, kAllGather = 1, kReduceScatter = 2, kBroadcast = 3 };

struct Command {
  Op op = Op::kQuit;
  int64_t bytes = 0;       // full buffer size
  int64_t world_size = 0;  // size of the group that runs it
  int64_t iterations = 0;
};

// The float32 buffers of one (bytes, world size): `full` holds the whole buffer, `shard` one
// rank's 1 / world of it. Kept between commands, since Google Benchmark calls a benchmark
// several times with growing iteration counts; filled once so that no page fault of ours
// lands in a timed loop.
class Buffers {
 public:
  void Prepare(int64_t bytes, int64_t world_size) {
    if (bytes == bytes_ && world_size == world_size_) return;
    full_ = at::Tensor();
    shard_ = at::Tensor();
    const int64_t numel = bytes / static_cast<int64_t>(sizeof(float));
    full_ = at::ones({numel}, at::kFloat);
    shard_ = at::ones({numel / world_size}, at::kFloat);
    bytes_ = bytes;
    world_size_ = world_size;
  }
  at::Tensor& full() { return full_; }
  at::Tensor& shard() { return shard_; }

 private:
  int64_t bytes_ = -1;
  int64_t world_size_ = -1;
  at::Tensor full_;
  at::Tensor shard_;
};

struct RankContext {
  std::shared_ptr<ProcessGroup> world;  // every launched rank
  std::shared_ptr<ProcessGroup> pair;   // ranks {0, 1}; nullptr on the others
  Buffers buffers;
  // First communication error seen by rank 0; every later benchmark is skipped with it.
  std::string error;
};

RankContext* g_context = nullptr;

// The group that runs benchmarks of `world_size`, or nullptr when this rank is not in it (or no
// such group exists).
ProcessGroup* GroupFor(RankContext& context, int64_t world_size) {
  if (world_size == context.world->size()) return context.world.get();
  if (world_size == 2) return context.pair.get();
  return nullptr;
}

absl::Status RunOp(ProcessGroup& group, Op op, Buffers& buffers) {
  switch (op) {
    case Op::kAllGather:
      return group.AllGatherIntoTensor(buffers.full(), buffers.shard());
    case Op::kReduceScatter:
      return group.ReduceScatterTensor(buffers.shard(), buffers.full());
    case Op::kBroadcast:
      return group.Broadcast(buffers.full(), /*root=*/0);
    case Op::kQuit:
      break;
  }
  return absl::InvalidArgumentError("comm_benchmark: not a collective");
}

// Rank 0 sends `command` to every rank; the others receive it.
absl::Status ExchangeCommand(ProcessGroup& world, Command& command) {
  at::Tensor packed = at::empty({4}, at::kLong);
  if (world.rank() == 0) {
    packed[0] = static_cast<int64_t>(command.op);
    packed[1] = command.bytes;
    packed[2] = command.world_size;
    packed[3] = command.iterations;
  }
  absl::Status status = world.Broadcast(packed, /*root=*/0, CollectiveOptions{kJobTimeout});
  if (!status.ok()) return status;
  const int64_t* values = packed.data_ptr<int64_t>();
  command.op = static_cast<Op>(values[0]);
  command.bytes = values[1];
  command.world_size = values[2];
  command.iterations = values[3];
  return absl::OkStatus();
}

// Members of the command's group: buffers ready, then everyone starts together.
absl::Status PrepareCommand(RankContext& context, ProcessGroup& group, const Command& command) {
  context.buffers.Prepare(command.bytes, command.world_size);
  return group.Barrier();
}

// Ranks 1..N-1: execute rank 0's commands until "quit". Returns the process exit code.
int WorkerLoop(RankContext& context) {
  const int rank = context.world->rank();
  while (true) {
    Command command;
    if (absl::Status s = ExchangeCommand(*context.world, command); !s.ok()) {
      std::fprintf(stderr, "comm_benchmark rank %d: waiting for a command: %s\n", rank,
                   s.ToString().c_str());
      return 1;
    }
    if (command.op == Op::kQuit) return 0;
    ProcessGroup* group = GroupFor(context, command.world_size);
    if (group == nullptr) continue;  // not in this benchmark's group
    absl::Status status = PrepareCommand(context, *group, command);
    for (int64_t i = 0; status.ok() && i < command.iterations; ++i) {
      status = RunOp(*group, command.op, context.buffers);
    }
    if (!status.ok()) {
      std::fprintf(stderr, "comm_benchmark rank %d: %s\n", rank, status.ToString().c_str());
      return 1;
    }
  }
}

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Rank 0's side of one command outside any timed loop: send it, prepare, run, and return the
// mean seconds per iteration.
absl::StatusOr<double> TimeUntimedCommand(RankContext& context, ProcessGroup& group,
                                          Command command) {
  if (absl::Status s = ExchangeCommand(*context.world, command); !s.ok()) return s;
  if (absl::Status s = PrepareCommand(context, group, command); !s.ok()) return s;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < command.iterations; ++i) {
    if (absl::Status s = RunOp(group, command.op, context.buffers); !s.ok()) return s;
  }
  return SecondsSince(start) / static_cast<double>(command.iterations);
}

void RunCollectiveBenchmark(benchmark::State& state, Op op) {
  RankContext& context = *g_context;
  const int64_t mib = state.range(0);
  const int64_t world_size = state.range(1);
  const int64_t bytes = mib << 20;
  if (!context.error.empty()) {
    state.SkipWithError(
        absl::StrCat("skipped after an earlier failure: ", context.error).c_str());
    return;
  }
  ProcessGroup* group = GroupFor(context, world_size);
  if (group == nullptr) {
    state.SkipWithError(absl::StrCat("no group of ", world_size, " ranks in a job of ",
                                     context.world->size())
                            .c_str());
    return;
  }
  auto fail = [&](const absl::Status& status) {
    context.error = status.ToString();
    state.SkipWithError(context.error.c_str());
  };

  Command command{op, bytes, world_size, static_cast<int64_t>(state.max_iterations)};
  if (absl::Status s = ExchangeCommand(*context.world, command); !s.ok()) return fail(s);
  if (absl::Status s = PrepareCommand(context, *group, command); !s.ok()) return fail(s);
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    if (absl::Status s = RunOp(*group, op, context.buffers); !s.ok()) {
      fail(s);
      break;
    }
  }
  const double elapsed = SecondsSince(start);
  if (!context.error.empty()) return;

  const double seconds_per_iter = elapsed / static_cast<double>(state.iterations());
  state.SetBytesProcessed(state.iterations() * bytes);
  const double bus_factor =
      op == Op::kBroadcast ? 1.0 : static_cast<double>(world_size - 1) / world_size;
  state.counters["busbw_GBps"] = bytes * bus_factor / seconds_per_iter / 1e9;

  if (op == Op::kReduceScatter) {
    const int64_t reps = std::clamp<int64_t>(
        static_cast<int64_t>(std::ceil(kCompareSeconds / seconds_per_iter)), kMinCompareReps,
        kMaxCompareReps);
    absl::StatusOr<double> all_gather =
        TimeUntimedCommand(context, *group, Command{Op::kAllGather, bytes, world_size, reps});
    if (!all_gather.ok()) return fail(all_gather.status());
    state.counters["vs_allgather"] = seconds_per_iter / *all_gather;
  }
}

void BM_AllGather(benchmark::State& state) { RunCollectiveBenchmark(state, Op::kAllGather); }
void BM_ReduceScatter(benchmark::State& state) {
  RunCollectiveBenchmark(state, Op::kReduceScatter);
}
void BM_Broadcast(benchmark::State& state) { RunCollectiveBenchmark(state, Op::kBroadcast); }

// Args({MiB, world}): MiB in {1, 4, 16, 64, 256} (full float32 buffer), world in {2, 4}.
void CommArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"MiB", "world"});
  for (int64_t world_size : {2, 4}) {
    for (int64_t mib : {1, 4, 16, 64, 256}) b->Args({mib, world_size});
  }
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_AllGather)->Apply(CommArgs);
BENCHMARK(BM_ReduceScatter)->Apply(CommArgs);
BENCHMARK(BM_Broadcast)->Apply(CommArgs);

// Rank 0: Google Benchmark, then "quit" for the workers.
int RunBenchmarks(RankContext& context, int argc, char** argv) {
  // A short default --benchmark_min_time; one given on the command line comes later and wins.
  std::string default_min_time = "--benchmark_min_time=0.2";
  std::vector<char*> args = {argv[0], default_min_time.data()};
  for (int i = 1; i < argc; ++i) args.push_back(argv[i]);
  int bench_argc = static_cast<int>(args.size());
  args.push_back(nullptr);
  benchmark::Initialize(&bench_argc, args.data());
  int exit_code = 0;
  if (benchmark::ReportUnrecognizedArguments(bench_argc, args.data())) {
    exit_code = 2;
  } else {
    benchmark::RunSpecifiedBenchmarks();
  }
  benchmark::Shutdown();
  if (!context.error.empty()) {
    // The group may be mid-collective on other ranks; the launcher stops them.
    std::fprintf(stderr, "comm_benchmark: failed: %s\n", context.error.c_str());
    return 1;
  }
  Command quit;
  if (absl::Status s = ExchangeCommand(*context.world, quit); !s.ok()) {
    std::fprintf(stderr, "comm_benchmark: sending quit: %s\n", s.ToString().c_str());
    return 1;
  }
  return exit_code;
}

int RunRank(int argc, char** argv) {
  comm::RendezvousOptions options;
  options.timeout = kCollectiveTimeout;
  absl::StatusOr<std::shared_ptr<ProcessGroup>> world = comm::InitProcessGroupFromEnv(options);
  if (!world.ok()) {
    std::fprintf(stderr, "comm_benchmark: rendezvous: %s\n", world.status().ToString().c_str());
    return 1;
  }
  RankContext context;
  context.world = *std::move(world);
  if (context.world->size() == 2) {
    context.pair = context.world;
  } else if (context.world->size() > 2) {
    // Every rank takes part in creating the sub-group; non-members get nullptr.
    absl::StatusOr<std::shared_ptr<ProcessGroup>> pair = context.world->NewSubgroup({0, 1});
    if (!pair.ok()) {
      std::fprintf(stderr, "comm_benchmark: sub-group {0, 1}: %s\n",
                   pair.status().ToString().c_str());
      return 1;
    }
    context.pair = *std::move(pair);
  }
  g_context = &context;
  const int exit_code =
      context.world->rank() == 0 ? RunBenchmarks(context, argc, argv) : WorkerLoop(context);
  g_context = nullptr;
  return exit_code;
}

// Not a rank: run this very binary, with the same arguments, as kLaunchedRanks ranks.
int LaunchRanks(int argc, char** argv) {
  std::string self(4096, '\0');
  const ssize_t n = readlink("/proc/self/exe", self.data(), self.size() - 1);
  self = n > 0 ? self.substr(0, static_cast<size_t>(n)) : std::string("/proc/self/exe");
  std::vector<std::string> command = {self};
  for (int i = 1; i < argc; ++i) command.push_back(argv[i]);
  comm::LaunchOptions options;
  options.world_size = kLaunchedRanks;
  options.timeout = kJobTimeout;
  options.output = comm::RankOutput::kRank0Raw;
  // One intra-op thread per rank unless told otherwise, as torchrun does for several ranks on
  // a host: otherwise every rank's OpenMP pool competes for the same cores.
  if (std::getenv("OMP_NUM_THREADS") == nullptr) {
    options.extra_env.emplace_back("OMP_NUM_THREADS", "1");
  }
  const absl::Status status = comm::Launch(command, options);
  if (!status.ok()) {
    std::fprintf(stderr, "comm_benchmark: %s\n", std::string(status.message()).c_str());
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace fsdp::bench

int main(int argc, char** argv) {
  if (!fsdp::comm::LaunchedByLauncher()) return fsdp::bench::LaunchRanks(argc, argv);
  return fsdp::bench::RunRank(argc, argv);
}
