// Small helpers the sharded format's targets share (sharded_metadata, sharded_metadata_json,
// sharded_reader, sharded_writer, sharded_format): a path in a directory, a dtype's element
// size, and an element or byte range as text for messages. No errors.
#ifndef FSDP_CPP_CHECKPOINT_INTERNAL_SHARDED_HELPERS_H_
#define FSDP_CPP_CHECKPOINT_INTERNAL_SHARDED_HELPERS_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

#include "absl/strings/str_cat.h"

namespace fsdp::checkpoint {

inline std::string JoinPath(const std::string& dir, const std::string& name) {
  return absl::StrCat(dir, "/", name);
}

inline int64_t ElementSize(at::ScalarType t) { return static_cast<int64_t>(c10::elementSize(t)); }

// "[b, e)".
inline std::string RangeText(int64_t b, int64_t e) { return absl::StrCat("[", b, ", ", e, ")"); }

}  // namespace fsdp::checkpoint

#endif  // FSDP_CPP_CHECKPOINT_INTERNAL_SHARDED_HELPERS_H_
