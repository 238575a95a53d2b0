// A status rank 0 decided, carried to every rank as the string BroadcastObject sends: the code
// and message survive the trip, so that every rank returns the same error (full checkpoints'
// reads on rank 0, fsdp's staged full state-dict load).
// Errors: none of its own (a string that is not an encoded status decodes as INTERNAL).
#ifndef FSDP_CPP_COMM_RANK0_STATUS_H_
#define FSDP_CPP_COMM_RANK0_STATUS_H_

#include <string>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace fsdp::comm {

// "" for OK, else "<code>:<message>".
inline std::string EncodeStatus(const absl::Status& status) {
  if (status.ok()) return "";
  return absl::StrCat(static_cast<int>(status.code()), ":", status.message());
}

// The status EncodeStatus encoded, its message prefixed "<context>: rank 0: ".
inline absl::Status DecodeStatus(const std::string& encoded, absl::string_view context) {
  if (encoded.empty()) return absl::OkStatus();
  const size_t colon = encoded.find(':');
  int code = static_cast<int>(absl::StatusCode::kInternal);
  if (colon == std::string::npos || !absl::SimpleAtoi(encoded.substr(0, colon), &code) ||
      code <= 0 || code > static_cast<int>(absl::StatusCode::kUnauthenticated)) {
    code = static_cast<int>(absl::StatusCode::kInternal);
  }
  const std::string message = colon == std::string::npos ? encoded : encoded.substr(colon + 1);
  return absl::Status(static_cast<absl::StatusCode>(code),
                      absl::StrCat(context, ": rank 0: ", message));
}

}  // namespace fsdp::comm

#endif  // FSDP_CPP_COMM_RANK0_STATUS_H_
