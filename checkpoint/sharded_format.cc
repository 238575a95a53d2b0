// See sharded_format.h: the kinds of checkpoint directory. The format itself is implemented by
// sharded_metadata, sharded_metadata_json, sharded_reader and sharded_writer.
#include "checkpoint/sharded_format.h"

#include <sys/stat.h>

#include <fstream>

#include "absl/strings/str_cat.h"
#include "checkpoint/internal/sharded_helpers.h"

namespace fsdp::checkpoint {

absl::string_view CheckpointKindName(CheckpointKind kind) {
  switch (kind) {
    case CheckpointKind::kFull:
      return "full";
    case CheckpointKind::kSharded:
      return "sharded";
    case CheckpointKind::kDcp:
      return "dcp";
  }
  return "unknown";
}

absl::StatusOr<CheckpointKind> DetectCheckpointKind(const std::string& dir) {
  struct stat st;
  if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::NotFoundError(absl::StrCat(dir, ": no such checkpoint directory"));
  }
  if (stat(JoinPath(dir, ".metadata").c_str(), &st) == 0) return CheckpointKind::kDcp;
  const std::string metadata = JoinPath(dir, "metadata.json");
  if (stat(metadata.c_str(), &st) == 0) {
    std::ifstream in(metadata, std::ios::binary);
    std::string head(4096, '\0');
    in.read(head.data(), static_cast<std::streamsize>(head.size()));
    head.resize(static_cast<size_t>(in.gcount()));
    if (head.find(absl::StrCat("\"format\": \"", kShardedFormatName, "\"")) == std::string::npos &&
        head.find(absl::StrCat("\"format\":\"", kShardedFormatName, "\"")) == std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat(metadata, ": not an ", kShardedFormatName, " checkpoint"));
    }
    return CheckpointKind::kSharded;
  }
  if (stat(JoinPath(dir, "model.pt").c_str(), &st) == 0) return CheckpointKind::kFull;
  return absl::NotFoundError(absl::StrCat(
      dir,
      ": neither a sharded checkpoint (metadata.json or DCP's .metadata) nor a full one "
      "(model.pt)"));
}

}  // namespace fsdp::checkpoint
