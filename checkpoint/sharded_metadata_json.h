// metadata.json of the sharded checkpoint format (sharded_format.h shows its schema): the text
// of a ShardedMetadata, and the parsing and validation of one read from a file, and the JSON of
// non-tensor state values.
//
// Errors of MetadataFromJson (each message opens with `where`, the file): DATA_LOSS, not valid
// JSON; INVALID_ARGUMENT, another format (no "format": "fsdp-cpp-sharded"), an unsupported
// version, a missing or mistyped field, or contents that fail ValidateMetadata.
#ifndef FSDP_CPP_CHECKPOINT_SHARDED_METADATA_JSON_H_
#define FSDP_CPP_CHECKPOINT_SHARDED_METADATA_JSON_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "checkpoint/sharded_metadata.h"
#include "optim_state/optim_state_dict.h"

namespace fsdp::checkpoint {

// metadata.json's text / parsing and validation (see the errors above; `where` names the file).
std::string MetadataToJson(const ShardedMetadata& metadata);
absl::StatusOr<ShardedMetadata> MetadataFromJson(absl::string_view text, const std::string& where);

// JSON encoding of a non-tensor state value (see above). Errors: INVALID_ARGUMENT for
// positive-dimension tensors and sharded values.
absl::StatusOr<std::string> StateValueToJson(const optim_state::StateValue& value);

}  // namespace fsdp::checkpoint

#endif  // FSDP_CPP_CHECKPOINT_SHARDED_METADATA_JSON_H_
