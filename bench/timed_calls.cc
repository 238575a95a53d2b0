// Timing helpers (timed_calls.h).
#include "bench/timed_calls.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace fsdp::bench {

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double Mean(const std::vector<double>& values) {
  double sum = 0;
  for (double v : values) sum += v;
  return values.empty() ? 0 : sum / static_cast<double>(values.size());
}

absl::StatusOr<std::pair<int64_t, int64_t>> SumAndPrefix(comm::ProcessGroup& group, int64_t value) {
  FSDP_ASSIGN_OR_RETURN(std::vector<std::string> all, group.AllGatherObject(std::to_string(value)));
  int64_t sum = 0, prefix = 0;
  for (size_t r = 0; r < all.size(); ++r) {
    const int64_t v = std::stoll(all[r]);
    if (static_cast<int>(r) < group.rank()) prefix += v;
    sum += v;
  }
  return std::make_pair(sum, prefix);
}

absl::StatusOr<double> SumOverGroup(comm::ProcessGroup& group, double value) {
  FSDP_ASSIGN_OR_RETURN(std::vector<std::string> all, group.AllGatherObject(absl::StrCat(value)));
  double sum = 0;
  for (const std::string& v : all) sum += std::stod(v);
  return sum;
}

}  // namespace fsdp::bench
