// Rendezvous from torchrun-style environment variables and from a FileStore.
#include "comm/rendezvous.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <thread>

#include "comm/multiprocess_testutil.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fsdp::comm {
namespace {

using ::fsdp::testing::RunInRanks;
using ::fsdp::testing::RunInRanksWithReport;
using ::fsdp::testing::StatusIs;
using ::testing::HasSubstr;

// Sets the torchrun variables for one test and restores the environment after it.
class EnvTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* name : kNames) {
      const char* value = std::getenv(name);
      saved_.emplace_back(name, value ? std::optional<std::string>(value) : std::nullopt);
    }
    setenv("RANK", "1", 1);
    setenv("WORLD_SIZE", "4", 1);
    setenv("MASTER_ADDR", "10.1.2.3", 1);
    setenv("MASTER_PORT", "29511", 1);
    unsetenv("LOCAL_RANK");
    unsetenv("LOCAL_WORLD_SIZE");
    unsetenv("TORCHELASTIC_USE_AGENT_STORE");
  }
  void TearDown() override {
    for (const auto& [name, value] : saved_) {
      if (value) {
        setenv(name.c_str(), value->c_str(), 1);
      } else {
        unsetenv(name.c_str());
      }
    }
  }

 private:
  static constexpr const char* kNames[] = {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                           "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                           "TORCHELASTIC_USE_AGENT_STORE"};
  std::vector<std::pair<std::string, std::optional<std::string>>> saved_;
};

TEST_F(EnvTest, ReadsTorchrunVariables) {
  setenv("LOCAL_RANK", "0", 1);
  setenv("LOCAL_WORLD_SIZE", "2", 1);
  setenv("TORCHELASTIC_USE_AGENT_STORE", "True", 1);
  FSDP_ASSERT_OK_AND_ASSIGN(RankInfo info, RankInfoFromEnv());
  EXPECT_EQ(info.rank, 1);
  EXPECT_EQ(info.world_size, 4);
  EXPECT_EQ(info.local_rank, 0);
  EXPECT_EQ(info.local_world_size, 2);
  EXPECT_EQ(info.master_addr, "10.1.2.3");
  EXPECT_EQ(info.master_port, 29511);
  EXPECT_TRUE(info.launcher_hosts_store);
  EXPECT_TRUE(LaunchedByLauncher());
}

TEST_F(EnvTest, LocalRankDefaultsToRank) {
  FSDP_ASSERT_OK_AND_ASSIGN(RankInfo info, RankInfoFromEnv());
  EXPECT_EQ(info.local_rank, 1);
  EXPECT_FALSE(info.launcher_hosts_store);
}

TEST_F(EnvTest, MissingVariableIsNamed) {
  unsetenv("MASTER_PORT");
  EXPECT_THAT(RankInfoFromEnv(), StatusIs(absl::StatusCode::kInvalidArgument,
                                          HasSubstr("MASTER_PORT is not set")));
  unsetenv("RANK");
  EXPECT_THAT(RankInfoFromEnv(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("RANK is not set")));
  EXPECT_FALSE(LaunchedByLauncher());
}

TEST_F(EnvTest, MalformedValuesAreNamed) {
  setenv("WORLD_SIZE", "four", 1);
  EXPECT_THAT(RankInfoFromEnv(), StatusIs(absl::StatusCode::kInvalidArgument,
                                          HasSubstr("WORLD_SIZE='four' is not")));
  setenv("WORLD_SIZE", "1", 1);
  EXPECT_THAT(RankInfoFromEnv(), StatusIs(absl::StatusCode::kInvalidArgument,
                                          HasSubstr("RANK=1 is outside WORLD_SIZE=1")));
  setenv("WORLD_SIZE", "4", 1);
  setenv("MASTER_PORT", "70000", 1);
  EXPECT_THAT(RankInfoFromEnv(), StatusIs(absl::StatusCode::kInvalidArgument,
                                          HasSubstr("MASTER_PORT=70000 is not a TCP port")));
}

int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

// Ranks started as by hand on each host (no agent store): rank 0 hosts the TCPStore on a free
// port. Output is captured for the test to read.
LaunchOptions RankZeroHostsTheStore(int world_size) {
  LaunchOptions options;
  options.world_size = world_size;
  options.output = RankOutput::kCapture;
  options.timeout = std::chrono::seconds(90);
  options.extra_env = {{"TORCHELASTIC_USE_AGENT_STORE", "False"},
                       {"MASTER_PORT", std::to_string(FreePort())}};
  return options;
}

class RendezvousTest : public ::testing::TestWithParam<int> {};

TEST_P(RendezvousTest, RankZeroHostsTheStoreWithoutAnAgentStore) {
  // As a plain `RANK=.. WORLD_SIZE=.. MASTER_ADDR=.. MASTER_PORT=.. ./prog` start on each host.
  const LaunchOptions options = RankZeroHostsTheStore(GetParam());
  LaunchReport report;
  absl::Status status = RunInRanksWithReport(
      options,
      [](ProcessGroup& group) {
        at::Tensor t = at::ones({3});
        FSDP_ASSERT_OK(group.AllReduce(t));
        EXPECT_EQ(t[0].item<float>(), group.size());
      },
      &report);
  if (fsdp::testing::IsRankProcess()) return;
  FSDP_EXPECT_OK(status);
  for (const RankExit& exit : report.ranks) {
    EXPECT_THAT(exit.output, HasSubstr("[  PASSED  ] 1 test.")) << exit.output;
  }
}

TEST_P(RendezvousTest, FileStoreGroup) {
  const std::string path = absl::StrCat(std::getenv("TEST_TMPDIR") ? std::getenv("TEST_TMPDIR")
                                                                   : "/tmp",
                                        "/filestore_ws", GetParam(), "_", getpid());
  // The path is fixed by the test process (its pid) and reaches the ranks in the environment.
  if (!fsdp::testing::IsRankProcess()) setenv("FSDP_TEST_FILESTORE", path.c_str(), 1);
  RunInRanks(GetParam(), [](ProcessGroup& group) {
    FSDP_ASSERT_OK_AND_ASSIGN(
        auto file_group,
        InitProcessGroupWithFile(std::getenv("FSDP_TEST_FILESTORE"), group.rank(), group.size(),
                                 {.timeout = std::chrono::seconds(60), .group_name = "file"}));
    at::Tensor t = at::full({2}, static_cast<float>(group.rank()));
    FSDP_ASSERT_OK(file_group->AllReduce(t, ReduceOp::kMax));
    EXPECT_EQ(t[0].item<float>(), group.size() - 1);
    EXPECT_EQ(file_group->name(), "file");
  });
}

// CPU time this process has used, in seconds.
double ProcessCpuSeconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

TEST(StoreHostDeath, OtherRanksStayIdleAndTheirCollectivesFail) {
  // Rank 0 hosts the store and exits once the group is up. The other ranks must stay idle and
  // learn of the loss from their next collective, as a status. (LibTorch 1.13's TCPStore client
  // served a second connection from a thread that spun on the closed socket, or aborted the
  // rank when the connection was reset.)
  const LaunchOptions options = RankZeroHostsTheStore(3);
  LaunchReport report;
  absl::Status status = RunInRanksWithReport(
      options,
      [](ProcessGroup& group) {
        FSDP_ASSERT_OK(group.Barrier());
        if (group.rank() == 0) {
          std::fflush(stdout);
          _exit(0);
        }
        std::this_thread::sleep_for(std::chrono::seconds(2));  // rank 0 is gone by now
        const double before = ProcessCpuSeconds();
        std::this_thread::sleep_for(std::chrono::seconds(2));
        EXPECT_LT(ProcessCpuSeconds() - before, 0.2)
            << "rank " << group.rank() << " kept a core busy after the store's host exited";
        at::Tensor t = at::ones({4});
        EXPECT_THAT(group.AllReduce(t, ReduceOp::kSum, {.timeout = std::chrono::seconds(10)}),
                    StatusIs(absl::StatusCode::kUnavailable, HasSubstr("all_reduce on rank")));
      },
      &report);
  if (fsdp::testing::IsRankProcess()) return;
  ASSERT_EQ(report.ranks.size(), 3u);
  EXPECT_TRUE(report.ranks[0].ok()) << report.ranks[0].Describe() << "\n" << report.ranks[0].output;
  for (int r = 1; r < 3; ++r) {
    EXPECT_THAT(report.ranks[r].output, HasSubstr("[  PASSED  ] 1 test."))
        << "rank " << r << " " << report.ranks[r].Describe() << ":\n"
        << report.ranks[r].output;
  }
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, RendezvousTest, ::testing::Values(1, 2, 3, 4),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return "ws" + std::to_string(info.param);
                         });

}  // namespace
}  // namespace fsdp::comm
