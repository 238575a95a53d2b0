#include "comm/status_macros.h"

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"

namespace fsdp {

absl::Status Annotate(const absl::Status& status, absl::string_view context) {
  if (status.ok() || context.empty()) return status;
  return absl::Status(status.code(), absl::StrCat(context, ": ", status.message()));
}

absl::Status StatusFromException(const std::exception& e, absl::string_view context) {
  // c10::Error::what() carries a C++ backtrace after the message; keep the first line(s)
  // that a person reads, drop the "Exception raised from ..." tail.
  std::string message = e.what();
  if (size_t pos = message.find("\nException raised from"); pos != std::string::npos) {
    message.resize(pos);
  }
  while (!message.empty() && absl::ascii_isspace(message.back())) message.pop_back();
  const std::string lower = absl::AsciiStrToLower(message);
  absl::StatusCode code = absl::StatusCode::kInternal;
  if (absl::StrContains(lower, "timed out") || absl::StrContains(lower, "timeout")) {
    code = absl::StatusCode::kDeadlineExceeded;
  } else if (absl::StrContains(lower, "connection") || absl::StrContains(lower, "closed") ||
             absl::StrContains(lower, "reset by peer") ||
             absl::StrContains(lower, "broken pipe")) {
    code = absl::StatusCode::kUnavailable;
  }
  return absl::Status(code, context.empty() ? message : absl::StrCat(context, ": ", message));
}

}  // namespace fsdp
