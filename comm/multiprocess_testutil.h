// Test helpers that run a test body as N real OS processes (one per rank).
//
//   TEST_P(AllGatherTest, GathersInRankOrder) {
//     RunInRanks(GetParam(), [](ProcessGroup& group) { ... EXPECT_...; });
//   }
//
// In the test process, RunInRanks re-executes the test binary once per rank with
// --gtest_filter set to the current test and the torchrun environment (see launcher.h); it
// then expects every rank to exit 0 having passed exactly that one test, and reports each
// failing rank's output. In a rank process (FSDP_TEST_RANK_PROCESS=1), it joins the process
// group from the environment and calls the body.
#ifndef FSDP_CPP_COMM_MULTIPROCESS_TESTUTIL_H_
#define FSDP_CPP_COMM_MULTIPROCESS_TESTUTIL_H_

#include <functional>
#include <string>

#include "absl/status/status.h"
#include "comm/launcher.h"
#include "comm/process_group.h"
#include "comm/status_macros.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fsdp::testing {

using RankBody = std::function<void(comm::ProcessGroup& group)>;

// True in a rank process started by RunInRanks.
bool IsRankProcess();

// A line rank 0 prints starting with this (a measured figure, e.g. a worst difference) is
// copied into the test's own output by RunInRanks; the ranks' other output shows only when
// they fail.
inline constexpr char kMeasuredPrefix[] = "MEASURED ";

// Runs `body` on `world_size` ranks and records a test failure for each rank that failed.
void RunInRanks(int world_size, const RankBody& body,
                std::chrono::milliseconds timeout = std::chrono::minutes(3));

// Lower level: runs `body` on the ranks with the given launcher options and returns the
// launch status and report, for tests that expect ranks to fail. In a rank process it runs
// the body and returns OK.
absl::Status RunInRanksWithReport(const comm::LaunchOptions& options, const RankBody& body,
                                  comm::LaunchReport* report);

// gMock matchers for absl::Status / absl::StatusOr.
MATCHER(IsOk, "is OK") {
  if constexpr (std::is_same_v<std::decay_t<arg_type>, absl::Status>) {
    *result_listener << "status is " << arg.ToString();
    return arg.ok();
  } else {
    *result_listener << "status is " << arg.status().ToString();
    return arg.ok();
  }
}

MATCHER_P2(StatusIs, code, message_matcher,
           "has code " + absl::StatusCodeToString(code) + " and a matching message") {
  absl::Status status;
  if constexpr (std::is_same_v<std::decay_t<arg_type>, absl::Status>) {
    status = arg;
  } else {
    status = arg.status();
  }
  *result_listener << "status is " << status.ToString();
  return status.code() == code &&
         ::testing::ExplainMatchResult(message_matcher, std::string(status.message()),
                                       result_listener);
}

}  // namespace fsdp::testing

#define FSDP_ASSERT_OK(expr) ASSERT_THAT((expr), ::fsdp::testing::IsOk())
#define FSDP_EXPECT_OK(expr) EXPECT_THAT((expr), ::fsdp::testing::IsOk())
// ASSERT_OK_AND_ASSIGN(lhs, statusor-expr) for test bodies.
#define FSDP_ASSERT_OK_AND_ASSIGN(lhs, expr) \
  FSDP_ASSERT_OK_AND_ASSIGN_IMPL_(FSDP_STATUS_CONCAT_(fsdp_test_so_, __LINE__), lhs, expr)
#define FSDP_ASSERT_OK_AND_ASSIGN_IMPL_(so, lhs, expr) \
  auto so = (expr);                                    \
  FSDP_ASSERT_OK(so);                                  \
  lhs = std::move(so).value()

#endif  // FSDP_CPP_COMM_MULTIPROCESS_TESTUTIL_H_
