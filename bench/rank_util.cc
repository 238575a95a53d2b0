#include "bench/rank_util.h"

#include <malloc.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <vector>

#include "absl/status/status.h"
#include "comm/launcher.h"

namespace fsdp::bench {
namespace {

int64_t StatusFieldBytes(const std::string& field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  const std::string prefix = field + ":";
  while (std::getline(status, line)) {
    if (line.compare(0, prefix.size(), prefix) == 0) {
      return std::strtoll(line.c_str() + prefix.size(), nullptr, 10) * 1024;  // "<n> kB"
    }
  }
  return -1;
}

}  // namespace

int64_t CurrentRssBytes() { return StatusFieldBytes("VmRSS"); }
int64_t PeakRssBytes() { return StatusFieldBytes("VmHWM"); }

bool ResetPeakRss() {
  malloc_trim(0);
  std::ofstream clear_refs("/proc/self/clear_refs");
  if (!clear_refs) return false;
  clear_refs << "5";
  clear_refs.flush();
  return static_cast<bool>(clear_refs);
}

double ProcessCpuSeconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

int64_t MinorPageFaults() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_minflt;
}

bool MmapAllocationsFrom(int64_t bytes) {
  return mallopt(M_MMAP_THRESHOLD, static_cast<int>(bytes)) == 1;
}

int LaunchSelfAsRanks(int argc, char** argv, int world_size, const std::string& name) {
  std::string self(4096, '\0');
  const ssize_t n = readlink("/proc/self/exe", self.data(), self.size() - 1);
  self = n > 0 ? self.substr(0, static_cast<size_t>(n)) : std::string("/proc/self/exe");
  std::vector<std::string> command = {self};
  for (int i = 1; i < argc; ++i) command.push_back(argv[i]);
  comm::LaunchOptions options;
  options.world_size = world_size;
  options.timeout = std::chrono::minutes(60);
  options.output = comm::RankOutput::kRank0Raw;
  if (std::getenv("OMP_NUM_THREADS") == nullptr) {
    options.extra_env.emplace_back("OMP_NUM_THREADS", "1");
  }
  const absl::Status status = comm::Launch(command, options);
  if (!status.ok()) {
    std::fprintf(stderr, "%s: %s\n", name.c_str(), std::string(status.message()).c_str());
    return 1;
  }
  return 0;
}

}  // namespace fsdp::bench
