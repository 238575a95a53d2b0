// Timing for benchmarks whose ranks run one call together: each call timed between barriers of
// the group (so the slowest rank counts), with this process's CPU time beside it, and the sums
// over the group that turn each rank's figures into the case's.
// Preconditions: every rank of `group` calls each function at the same point (collectives).
// Errors: the body's or cleanup's own, and the group's collective errors
// (comm/process_group.h).
#ifndef FSDP_CPP_BENCH_TIMED_CALLS_H_
#define FSDP_CPP_BENCH_TIMED_CALLS_H_

#include <chrono>
#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "bench/rank_util.h"
#include "comm/process_group.h"
#include "comm/status_macros.h"

namespace fsdp::bench {

double SecondsSince(std::chrono::steady_clock::time_point start);

double Mean(const std::vector<double>& values);

// Sum over the group of each rank's `value`, and the sum over lower ranks (exclusive prefix).
[[nodiscard]] absl::StatusOr<std::pair<int64_t, int64_t>> SumAndPrefix(comm::ProcessGroup& group,
                                                                       int64_t value);

// Sum over the group of each rank's `value`.
[[nodiscard]] absl::StatusOr<double> SumOverGroup(comm::ProcessGroup& group, double value);

// Runs `body` `reps` times between barriers of `group`, with `cleanup` (untimed) before each;
// returns each call's seconds (barrier to barrier) and sets `*cpu_per_call` to this process's
// mean CPU seconds in `body`.
template <typename Body, typename Cleanup>
absl::StatusOr<std::vector<double>> TimeCalls(comm::ProcessGroup& group, int64_t reps, Body body,
                                              Cleanup cleanup, double* cpu_per_call) {
  std::vector<double> seconds;
  double cpu = 0;
  for (int64_t i = 0; i < reps; ++i) {
    FSDP_RETURN_IF_ERROR(cleanup());
    FSDP_RETURN_IF_ERROR(group.Barrier());
    const auto start = std::chrono::steady_clock::now();
    const double cpu_start = ProcessCpuSeconds();
    FSDP_RETURN_IF_ERROR(body());
    cpu += ProcessCpuSeconds() - cpu_start;
    FSDP_RETURN_IF_ERROR(group.Barrier());
    seconds.push_back(SecondsSince(start));
  }
  *cpu_per_call = reps > 0 ? cpu / static_cast<double>(reps) : 0;
  return seconds;
}

}  // namespace fsdp::bench

#endif  // FSDP_CPP_BENCH_TIMED_CALLS_H_
