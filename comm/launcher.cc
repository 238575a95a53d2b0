#include "comm/launcher.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <set>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "comm/status_macros.h"

extern char** environ;

namespace fsdp::comm {
namespace {

using Clock = std::chrono::steady_clock;
constexpr size_t kMaxKeptOutput = 4 << 20;

struct Child {
  pid_t pid = -1;
  int out_fd = -1;
  bool running = false;
  std::string partial_line;
};

std::vector<std::string> BuildEnv(const LaunchOptions& options, int rank, int port) {
  std::set<std::string> replaced = {
      "RANK",       "WORLD_SIZE",  "LOCAL_RANK",  "LOCAL_WORLD_SIZE",
      "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"};
  for (const auto& name : options.unset_env) replaced.insert(name);
  for (const auto& [name, value] : options.extra_env) replaced.insert(name);
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    absl::string_view entry(*e);
    const std::string name(entry.substr(0, entry.find('=')));
    if (!replaced.count(name)) env.emplace_back(entry);
  }
  // The launcher's own variables, unless extra_env sets them: with two entries for one name,
  // getenv would return the first one, so an override must replace the entry, not follow it.
  const std::vector<std::pair<std::string, std::string>> own = {
      {"RANK", absl::StrCat(rank)},
      {"WORLD_SIZE", absl::StrCat(options.world_size)},
      {"LOCAL_RANK", absl::StrCat(rank)},
      {"LOCAL_WORLD_SIZE", absl::StrCat(options.world_size)},
      {"GROUP_RANK", "0"},
      {"MASTER_ADDR", options.master_addr},
      {"MASTER_PORT", absl::StrCat(port)},
      {"TORCHELASTIC_USE_AGENT_STORE", "True"}};
  std::set<std::string> overridden;
  for (const auto& [name, value] : options.extra_env) overridden.insert(name);
  for (const auto& [name, value] : own) {
    if (!overridden.count(name)) env.push_back(absl::StrCat(name, "=", value));
  }
  for (const auto& [name, value] : options.extra_env) env.push_back(absl::StrCat(name, "=", value));
  return env;
}

std::vector<char*> CStrings(std::vector<std::string>& strings) {
  std::vector<char*> out;
  for (auto& s : strings) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

void Echo(const LaunchOptions& options, int rank, absl::string_view line) {
  if (options.output == RankOutput::kCapture) return;
  const bool raw =
      options.output == RankOutput::kRaw || (options.output == RankOutput::kRank0Raw && rank == 0);
  std::string text =
      raw ? absl::StrCat(line, "\n") : absl::StrCat("[rank ", rank, "] ", line, "\n");
  fwrite(text.data(), 1, text.size(), stdout);
  fflush(stdout);
}

// Reads what is available from a rank's pipe; returns false at end of file.
bool Drain(const LaunchOptions& options, int rank, Child& child, RankExit& exit) {
  char buffer[65536];
  const ssize_t n = read(child.out_fd, buffer, sizeof(buffer));
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return true;
  if (n <= 0) {
    if (!child.partial_line.empty()) {
      Echo(options, rank, child.partial_line);
      child.partial_line.clear();
    }
    close(child.out_fd);
    child.out_fd = -1;
    return false;
  }
  exit.output.append(buffer, static_cast<size_t>(n));
  if (exit.output.size() > kMaxKeptOutput) {
    exit.output.erase(0, exit.output.size() - kMaxKeptOutput);
  }
  child.partial_line.append(buffer, static_cast<size_t>(n));
  size_t start = 0;
  for (size_t nl; (nl = child.partial_line.find('\n', start)) != std::string::npos;
       start = nl + 1) {
    Echo(options, rank, absl::string_view(child.partial_line).substr(start, nl - start));
  }
  child.partial_line.erase(0, start);
  return true;
}

std::string LastLines(const std::string& output, int count) {
  size_t pos = output.size();
  if (pos > 0 && output[pos - 1] == '\n') --pos;
  for (int i = 0; i < count && pos > 0; ++i) {
    pos = output.rfind('\n', pos - 1);
    if (pos == std::string::npos) {
      pos = 0;
      break;
    }
  }
  absl::string_view tail(output);
  tail.remove_prefix(pos == 0 ? 0 : pos + 1);
  return std::string(tail);
}

// The launcher's own TCPStore, on a free port: it outlives the ranks, as torchrun's agent store.
absl::StatusOr<c10::intrusive_ptr<c10d::TCPStore>> StartStore(const LaunchOptions& options) {
  return CallTorch("launch: starting the rendezvous TCPStore", [&] {
    c10d::TCPStoreOptions store_options;
    store_options.port = 0;
    store_options.isServer = true;
    store_options.waitWorkers = false;
    // Bounds the launcher's own store calls only, not the job.
    store_options.timeout = std::chrono::minutes(5);
    return c10::make_intrusive<c10d::TCPStore>(options.master_addr, store_options);
  });
}

// The rank processes of one launch and what the report says of them.
struct Ranks {
  const LaunchOptions& options;
  LaunchReport& report;
  std::vector<Child> children;
  int running = 0;
  // When the ranks told to stop (SIGTERM) get SIGKILL; max(): none are waiting for it. (Not a
  // std::optional: GCC 12 at -O2 calls its time_point maybe-uninitialized, an error here.)
  Clock::time_point kill_at = Clock::time_point::max();

  // Sends `sig` to every running rank and its process group.
  void Stop(int sig) {
    for (int r = 0; r < options.world_size; ++r) {
      if (children[r].running) {
        kill(-children[r].pid, sig);
        kill(children[r].pid, sig);
        report.ranks[r].stopped_by_launcher = true;
      }
    }
  }

  // SIGTERM now, SIGKILL after the grace period.
  void StopGracefully(Clock::time_point now) {
    Stop(SIGTERM);
    kill_at = now + options.grace_period;
  }
};

// Forks and execs rank `r` in its own process group, killed with the launcher, its stdout and
// stderr into a non-blocking pipe the launcher reads. On failure stops the ranks started so far.
absl::Status StartRank(Ranks& ranks, int r, std::vector<char*>& c_args, int port) {
  ranks.report.ranks[r].rank = r;
  std::vector<std::string> env = BuildEnv(ranks.options, r, port);
  std::vector<char*> c_env = CStrings(env);
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) {
    ranks.Stop(SIGKILL);
    return absl::InternalError(absl::StrCat("launch: pipe failed: ", strerror(errno)));
  }
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) {
    ranks.Stop(SIGKILL);
    return absl::InternalError(absl::StrCat("launch: fork failed: ", strerror(errno)));
  }
  if (pid == 0) {
    // Child: only async-signal-safe calls until exec.
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(125);
    dup2(fds[1], STDOUT_FILENO);
    dup2(fds[1], STDERR_FILENO);
    execvpe(c_args[0], c_args.data(), c_env.data());
    const char msg[] = "launch: exec failed\n";
    (void)!write(STDERR_FILENO, msg, sizeof(msg) - 1);
    _exit(127);
  }
  setpgid(pid, pid);
  close(fds[1]);
  fcntl(fds[0], F_SETFL, fcntl(fds[0], F_GETFL) | O_NONBLOCK);
  Child& child = ranks.children[r];
  child.pid = pid;
  child.out_fd = fds[0];
  child.running = true;
  ++ranks.running;
  return absl::OkStatus();
}

// Waits up to 50 ms for output, then reads all that the ranks have written.
void ReadOutput(Ranks& ranks) {
  std::vector<pollfd> fds;
  std::vector<int> fd_rank;
  for (int r = 0; r < ranks.options.world_size; ++r) {
    if (ranks.children[r].out_fd >= 0) {
      fds.push_back({ranks.children[r].out_fd, POLLIN, 0});
      fd_rank.push_back(r);
    }
  }
  poll(fds.data(), fds.size(), 50);
  for (size_t i = 0; i < fds.size(); ++i) {
    if (fds[i].revents == 0) continue;
    const int r = fd_rank[i];
    Child& child = ranks.children[r];
    while (child.out_fd >= 0 && Drain(ranks.options, r, child, ranks.report.ranks[r])) {
      pollfd one{child.out_fd, POLLIN, 0};
      if (poll(&one, 1, 0) <= 0 || one.revents == 0) break;
    }
  }
}

// Records how each rank that ended ended; the first to fail (and not stopped by us) is the
// failed rank, and with stop_all_on_failure the others are stopped.
void ReapEndedRanks(Ranks& ranks) {
  for (int r = 0; r < ranks.options.world_size; ++r) {
    Child& child = ranks.children[r];
    if (!child.running) continue;
    int wstatus = 0;
    const pid_t done = waitpid(child.pid, &wstatus, WNOHANG);
    if (done != child.pid) continue;
    child.running = false;
    --ranks.running;
    RankExit& exit = ranks.report.ranks[r];
    if (WIFEXITED(wstatus)) {
      exit.exited = true;
      exit.exit_code = WEXITSTATUS(wstatus);
    } else if (WIFSIGNALED(wstatus)) {
      exit.signal = WTERMSIG(wstatus);
    }
    if (!exit.ok() && ranks.report.failed_rank < 0 && !exit.stopped_by_launcher) {
      ranks.report.failed_rank = r;
      if (ranks.options.stop_all_on_failure && ranks.running > 0) {
        ranks.StopGracefully(Clock::now());
      }
    }
  }
}

// Past the job's deadline, stops every rank; past a grace period, kills the ranks told to stop.
void EnforceDeadlines(Ranks& ranks, Clock::time_point deadline) {
  const auto now = Clock::now();
  if (!ranks.report.timed_out && now >= deadline && ranks.running > 0) {
    ranks.report.timed_out = true;
    ranks.StopGracefully(now);
  }
  if (now >= ranks.kill_at) {
    ranks.Stop(SIGKILL);
    ranks.kill_at = Clock::time_point::max();
  }
}

// The launch's status from its report: a timeout, else the failed rank with its last lines.
absl::Status Outcome(const LaunchOptions& options, const LaunchReport& report) {
  if (report.timed_out) {
    std::string still;
    for (const RankExit& exit : report.ranks) {
      if (exit.stopped_by_launcher) absl::StrAppend(&still, still.empty() ? "" : ", ", exit.rank);
    }
    return absl::DeadlineExceededError(
        absl::StrCat("launch: ranks [", still, "] still running after ",
                     std::chrono::duration_cast<std::chrono::seconds>(options.timeout).count(),
                     " s; all ranks were stopped"));
  }
  if (report.failed_rank >= 0) {
    const RankExit& exit = report.ranks[report.failed_rank];
    return absl::InternalError(absl::StrCat("launch: rank ", exit.rank, " of ", options.world_size,
                                            " ", exit.Describe(), "; its last output:\n",
                                            LastLines(exit.output, 20)));
  }
  return absl::OkStatus();
}

}  // namespace

std::string RankExit::Describe() const {
  if (exited) return absl::StrCat("exited with code ", exit_code);
  if (signal != 0) {
    return absl::StrCat("was killed by signal ", signal, " (", strsignal(signal), ")",
                        stopped_by_launcher ? " sent by the launcher" : "");
  }
  return "did not start";
}

absl::Status Launch(const std::vector<std::string>& argv, const LaunchOptions& options,
                    LaunchReport* report) {
  if (argv.empty()) return absl::InvalidArgumentError("launch: no program given");
  if (options.world_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("launch: world_size must be at least 1, got ", options.world_size));
  }
  auto store = StartStore(options);
  if (!store.ok()) return store.status();
  const int port = (*store)->getPort();

  LaunchReport local_report;
  LaunchReport& rep = report ? *report : local_report;
  rep = LaunchReport{};
  rep.ranks.resize(options.world_size);
  Ranks ranks{
      .options = options, .report = rep, .children = std::vector<Child>(options.world_size)};
  std::vector<std::string> args = argv;
  std::vector<char*> c_args = CStrings(args);
  for (int r = 0; r < options.world_size; ++r) {
    FSDP_RETURN_IF_ERROR(StartRank(ranks, r, c_args, port));
  }

  const auto deadline = Clock::now() + options.timeout;
  while (ranks.running > 0) {
    ReadOutput(ranks);
    ReapEndedRanks(ranks);
    EnforceDeadlines(ranks, deadline);
  }
  for (int r = 0; r < options.world_size; ++r) {
    while (ranks.children[r].out_fd >= 0 && Drain(options, r, ranks.children[r], rep.ranks[r])) {
    }
  }
  return Outcome(options, rep);
}

}  // namespace fsdp::comm
