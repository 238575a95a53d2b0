#include "comm/launcher.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <optional>
#include <set>

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
  std::set<std::string> replaced = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                    "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                                    "TORCHELASTIC_USE_AGENT_STORE"};
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
  const bool raw = options.output == RankOutput::kRaw ||
                   (options.output == RankOutput::kRank0Raw && rank == 0);
  std::string text = raw ? absl::StrCat(line, "\n") : absl::StrCat("[rank ", rank, "] ", line, "\n");
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
  for (size_t nl; (nl = child.partial_line.find('\n', start)) != std::string::npos; start = nl + 1) {
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
  // The store outlives the ranks: it is this launcher's, as torchrun's agent store.
  auto store = CallTorch("launch: starting the rendezvous TCPStore", [&] {
    c10d::TCPStoreOptions store_options;
    store_options.port = 0;
    store_options.isServer = true;
    store_options.waitWorkers = false;
    // Bounds the launcher's own store calls only, not the job.
    store_options.timeout = std::chrono::minutes(5);
    return c10::make_intrusive<c10d::TCPStore>(options.master_addr, store_options);
  });
  if (!store.ok()) return store.status();
  const int port = (*store)->getPort();

  LaunchReport local_report;
  LaunchReport& rep = report ? *report : local_report;
  rep = LaunchReport{};
  rep.ranks.resize(options.world_size);
  std::vector<Child> children(options.world_size);
  std::vector<std::string> args = argv;
  std::vector<char*> c_args = CStrings(args);

  auto stop = [&](int sig) {
    for (int r = 0; r < options.world_size; ++r) {
      if (children[r].running) {
        kill(-children[r].pid, sig);
        kill(children[r].pid, sig);
        rep.ranks[r].stopped_by_launcher = true;
      }
    }
  };

  for (int r = 0; r < options.world_size; ++r) {
    rep.ranks[r].rank = r;
    std::vector<std::string> env = BuildEnv(options, r, port);
    std::vector<char*> c_env = CStrings(env);
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) {
      stop(SIGKILL);
      return absl::InternalError(absl::StrCat("launch: pipe failed: ", strerror(errno)));
    }
    const pid_t parent = getpid();
    const pid_t pid = fork();
    if (pid < 0) {
      stop(SIGKILL);
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
    children[r].pid = pid;
    children[r].out_fd = fds[0];
    children[r].running = true;
  }

  const auto deadline = Clock::now() + options.timeout;
  std::optional<Clock::time_point> kill_at;
  int running = options.world_size;
  while (running > 0) {
    std::vector<pollfd> fds;
    std::vector<int> fd_rank;
    for (int r = 0; r < options.world_size; ++r) {
      if (children[r].out_fd >= 0) {
        fds.push_back({children[r].out_fd, POLLIN, 0});
        fd_rank.push_back(r);
      }
    }
    poll(fds.data(), fds.size(), 50);
    for (size_t i = 0; i < fds.size(); ++i) {
      if (fds[i].revents != 0) {
        const int r = fd_rank[i];
        while (children[r].out_fd >= 0 && Drain(options, r, children[r], rep.ranks[r])) {
          pollfd one{children[r].out_fd, POLLIN, 0};
          if (poll(&one, 1, 0) <= 0 || one.revents == 0) break;
        }
      }
    }
    for (int r = 0; r < options.world_size; ++r) {
      if (!children[r].running) continue;
      int wstatus = 0;
      const pid_t done = waitpid(children[r].pid, &wstatus, WNOHANG);
      if (done != children[r].pid) continue;
      children[r].running = false;
      --running;
      RankExit& exit = rep.ranks[r];
      if (WIFEXITED(wstatus)) {
        exit.exited = true;
        exit.exit_code = WEXITSTATUS(wstatus);
      } else if (WIFSIGNALED(wstatus)) {
        exit.signal = WTERMSIG(wstatus);
      }
      if (!exit.ok() && rep.failed_rank < 0 && !exit.stopped_by_launcher) {
        rep.failed_rank = r;
        if (options.stop_all_on_failure && running > 0) {
          stop(SIGTERM);
          kill_at = Clock::now() + options.grace_period;
        }
      }
    }
    const auto now = Clock::now();
    if (!rep.timed_out && now >= deadline && running > 0) {
      rep.timed_out = true;
      stop(SIGTERM);
      kill_at = now + options.grace_period;
    }
    if (kill_at && now >= *kill_at) {
      stop(SIGKILL);
      kill_at.reset();
    }
  }
  for (int r = 0; r < options.world_size; ++r) {
    while (children[r].out_fd >= 0 && Drain(options, r, children[r], rep.ranks[r])) {
    }
  }

  if (rep.timed_out) {
    std::string still;
    for (const RankExit& exit : rep.ranks) {
      if (exit.stopped_by_launcher) absl::StrAppend(&still, still.empty() ? "" : ", ", exit.rank);
    }
    return absl::DeadlineExceededError(absl::StrCat(
        "launch: ranks [", still, "] still running after ",
        std::chrono::duration_cast<std::chrono::seconds>(options.timeout).count(),
        " s; all ranks were stopped"));
  }
  if (rep.failed_rank >= 0) {
    const RankExit& exit = rep.ranks[rep.failed_rank];
    return absl::InternalError(absl::StrCat("launch: rank ", exit.rank, " of ",
                                            options.world_size, " ", exit.Describe(),
                                            "; its last output:\n", LastLines(exit.output, 20)));
  }
  return absl::OkStatus();
}

}  // namespace fsdp::comm
