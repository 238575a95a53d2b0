// The rank side of a benchmark binary that runs as N rank processes (see LaunchSelfAsRanks in
// rank_util.h): rank 0 runs Google Benchmark, and each benchmark case first sends a command to
// every rank; ranks 1..N-1 follow commands until rank 0 sends "quit" after the last case.
//
//   int main(int argc, char** argv) {
//     if (!comm::LaunchedByLauncher()) return LaunchSelfAsRanks(argc, argv, 4, "my_benchmark");
//     return RunRankHarness(argc, argv, options, RegisterCases, FollowCommand);
//   }
//
// A command is kCommandWords int64 words, which each benchmark packs as it likes, except that
// words[0] == 0 means "quit". Rank 0's cases call SendCommand (every rank takes part, so a case
// may run on a sub-group while the other ranks wait for the next command) and report failures
// with FailBenchmark: the first failure skips every later case (the group may be unusable) and
// makes the binary exit non-zero; a failed follower exits non-zero at once, and the launcher
// stops the job and names it.
#ifndef FSDP_CPP_BENCH_RANK_HARNESS_H_
#define FSDP_CPP_BENCH_RANK_HARNESS_H_

#include <benchmark/benchmark.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "comm/process_group.h"

namespace fsdp::bench {

inline constexpr int kCommandWords = 8;
using CommandWords = std::array<int64_t, kCommandWords>;  // words[0] == 0: quit

// The groups a rank works in: every launched rank, and the sub-groups of the first k ranks
// {0, ..., k - 1} asked for in RankHarnessOptions::subgroup_sizes.
struct RankGroups {
  std::shared_ptr<comm::ProcessGroup> world;
  std::map<int64_t, std::shared_ptr<comm::ProcessGroup>>
      by_size;  // world included; null: not in it
  // The group that runs cases of `world_size` ranks; null if this rank is not in it or there is
  // no such group.
  std::shared_ptr<comm::ProcessGroup> ForSize(int64_t world_size) const;
};

struct RankHarnessOptions {
  std::string name;  // the binary's name, prefixing every message
  // Timeout of the rendezvous and of every collective of the groups.
  std::chrono::milliseconds collective_timeout = std::chrono::minutes(5);
  // How long a follower waits for the next command (rank 0 may be busy with a group the
  // follower is not in).
  std::chrono::milliseconds command_timeout = std::chrono::minutes(60);
  // Sizes k of the sub-groups {0, ..., k - 1} to create (sizes >= the world's are left out).
  std::vector<int> subgroup_sizes;
  // Google Benchmark flags put before the command line's, so the command line wins
  // (e.g. "--benchmark_min_time=0.2").
  std::vector<std::string> default_benchmark_args;
  // If positive: MmapAllocationsFrom(this) (rank_util.h) before anything else; the harness
  // fails if glibc refuses.
  int64_t mmap_threshold_bytes = 0;
};

// Called on rank 0 before Google Benchmark starts: registers the cases (which may keep
// `groups`, valid until RunRankHarness returns).
using RegisterCasesFn = std::function<void(const RankGroups& groups)>;
// Called on ranks 1..N-1 for every command but quit.
using FollowCommandFn =
    std::function<absl::Status(const RankGroups& groups, const CommandWords& command)>;

// Rendezvous from the launcher's environment, the sub-group if asked, then rank 0 registers
// and runs the benchmarks and sends quit, while the other ranks follow. Returns the process
// exit code: 0, 1 after a failure (printed to stderr), 2 for unrecognised arguments.
int RunRankHarness(int argc, char** argv, const RankHarnessOptions& options,
                   const RegisterCasesFn& register_cases, const FollowCommandFn& follow);

// A whole benchmark binary's main: not launched yet, LaunchSelfAsRanks(world_size); in a rank,
// RunRankHarness.
int RankBenchmarkMain(int argc, char** argv, int world_size, const RankHarnessOptions& options,
                      const RegisterCasesFn& register_cases, const FollowCommandFn& follow);

// Rank 0 (inside a case): broadcasts `command` to every rank of the world group. Errors: the
// collective's (UNAVAILABLE, DEADLINE_EXCEEDED, ...).
[[nodiscard]] absl::Status SendCommand(const CommandWords& command);

// Rank 0: true (and skips the case, naming the earlier failure) once a case has failed.
bool SkipAfterFailure(benchmark::State& state);
// Rank 0: records the first failure and skips the case with it.
void FailBenchmark(benchmark::State& state, const absl::Status& status);

}  // namespace fsdp::bench

#endif  // FSDP_CPP_BENCH_RANK_HARNESS_H_
