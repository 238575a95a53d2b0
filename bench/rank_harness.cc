#include "bench/rank_harness.h"

#include <ATen/ATen.h>

#include <cstdio>
#include <cstring>
#include <utility>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "bench/rank_util.h"
#include "comm/rendezvous.h"

namespace fsdp::bench {
namespace {

// Rank 0's state while RunRankHarness runs (the benchmark cases reach it through the free
// functions below, since Google Benchmark calls them without context).
struct Leader {
  std::shared_ptr<comm::ProcessGroup> world;
  std::chrono::milliseconds command_timeout{0};
  std::string error;  // the first failure
};
Leader* g_leader = nullptr;

absl::Status ExchangeCommand(comm::ProcessGroup& world, CommandWords& command,
                             std::chrono::milliseconds timeout) {
  at::Tensor packed = at::empty({kCommandWords}, at::kLong);
  if (world.rank() == 0) {
    std::memcpy(packed.data_ptr<int64_t>(), command.data(), sizeof(command));
  }
  absl::Status status = world.Broadcast(packed, /*root=*/0, comm::CollectiveOptions{timeout});
  if (!status.ok()) return status;
  std::memcpy(command.data(), packed.data_ptr<int64_t>(), sizeof(command));
  return absl::OkStatus();
}

int Follow(const RankHarnessOptions& options, const RankGroups& groups,
           const FollowCommandFn& follow) {
  const int rank = groups.world->rank();
  while (true) {
    CommandWords command{};
    if (absl::Status s = ExchangeCommand(*groups.world, command, options.command_timeout);
        !s.ok()) {
      std::fprintf(stderr, "%s rank %d: waiting for a command: %s\n", options.name.c_str(), rank,
                   s.ToString().c_str());
      return 1;
    }
    if (command[0] == 0) return 0;
    if (absl::Status s = follow(groups, command); !s.ok()) {
      std::fprintf(stderr, "%s rank %d: %s\n", options.name.c_str(), rank, s.ToString().c_str());
      return 1;
    }
  }
}

int Lead(int argc, char** argv, const RankHarnessOptions& options, const RankGroups& groups,
         const RegisterCasesFn& register_cases) {
  Leader leader{groups.world, options.command_timeout, ""};
  g_leader = &leader;
  register_cases(groups);
  std::vector<std::string> defaults = options.default_benchmark_args;
  std::vector<char*> args = {argv[0]};
  for (std::string& arg : defaults) args.push_back(arg.data());
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
  g_leader = nullptr;
  if (!leader.error.empty()) {
    // Other ranks may be inside a collective; the launcher stops them.
    std::fprintf(stderr, "%s: failed: %s\n", options.name.c_str(), leader.error.c_str());
    return 1;
  }
  CommandWords quit{};
  if (absl::Status s = ExchangeCommand(*groups.world, quit, options.command_timeout); !s.ok()) {
    std::fprintf(stderr, "%s: sending quit: %s\n", options.name.c_str(), s.ToString().c_str());
    return 1;
  }
  return exit_code;
}

}  // namespace

std::shared_ptr<comm::ProcessGroup> RankGroups::ForSize(int64_t world_size) const {
  auto it = by_size.find(world_size);
  return it == by_size.end() ? nullptr : it->second;
}

int RunRankHarness(int argc, char** argv, const RankHarnessOptions& options,
                   const RegisterCasesFn& register_cases, const FollowCommandFn& follow) {
  if (options.mmap_threshold_bytes > 0 && !MmapAllocationsFrom(options.mmap_threshold_bytes)) {
    std::fprintf(stderr, "%s: glibc refused M_MMAP_THRESHOLD=%lld\n", options.name.c_str(),
                 static_cast<long long>(options.mmap_threshold_bytes));
    return 1;
  }
  comm::RendezvousOptions rendezvous;
  rendezvous.timeout = options.collective_timeout;
  absl::StatusOr<std::shared_ptr<comm::ProcessGroup>> world =
      comm::InitProcessGroupFromEnv(rendezvous);
  if (!world.ok()) {
    std::fprintf(stderr, "%s: rendezvous: %s\n", options.name.c_str(),
                 world.status().ToString().c_str());
    return 1;
  }
  RankGroups groups;
  groups.world = *std::move(world);
  const int size = groups.world->size();
  groups.by_size[size] = groups.world;
  // Every rank takes part in creating each sub-group, in the same order; non-members get null.
  for (int k : options.subgroup_sizes) {
    if (k <= 0 || k >= size || groups.by_size.count(k) != 0) continue;
    std::vector<int> ranks(static_cast<size_t>(k));
    for (int r = 0; r < k; ++r) ranks[static_cast<size_t>(r)] = r;
    absl::StatusOr<std::shared_ptr<comm::ProcessGroup>> group = groups.world->NewSubgroup(ranks);
    if (!group.ok()) {
      std::fprintf(stderr, "%s: sub-group of ranks 0..%d: %s\n", options.name.c_str(), k - 1,
                   group.status().ToString().c_str());
      return 1;
    }
    groups.by_size[k] = *std::move(group);
  }
  return groups.world->rank() == 0 ? Lead(argc, argv, options, groups, register_cases)
                                   : Follow(options, groups, follow);
}

int RankBenchmarkMain(int argc, char** argv, int world_size, const RankHarnessOptions& options,
                      const RegisterCasesFn& register_cases, const FollowCommandFn& follow) {
  if (!comm::LaunchedByLauncher()) return LaunchSelfAsRanks(argc, argv, world_size, options.name);
  return RunRankHarness(argc, argv, options, register_cases, follow);
}

absl::Status SendCommand(const CommandWords& command) {
  if (g_leader == nullptr || g_leader->world->rank() != 0) {
    return absl::FailedPreconditionError("SendCommand: only rank 0's cases send commands");
  }
  if (command[0] == 0) {
    return absl::InvalidArgumentError("SendCommand: word 0 == 0 is the harness's quit");
  }
  CommandWords copy = command;
  return ExchangeCommand(*g_leader->world, copy, g_leader->command_timeout);
}

bool SkipAfterFailure(benchmark::State& state) {
  if (g_leader == nullptr || g_leader->error.empty()) return false;
  state.SkipWithError(absl::StrCat("skipped after an earlier failure: ", g_leader->error).c_str());
  return true;
}

void FailBenchmark(benchmark::State& state, const absl::Status& status) {
  std::string message = status.ToString();
  if (g_leader != nullptr && g_leader->error.empty()) g_leader->error = message;
  state.SkipWithError(message.c_str());
}

}  // namespace fsdp::bench
