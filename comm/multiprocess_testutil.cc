#include "comm/multiprocess_testutil.h"

#include <cstdlib>
#include <iostream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "comm/rendezvous.h"
#include "comm/status_macros.h"

namespace fsdp::testing {
namespace {

constexpr char kRankProcessVar[] = "FSDP_TEST_RANK_PROCESS";

std::string CurrentTestName() {
  const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
  return absl::StrCat(info->test_suite_name(), ".", info->name());
}

void RunBodyInThisRank(const RankBody& body) {
  auto group = comm::InitProcessGroupFromEnv({.timeout = std::chrono::seconds(60)});
  ASSERT_THAT(group, IsOk()) << "rank process could not join the group";
  body(**group);
}

}  // namespace

bool IsRankProcess() {
  const char* value = std::getenv(kRankProcessVar);
  return value != nullptr && std::string(value) == "1";
}

absl::Status RunInRanksWithReport(const comm::LaunchOptions& options, const RankBody& body,
                                  comm::LaunchReport* report) {
  if (IsRankProcess()) {
    RunBodyInThisRank(body);
    return absl::OkStatus();
  }
  comm::LaunchOptions opts = options;
  opts.extra_env.emplace_back(kRankProcessVar, "1");
  // The rank processes are not Bazel test shards and must not write the test's XML report.
  for (const char* name :
       {"XML_OUTPUT_FILE", "GTEST_OUTPUT", "TEST_PREMATURE_EXIT_FILE", "GTEST_SHARD_INDEX",
        "GTEST_TOTAL_SHARDS", "GTEST_SHARD_STATUS_FILE", "TEST_SHARD_INDEX", "TEST_TOTAL_SHARDS",
        "TEST_SHARD_STATUS_FILE", "GTEST_FILTER"}) {
    opts.unset_env.emplace_back(name);
  }
  return comm::Launch({"/proc/self/exe", "--gtest_filter=" + CurrentTestName(), "--gtest_color=no"},
                      opts, report);
}

void RunInRanks(int world_size, const RankBody& body, std::chrono::milliseconds timeout) {
  comm::LaunchOptions options;
  options.world_size = world_size;
  options.timeout = timeout;
  options.output = comm::RankOutput::kCapture;
  comm::LaunchReport report;
  const absl::Status status = RunInRanksWithReport(options, body, &report);
  if (IsRankProcess()) return;
  EXPECT_THAT(status, IsOk());
  for (const comm::RankExit& exit : report.ranks) {
    // A rank that passed must have run this very test (not zero tests through a bad filter).
    const bool ran_test = absl::StrContains(exit.output, "[  PASSED  ] 1 test.");
    if (!exit.ok() || !ran_test) {
      ADD_FAILURE() << "rank " << exit.rank << " of " << world_size << " " << exit.Describe()
                    << (ran_test ? "" : " without passing the test") << "; its output:\n"
                    << exit.output;
    }
    // Figures a test reports (kMeasuredPrefix lines) reach the test's own log, once: rank 0's.
    if (exit.rank != 0) continue;
    for (absl::string_view line : absl::StrSplit(exit.output, '\n')) {
      if (absl::StartsWith(line, kMeasuredPrefix)) std::cout << line << "\n";
    }
  }
}

}  // namespace fsdp::testing
