// Checks the checkpoint readers' fuzz targets share. No errors: each returns what is wrong.
#ifndef FSDP_CPP_CHECKPOINT_FUZZ_FUZZ_CHECKS_H_
#define FSDP_CPP_CHECKPOINT_FUZZ_FUZZ_CHECKS_H_

#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace fsdp::checkpoint::fuzz {

// What is wrong with a metadata reader's refusal of an input, or nullopt: it must be
// INVALID_ARGUMENT or DATA_LOSS, and its message must name `where` (the file).
inline std::optional<std::string> BadRefusal(const absl::Status& s, absl::string_view where) {
  if (s.code() != absl::StatusCode::kInvalidArgument && s.code() != absl::StatusCode::kDataLoss) {
    return "error of an unexpected code: " + s.ToString();
  }
  if (s.message().find(where) == absl::string_view::npos) {
    return "error without the file's name: " + s.ToString();
  }
  return std::nullopt;
}

}  // namespace fsdp::checkpoint::fuzz

#endif  // FSDP_CPP_CHECKPOINT_FUZZ_FUZZ_CHECKS_H_
