// launch: runs a program as N local rank processes with the torchrun environment.
//
//   bazel run //comm:launch -- --nproc=4 -- /path/to/program --flag=value
//
// Exits 0 when every rank exits 0; otherwise prints which rank failed, how, and its last
// output, and exits 1 (2 for a bad command line, 3 on timeout).
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "comm/launcher.h"

ABSL_FLAG(int, nproc, 2, "Number of rank processes to start on this host.");
ABSL_FLAG(int, timeout_s, 3600, "Stop every rank and fail after this many seconds.");
ABSL_FLAG(bool, prefix, true, "Prefix each output line with its rank.");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("launch --nproc=N [--timeout_s=S] -- program [args...]");
  std::vector<char*> rest = absl::ParseCommandLine(argc, argv);
  std::vector<std::string> program(rest.begin() + 1, rest.end());
  if (program.empty()) {
    std::fprintf(stderr, "launch: no program given; usage: launch --nproc=N -- program [args]\n");
    return 2;
  }
  fsdp::comm::LaunchOptions options;
  options.world_size = absl::GetFlag(FLAGS_nproc);
  options.timeout = std::chrono::seconds(absl::GetFlag(FLAGS_timeout_s));
  options.output =
      absl::GetFlag(FLAGS_prefix) ? fsdp::comm::RankOutput::kPrefixed : fsdp::comm::RankOutput::kRaw;
  const absl::Status status = fsdp::comm::Launch(program, options);
  if (!status.ok()) {
    std::fprintf(stderr, "%s\n", std::string(status.message()).c_str());
    if (status.code() == absl::StatusCode::kInvalidArgument) return 2;
    if (status.code() == absl::StatusCode::kDeadlineExceeded) return 3;
    return 1;
  }
  return 0;
}
