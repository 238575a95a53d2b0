// A job across hosts, started the torchrun way (RANK, WORLD_SIZE, MASTER_ADDR,
// MASTER_PORT, GLOO_SOCKET_IFNAME per process, rank 0 hosting the TCPStore),
// keeps going only while all of its ranks do: when one is killed (SIGKILL) or
// hangs (SIGSTOP), the others exit non-zero within seconds, naming it, instead
// of hanging.
//
// The hosts are two network namespaces joined by a veth pair: host A
// (10.213.0.1) runs ranks 0 and 1, host B (10.213.0.2) runs rank 2, each rank
// binding Gloo to its veth. Making namespaces needs root (CAP_NET_ADMIN,
// CAP_SYS_ADMIN) and `ip` (iproute2); where that fails every rank runs on
// 127.0.0.1 instead and the test says so in its output (the checks are the
// same). The job is comm/multihost_failure_job.cc.
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

extern char** environ;

namespace {

using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;

constexpr int kWorldSize = 3;
constexpr int kTimeoutMs = 4000;  // the job's collective timeout
constexpr int kDetectMs = 6000;   // how long a failed rank waits for its peers' reports
// Worst case for a survivor: its collective times out, it waits for the peers'
// reports, and rank 0, hosting the store, lingers one more timeout for the
// others. Plus slack for a busy machine.
constexpr auto kExitWithin = std::chrono::seconds(30);

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream contents;
  contents << in.rdbuf();
  return contents.str();
}

const char* IpBinary() {
  for (const char* path : {"/usr/bin/ip", "/bin/ip", "/usr/sbin/ip", "/sbin/ip"}) {
    if (access(path, X_OK) == 0) return path;
  }
  return nullptr;
}

// Runs `ip args`; the empty string when it succeeded, else what it printed.
std::string Ip(const std::string& args) {
  const char* ip = IpBinary();
  if (ip == nullptr) return "no `ip` command (install iproute2)";
  const std::string command = absl::StrCat(ip, " ", args, " 2>&1");
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return "popen failed";
  std::string out;
  char buf[256];
  while (fgets(buf, sizeof(buf), pipe) != nullptr) out += buf;
  const int rc = pclose(pipe);
  if (rc == 0) return "";
  return absl::StrCat("`ip ", args, "` failed: ", out.empty() ? "(no output)" : out);
}

// Where each rank runs: a namespace (empty: this one), its address and its
// interface.
struct Host {
  std::string netns;
  std::string addr;
  std::string ifname;
};

// Two namespaces joined by a veth pair, removed again on destruction; or, where
// they cannot be made, 127.0.0.1 for every rank.
class Hosts {
 public:
  Hosts() {
    // Unique among concurrent runs (names are global to the machine; veth names <= 15 chars).
    const std::string tag = absl::StrCat(
        getpid() % 100000, "x", absl::Hex(Clock::now().time_since_epoch().count() & 0xFFF));
    const std::string ns_a = "fsdp" + tag + "a", ns_b = "fsdp" + tag + "b";
    const std::string if_a = "fv" + tag + "a", if_b = "fv" + tag + "b";
    std::string error;
    for (const std::string& args : std::vector<std::string>{
             "netns add " + ns_a,
             "netns add " + ns_b,
             "link add " + if_a + " type veth peer name " + if_b,
             "link set " + if_a + " netns " + ns_a,
             "link set " + if_b + " netns " + ns_b,
             "-n " + ns_a + " addr add 10.213.0.1/24 dev " + if_a,
             "-n " + ns_b + " addr add 10.213.0.2/24 dev " + if_b,
             "-n " + ns_a + " link set lo up",
             "-n " + ns_b + " link set lo up",
             "-n " + ns_a + " link set " + if_a + " up",
             "-n " + ns_b + " link set " + if_b + " up",
         }) {
      error = Ip(args);
      if (!error.empty()) break;
      if (args.rfind("netns add ", 0) == 0) created_.push_back(args.substr(10));
    }
    if (error.empty()) {
      const Host a{ns_a, "10.213.0.1", if_a}, b{ns_b, "10.213.0.2", if_b};
      ranks_ = {a, a, b};
      description_ =
          absl::StrCat("hosts: network namespaces ", ns_a, " (10.213.0.1, ranks 0 and 1) and ",
                       ns_b, " (10.213.0.2, rank 2) joined by the veth pair ", if_a, "/", if_b);
      return;
    }
    Cleanup();
    if (error.back() == '\n') error.pop_back();
    ranks_.assign(kWorldSize, Host{"", "127.0.0.1", "lo"});
    description_ = absl::StrCat("network namespaces unavailable (", error,
                                "): every rank runs on 127.0.0.1 instead");
  }
  ~Hosts() { Cleanup(); }

  bool namespaces() const { return !ranks_[0].netns.empty(); }
  const Host& rank(int r) const { return ranks_[r]; }
  const std::string& description() const { return description_; }

 private:
  void Cleanup() {
    for (const std::string& ns : created_) (void)Ip("netns del " + ns);  // takes its veth along
    created_.clear();
  }
  std::vector<std::string> created_;
  std::vector<Host> ranks_;
  std::string description_;
};

int FreeLoopbackPort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (fd < 0 || bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    if (fd >= 0) close(fd);
    return 29500;
  }
  close(fd);
  return ntohs(addr.sin_port);
}

struct Rank {
  pid_t pid = -1;
  std::string log;
  bool done = false;
  int status = 0;
  Clock::time_point ended;
};

// The job's ranks, each started as it would be on its host.
class Job {
 public:
  explicit Job(const Hosts& hosts) {
    const char* srcdir = std::getenv("TEST_SRCDIR");
    const char* tmpdir = std::getenv("TEST_TMPDIR");
    const std::string binary =
        std::string(srcdir ? srcdir : ".") + "/fsdp_cpp/comm/multihost_failure_job";
    const int port = hosts.namespaces() ? 29500 : FreeLoopbackPort();
    static int job_counter = 0;
    ++job_counter;
    ranks_.resize(kWorldSize);
    for (int r = 0; r < kWorldSize; ++r) {
      const Host& host = hosts.rank(r);
      ranks_[r].log =
          absl::StrCat(tmpdir ? tmpdir : "/tmp", "/job", job_counter, "_rank", r, ".log");
      std::vector<std::string> env;
      for (char** e = environ; *e != nullptr; ++e) {
        const std::string var = *e;
        if (var.rfind("TORCHELASTIC_USE_AGENT_STORE=", 0) != 0) env.push_back(var);
      }
      for (const auto& [k, v] : std::vector<std::pair<std::string, std::string>>{
               {"RANK", std::to_string(r)},
               {"WORLD_SIZE", std::to_string(kWorldSize)},
               {"LOCAL_RANK", std::to_string(host.addr == hosts.rank(0).addr ? r : 0)},
               {"MASTER_ADDR", hosts.rank(0).addr},
               {"MASTER_PORT", std::to_string(port)},
               {"GLOO_SOCKET_IFNAME", host.ifname}}) {
        env.push_back(k + "=" + v);
      }
      std::vector<std::string> argv;
      if (!host.netns.empty()) argv = {IpBinary(), "netns", "exec", host.netns};
      argv.insert(argv.end(), {binary, absl::StrCat("--timeout_ms=", kTimeoutMs),
                               absl::StrCat("--detect_ms=", kDetectMs)});
      ranks_[r].pid = Spawn(argv, env, ranks_[r].log);
    }
  }

  ~Job() {
    for (Rank& rank : ranks_) {
      if (rank.pid > 0 && !rank.done) {
        kill(rank.pid, SIGKILL);
        waitpid(rank.pid, nullptr, 0);
      }
    }
  }

  std::string Output(int r) const { return ReadFile(ranks_[r].log); }
  Rank& rank(int r) { return ranks_[r]; }

  // Waits until every rank has printed "step `step`" (false at `deadline` or if
  // one ended).
  bool WaitForStep(int step, Clock::time_point deadline) {
    while (Clock::now() < deadline) {
      Poll();
      int there = 0;
      for (int r = 0; r < kWorldSize; ++r) {
        if (ranks_[r].done) return false;
        if (Output(r).find(absl::StrCat("rank ", r, " step ", step, "\n")) != std::string::npos) {
          ++there;
        }
      }
      if (there == kWorldSize) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }

  // Waits until every rank but `except` has ended, or `deadline`.
  void WaitForOthers(int except, Clock::time_point deadline) {
    while (Clock::now() < deadline) {
      Poll();
      bool all = true;
      for (int r = 0; r < kWorldSize; ++r) all = all && (r == except || ranks_[r].done);
      if (all) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }

  std::string Describe(int r) const {
    const Rank& rank = ranks_[r];
    if (!rank.done) return "still running";
    if (WIFEXITED(rank.status)) return absl::StrCat("exited with code ", WEXITSTATUS(rank.status));
    if (WIFSIGNALED(rank.status)) return absl::StrCat("killed by signal ", WTERMSIG(rank.status));
    return "ended";
  }

 private:
  static pid_t Spawn(const std::vector<std::string>& argv, const std::vector<std::string>& env,
                     const std::string& log) {
    std::vector<char*> c_argv, c_env;
    for (const std::string& a : argv) c_argv.push_back(const_cast<char*>(a.c_str()));
    c_argv.push_back(nullptr);
    for (const std::string& e : env) c_env.push_back(const_cast<char*>(e.c_str()));
    c_env.push_back(nullptr);
    const pid_t pid = fork();
    if (pid == 0) {
      const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (fd >= 0) {
        dup2(fd, STDOUT_FILENO);
        dup2(fd, STDERR_FILENO);
      }
      execve(c_argv[0], c_argv.data(), c_env.data());
      std::perror("execve");
      _exit(127);
    }
    return pid;
  }

  void Poll() {
    for (Rank& rank : ranks_) {
      if (rank.done) continue;
      if (waitpid(rank.pid, &rank.status, WNOHANG) == rank.pid) {
        rank.done = true;
        rank.ended = Clock::now();
      }
    }
  }

  std::vector<Rank> ranks_;
};

struct FailureCase {
  std::string name;
  int rank;    // the rank that fails
  int signal;  // SIGKILL: dies; SIGSTOP: hangs
};

class MultihostFailureTest : public ::testing::TestWithParam<FailureCase> {};

TEST_P(MultihostFailureTest, OtherRanksExitNonZeroNamingIt) {
  const FailureCase& c = GetParam();
  Hosts hosts;
  std::printf("%s\n", hosts.description().c_str());
  Job job(hosts);
  ASSERT_TRUE(job.WaitForStep(5, Clock::now() + std::chrono::seconds(60)))
      << "the job did not get going:\n"
      << job.Output(0) << job.Output(1) << job.Output(2);

  ASSERT_EQ(kill(job.rank(c.rank).pid, c.signal), 0);
  const Clock::time_point signalled = Clock::now();
  std::printf("sent signal %d to rank %d\n", c.signal, c.rank);
  job.WaitForOthers(c.rank, signalled + kExitWithin);

  for (int r = 0; r < kWorldSize; ++r) {
    if (r == c.rank) continue;
    const Rank& rank = job.rank(r);
    const std::string output = job.Output(r);
    ASSERT_TRUE(rank.done) << "rank " << r << " still runs "
                           << std::chrono::duration_cast<std::chrono::seconds>(kExitWithin).count()
                           << " s after rank " << c.rank << " got signal " << c.signal << ":\n"
                           << output;
    std::printf("rank %d: %s %.1f s after the signal\n", r, job.Describe(r).c_str(),
                std::chrono::duration<double>(rank.ended - signalled).count());
    EXPECT_TRUE(WIFEXITED(rank.status) && WEXITSTATUS(rank.status) == 1)
        << "rank " << r << " " << job.Describe(r) << ":\n"
        << output;
    EXPECT_THAT(output, HasSubstr(absl::StrCat("rank ", r, ": failed at step ")));
    EXPECT_THAT(output, HasSubstr(absl::StrCat("not responding: rank(s) ", c.rank)));
    if (c.signal == SIGSTOP) {
      // Nothing closed a connection: only the collective's timeout can have
      // ended the wait.
      EXPECT_THAT(output, HasSubstr("DEADLINE_EXCEEDED")) << "rank " << r;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Ranks, MultihostFailureTest,
                         ::testing::Values(FailureCase{"KilledRank2OnHostB", 2, SIGKILL},
                                           FailureCase{"KilledRank1OnHostA", 1, SIGKILL},
                                           FailureCase{"KilledRank0StoreHost", 0, SIGKILL},
                                           FailureCase{"StoppedRank2OnHostB", 2, SIGSTOP}),
                         [](const ::testing::TestParamInfo<FailureCase>& info) {
                           return info.param.name;
                         });

}  // namespace
