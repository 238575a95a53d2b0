// comm_benchmark: throughput of ProcessGroup's collectives over real Gloo process groups.
//
// Measures ProcessGroup::AllGatherIntoTensor (BM_AllGather), ProcessGroup::ReduceScatterTensor
// (BM_ReduceScatter, kSum) and ProcessGroup::Broadcast (BM_Broadcast, root 0) on float32 buffers,
// each rank a separate OS process talking over loopback TCP. All-gather and reduce-scatter run
// under both implementations (comm::CollectiveImpl): our ring over send/recv and Gloo's own
// _allgather_base / _reduce_scatter_base, side by side in one run.
//
//   bazel run -c opt //bench:comm_benchmark [-- --benchmark_filter=ReduceScatter ...]
//   bazel run -c opt //bench:comm_benchmark -- --benchmark_filter='impl:2'   # Gloo's only
//
// Argument grid: BM_AllGather and BM_ReduceScatter Args({MiB, world, impl}), BM_Broadcast
// Args({MiB, world}):
//   MiB   = 1, 4, 16, 64, 256: the full (unsharded) buffer size. All-gather fills it from
//           shards of MiB / world; reduce-scatter reduces it into shards of MiB / world;
//           broadcast sends all of it.
//   world = 2 (sub-group of ranks {0, 1}) and 4 (all ranks).
//   impl  = 1 (CollectiveImpl::kRing, label "ring") and 2 (kGloo, label "gloo"); the rows of
//           one (MiB, world) follow each other: impl:1 then impl:2.
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
//                 all-gather time per iteration (CollectiveImpl::kDefault) of the same full
//                 size over the same group, measured right after the timed loop (a few
//                 repetitions). Both move the same bytes per rank, so a bandwidth-optimal
//                 reduce-scatter stays at or below ~1.25.
//   vs_ring       (impl:2 rows only) this time per iteration divided by the ring's, measured
//                 the same way right after: < 1 means Gloo's own collective is faster. Paired
//                 in time, it is steadier than comparing two rows on a busy machine.
//
// Each benchmark runs for --benchmark_min_time=0.2 s unless that flag is given. A failed
// collective skips the benchmark with the status message (as do all later ones, since the
// group is no longer usable), and the binary exits non-zero; a failed worker exits non-zero
// and the launcher stops the job. Every collective has the group's timeout.
#include <ATen/ATen.h>
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "bench/rank_harness.h"
#include "bench/rank_util.h"
#include "comm/launcher.h"
#include "comm/process_group.h"
#include "comm/rendezvous.h"

namespace fsdp::bench {
namespace {

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
  comm::CollectiveImpl impl = comm::CollectiveImpl::kDefault;

  CommandWords Words() const {
    return {static_cast<int64_t>(op), bytes, world_size, iterations, static_cast<int64_t>(impl)};
  }
  static Command From(const CommandWords& w) {
    return {static_cast<Op>(w[0]), w[1], w[2], w[3], static_cast<comm::CollectiveImpl>(w[4])};
  }
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

// This rank's buffers, kept between commands.
Buffers* g_buffers = nullptr;

absl::Status RunOp(ProcessGroup& group, Op op, comm::CollectiveImpl impl, Buffers& buffers) {
  const comm::CollectiveOptions options{.impl = impl};
  switch (op) {
    case Op::kAllGather:
      return group.AllGatherIntoTensor(buffers.full(), buffers.shard(), options);
    case Op::kReduceScatter:
      return group.ReduceScatterTensor(buffers.shard(), buffers.full(), comm::ReduceOp::kSum,
                                       options);
    case Op::kBroadcast:
      return group.Broadcast(buffers.full(), /*root=*/0);
    case Op::kQuit:
      break;
  }
  return absl::InvalidArgumentError("comm_benchmark: not a collective");
}

// Members of the command's group: buffers ready, then everyone starts together.
absl::Status PrepareCommand(ProcessGroup& group, const Command& command) {
  g_buffers->Prepare(command.bytes, command.world_size);
  return group.Barrier();
}

// Ranks 1..N-1: run the command's collective if this rank is in its group.
absl::Status FollowCommand(const RankGroups& groups, const CommandWords& words) {
  const Command command = Command::From(words);
  std::shared_ptr<ProcessGroup> group = groups.ForSize(command.world_size);
  if (group == nullptr) return absl::OkStatus();  // not in this benchmark's group
  absl::Status status = PrepareCommand(*group, command);
  for (int64_t i = 0; status.ok() && i < command.iterations; ++i) {
    status = RunOp(*group, command.op, command.impl, *g_buffers);
  }
  return status;
}

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Rank 0's side of one command outside any timed loop: send it, prepare, run, and return the
// mean seconds per iteration.
absl::StatusOr<double> TimeUntimedCommand(ProcessGroup& group, const Command& command) {
  if (absl::Status s = SendCommand(command.Words()); !s.ok()) return s;
  if (absl::Status s = PrepareCommand(group, command); !s.ok()) return s;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < command.iterations; ++i) {
    if (absl::Status s = RunOp(group, command.op, command.impl, *g_buffers); !s.ok()) return s;
  }
  return SecondsSince(start) / static_cast<double>(command.iterations);
}

const RankGroups* g_groups = nullptr;  // rank 0's groups while the benchmarks run

// Repetitions of an untimed comparison run that last about kCompareSeconds.
int64_t CompareReps(double seconds_per_iter) {
  return std::clamp<int64_t>(static_cast<int64_t>(std::ceil(kCompareSeconds / seconds_per_iter)),
                             kMinCompareReps, kMaxCompareReps);
}

void RunCollectiveBenchmark(benchmark::State& state, Op op) {
  const int64_t mib = state.range(0);
  const int64_t world_size = state.range(1);
  const auto impl = op == Op::kBroadcast ? comm::CollectiveImpl::kDefault
                                         : static_cast<comm::CollectiveImpl>(state.range(2));
  const int64_t bytes = mib << 20;
  if (op != Op::kBroadcast) state.SetLabel(std::string(comm::CollectiveImplName(impl)));
  if (SkipAfterFailure(state)) return;
  std::shared_ptr<ProcessGroup> group = g_groups->ForSize(world_size);
  if (group == nullptr) {
    state.SkipWithError(absl::StrCat("no group of ", world_size, " ranks in a job of ",
                                     g_groups->world->size())
                            .c_str());
    return;
  }
  auto fail = [&](const absl::Status& status) { FailBenchmark(state, status); };

  const Command command{op, bytes, world_size, static_cast<int64_t>(state.max_iterations), impl};
  if (absl::Status s = SendCommand(command.Words()); !s.ok()) return fail(s);
  if (absl::Status s = PrepareCommand(*group, command); !s.ok()) return fail(s);
  const auto start = std::chrono::steady_clock::now();
  absl::Status status;
  for (auto _ : state) {
    status = RunOp(*group, op, impl, *g_buffers);
    if (!status.ok()) break;
  }
  const double elapsed = SecondsSince(start);
  if (!status.ok()) return fail(status);

  const double seconds_per_iter = elapsed / static_cast<double>(state.iterations());
  state.SetBytesProcessed(state.iterations() * bytes);
  const double bus_factor =
      op == Op::kBroadcast ? 1.0 : static_cast<double>(world_size - 1) / world_size;
  state.counters["busbw_GBps"] = bytes * bus_factor / seconds_per_iter / 1e9;

  const int64_t reps = CompareReps(seconds_per_iter);
  if (op == Op::kReduceScatter) {
    absl::StatusOr<double> all_gather = TimeUntimedCommand(
        *group, Command{Op::kAllGather, bytes, world_size, reps, comm::CollectiveImpl::kDefault});
    if (!all_gather.ok()) return fail(all_gather.status());
    state.counters["vs_allgather"] = seconds_per_iter / *all_gather;
  }
  if (impl == comm::CollectiveImpl::kGloo) {
    absl::StatusOr<double> ring = TimeUntimedCommand(
        *group, Command{op, bytes, world_size, reps, comm::CollectiveImpl::kRing});
    if (!ring.ok()) return fail(ring.status());
    state.counters["vs_ring"] = seconds_per_iter / *ring;
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

// Args({MiB, world, impl}): as CommArgs, each size under impl 1 (kRing) then 2 (kGloo).
void CommImplArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"MiB", "world", "impl"});
  for (int64_t world_size : {2, 4}) {
    for (int64_t mib : {1, 4, 16, 64, 256}) {
      for (comm::CollectiveImpl impl : {comm::CollectiveImpl::kRing, comm::CollectiveImpl::kGloo}) {
        b->Args({mib, world_size, static_cast<int64_t>(impl)});
      }
    }
  }
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_AllGather)->Apply(CommImplArgs);
BENCHMARK(BM_ReduceScatter)->Apply(CommImplArgs);
BENCHMARK(BM_Broadcast)->Apply(CommArgs);

int RunRank(int argc, char** argv) {
  RankHarnessOptions options;
  options.name = "comm_benchmark";
  options.collective_timeout = kCollectiveTimeout;
  options.command_timeout = kJobTimeout;
  options.subgroup_sizes = {2};
  // A short default --benchmark_min_time; one given on the command line comes later and wins.
  options.default_benchmark_args = {"--benchmark_min_time=0.2"};
  Buffers buffers;
  g_buffers = &buffers;
  return RunRankHarness(
      argc, argv, options, [](const RankGroups& groups) { g_groups = &groups; }, FollowCommand);
}

}  // namespace
}  // namespace fsdp::bench

int main(int argc, char** argv) {
  if (!fsdp::comm::LaunchedByLauncher()) {
    return fsdp::bench::LaunchSelfAsRanks(argc, argv, fsdp::bench::kLaunchedRanks,
                                          "comm_benchmark");
  }
  return fsdp::bench::RunRank(argc, argv);
}
