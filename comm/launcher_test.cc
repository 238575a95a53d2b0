// The launcher with plain shell programs as ranks: environment, exit reporting, stopping.
#include "comm/launcher.h"

#include <chrono>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "comm/multiprocess_testutil.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fsdp::comm {
namespace {

using ::fsdp::testing::StatusIs;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::MatchesRegex;

LaunchOptions Quiet(int world_size) {
  LaunchOptions options;
  options.world_size = world_size;
  options.output = RankOutput::kCapture;
  options.timeout = std::chrono::seconds(60);
  options.grace_period = std::chrono::milliseconds(500);
  return options;
}

std::vector<std::string> Shell(const std::string& script) { return {"/bin/sh", "-c", script}; }

TEST(Launcher, GivesEachRankTheTorchrunEnvironment) {
  LaunchOptions options = Quiet(3);
  options.extra_env = {{"FSDP_EXTRA", "yes"}};
  LaunchReport report;
  FSDP_ASSERT_OK(Launch(Shell("echo rank=$RANK/$WORLD_SIZE local=$LOCAL_RANK/$LOCAL_WORLD_SIZE "
                              "addr=$MASTER_ADDR port=$MASTER_PORT "
                              "agent=$TORCHELASTIC_USE_AGENT_STORE extra=$FSDP_EXTRA"),
                        options, &report));
  ASSERT_EQ(report.ranks.size(), 3u);
  for (int r = 0; r < 3; ++r) {
    EXPECT_THAT(report.ranks[r].output,
                MatchesRegex(absl::StrCat("rank=", r, "/3 local=", r,
                                          "/3 addr=127.0.0.1 port=[1-9][0-9]* agent=True "
                                          "extra=yes\n")));
    EXPECT_TRUE(report.ranks[r].ok());
  }
  EXPECT_EQ(report.failed_rank, -1);
}

TEST(Launcher, ExtraEnvReplacesTheLaunchersOwnVariables) {
  // /usr/bin/env prints the environment exactly as received: a variable given twice would show
  // twice (and getenv would return the launcher's value, the first one).
  LaunchOptions options = Quiet(2);
  options.extra_env = {{"MASTER_PORT", "29555"}, {"TORCHELASTIC_USE_AGENT_STORE", "False"}};
  LaunchReport report;
  FSDP_ASSERT_OK(Launch({"/usr/bin/env"}, options, &report));
  ASSERT_EQ(report.ranks.size(), 2u);
  for (const RankExit& rank : report.ranks) {
    std::vector<std::string> ports, agents;
    for (absl::string_view line : absl::StrSplit(rank.output, '\n')) {
      if (absl::StartsWith(line, "MASTER_PORT=")) ports.emplace_back(line);
      if (absl::StartsWith(line, "TORCHELASTIC_USE_AGENT_STORE=")) agents.emplace_back(line);
    }
    EXPECT_THAT(ports, ElementsAre("MASTER_PORT=29555")) << "rank " << rank.rank;
    EXPECT_THAT(agents, ElementsAre("TORCHELASTIC_USE_AGENT_STORE=False")) << "rank " << rank.rank;
  }
}

TEST(Launcher, UnsetEnvRemovesVariables) {
  LaunchOptions options = Quiet(1);
  options.unset_env = {"HOME"};
  LaunchReport report;
  FSDP_ASSERT_OK(Launch(Shell("echo home=[${HOME-unset}]"), options, &report));
  EXPECT_EQ(report.ranks[0].output, "home=[unset]\n");
}

TEST(Launcher, FailingRankStopsTheOthersAndIsNamed) {
  LaunchReport report;
  const auto start = std::chrono::steady_clock::now();
  absl::Status status = Launch(
      Shell("if [ $RANK = 1 ]; then echo 'out of memory in layer 3' >&2; exit 3; fi; "
            "exec sleep 60"),
      Quiet(3), &report);
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInternal,
                               AllOf(HasSubstr("rank 1 of 3 exited with code 3"),
                                     HasSubstr("out of memory in layer 3"))));
  EXPECT_EQ(report.failed_rank, 1);
  for (int r : {0, 2}) {
    EXPECT_TRUE(report.ranks[r].stopped_by_launcher);
    EXPECT_EQ(report.ranks[r].signal, SIGTERM) << report.ranks[r].Describe();
  }
  // Stopped long before the sleeping ranks would have ended on their own.
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30));
}

TEST(Launcher, RankKilledBySignalIsReported) {
  LaunchReport report;
  EXPECT_THAT(Launch(Shell("if [ $RANK = 0 ]; then kill -9 $$; fi; exec sleep 60"), Quiet(2),
                     &report),
              StatusIs(absl::StatusCode::kInternal,
                       HasSubstr("rank 0 of 2 was killed by signal 9")));
  EXPECT_EQ(report.failed_rank, 0);
  EXPECT_EQ(report.ranks[0].signal, SIGKILL);
  EXPECT_FALSE(report.ranks[0].stopped_by_launcher);
}

TEST(Launcher, TimeoutStopsEveryRankEvenOneIgnoringSigterm) {
  LaunchOptions options = Quiet(2);
  options.timeout = std::chrono::milliseconds(500);
  LaunchReport report;
  EXPECT_THAT(Launch(Shell("trap '' TERM; echo started; while true; do sleep 1; done"), options,
                     &report),
              StatusIs(absl::StatusCode::kDeadlineExceeded,
                       HasSubstr("ranks [0, 1] still running")));
  EXPECT_TRUE(report.timed_out);
  for (const RankExit& exit : report.ranks) {
    EXPECT_EQ(exit.signal, SIGKILL) << exit.Describe();
    EXPECT_THAT(exit.output, HasSubstr("started"));
  }
}

TEST(Launcher, MissingProgramFailsWithExecError) {
  EXPECT_THAT(Launch({"/nonexistent/fsdp-program"}, Quiet(2)),
              StatusIs(absl::StatusCode::kInternal,
                       AllOf(HasSubstr("exited with code 127"), HasSubstr("exec failed"))));
}

TEST(Launcher, RefusesBadArguments) {
  EXPECT_THAT(Launch({}, Quiet(2)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("no program")));
  EXPECT_THAT(Launch(Shell("true"), Quiet(0)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("at least 1")));
}

}  // namespace
}  // namespace fsdp::comm
