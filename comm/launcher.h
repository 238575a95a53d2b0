// Launcher: runs a program as N real OS processes, one per rank, as torchrun does on one host.
//
// Each rank gets the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
// MASTER_ADDR, MASTER_PORT, TORCHELASTIC_USE_AGENT_STORE=True): the launcher itself hosts the
// TCPStore the ranks rendezvous on, on a free port, so concurrent jobs never collide. Ranks'
// stdout and stderr are read through pipes, optionally echoed with a "[rank r] " prefix, and
// kept for the report.
//
// When a rank exits non-zero or is killed, the launcher (by default) stops the others with
// SIGTERM, then SIGKILL after a grace period, and returns an error naming that rank, how it
// ended, and its last lines of output. Ranks die with the launcher (PR_SET_PDEATHSIG).
//
// Errors: INVALID_ARGUMENT (empty argv, world_size < 1); INTERNAL (fork/exec/pipe failed,
// rank failed); DEADLINE_EXCEEDED (ranks still running at the timeout; all are killed).
#ifndef FSDP_CPP_COMM_LAUNCHER_H_
#define FSDP_CPP_COMM_LAUNCHER_H_

#include <chrono>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"

namespace fsdp::comm {

enum class RankOutput {
  kPrefixed,  // echo each line as "[rank r] line"
  kRaw,       // echo as is
  kRank0Raw,  // echo rank 0's lines as is, others prefixed (for a job's progress lines)
  kCapture,   // keep for the report only
};

struct LaunchOptions {
  int world_size = 1;
  std::chrono::milliseconds timeout = std::chrono::minutes(10);
  // Between SIGTERM and SIGKILL when stopping ranks.
  std::chrono::milliseconds grace_period = std::chrono::seconds(3);
  // Stop the other ranks as soon as one fails.
  bool stop_all_on_failure = true;
  RankOutput output = RankOutput::kPrefixed;
  std::string master_addr = "127.0.0.1";
  // Added to (or replacing) each rank's inherited environment.
  std::vector<std::pair<std::string, std::string>> extra_env;
  // Removed from each rank's inherited environment.
  std::vector<std::string> unset_env;
};

// How one rank ended.
struct RankExit {
  int rank = 0;
  bool exited = false;     // exited normally, with `exit_code`
  int exit_code = -1;
  int signal = 0;          // killed by this signal
  bool stopped_by_launcher = false;
  std::string output;      // everything it printed (the last 4 MiB of it)

  bool ok() const { return exited && exit_code == 0; }
  std::string Describe() const;  // "exited with code 3", "killed by signal 9 (Killed)", ...
};

struct LaunchReport {
  std::vector<RankExit> ranks;
  int failed_rank = -1;  // the first rank that failed, -1 if none
  bool timed_out = false;
};

// Runs `argv` (argv[0] is looked up in PATH when it has no '/') as options.world_size
// processes and waits for all of them. OK only if every rank exited with code 0.
[[nodiscard]] absl::Status Launch(const std::vector<std::string>& argv,
                                  const LaunchOptions& options, LaunchReport* report = nullptr);

}  // namespace fsdp::comm

#endif  // FSDP_CPP_COMM_LAUNCHER_H_
