#include "comm/status_macros.h"

#include <c10/util/Exception.h>

#include <stdexcept>

#include "comm/multiprocess_testutil.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fsdp {
namespace {

using ::fsdp::testing::StatusIs;
using ::testing::HasSubstr;
using ::testing::Not;

absl::Status FailsWith(absl::Status status) { return status; }

absl::Status Outer() {
  FSDP_RETURN_IF_ERROR(FailsWith(absl::NotFoundError("no such tensor")), "loading 'w'");
  return absl::OkStatus();
}

absl::StatusOr<int> Twice(absl::StatusOr<int> in) {
  FSDP_ASSIGN_OR_RETURN(int value, in);
  return 2 * value;
}

TEST(StatusMacros, ReturnIfErrorAddsContextAndKeepsCode) {
  EXPECT_THAT(Outer(), StatusIs(absl::StatusCode::kNotFound,
                                ::testing::Eq("loading 'w': no such tensor")));
}

TEST(StatusMacros, AssignOrReturnPassesValuesAndErrors) {
  EXPECT_EQ(*Twice(21), 42);
  EXPECT_THAT(Twice(absl::AbortedError("stop")),
              StatusIs(absl::StatusCode::kAborted, HasSubstr("stop")));
}

TEST(CallTorch, TurnsC10ErrorIntoStatusWithoutBacktrace) {
  absl::Status status = CallTorch("checking", [] { TORCH_CHECK(false, "bad shape [2, 3]"); });
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInternal, HasSubstr("checking: ")));
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInternal, HasSubstr("bad shape [2, 3]")));
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInternal,
                               Not(HasSubstr("Exception raised from"))));
}

TEST(CallTorch, ClassifiesTimeoutsAndLostPeers) {
  EXPECT_THAT(CallTorch("recv", [] { throw std::runtime_error("Timed out waiting 1000ms"); }),
              StatusIs(absl::StatusCode::kDeadlineExceeded, HasSubstr("recv: Timed out")));
  EXPECT_THAT(
      CallTorch("recv", [] { throw std::runtime_error("Connection closed by peer [::1]"); }),
      StatusIs(absl::StatusCode::kUnavailable, HasSubstr("Connection closed")));
}

TEST(CallTorch, PassesValuesThrough) {
  absl::StatusOr<int> value = CallTorch("adding", [] { return 7; });
  EXPECT_EQ(*value, 7);
}

}  // namespace
}  // namespace fsdp
