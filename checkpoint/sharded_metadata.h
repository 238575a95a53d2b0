// The sharded checkpoint format's data model (sharded_format.h describes the format): what
// metadata.json records of the data files, the tensors and their pieces, the model's keys and
// the optimizer's state, with the checks every reader and writer applies to it (pieces tile
// their tensor, offsets lie inside their file's data, pieces do not overlap, references
// resolve), and the names the data files give dtypes.
//
// Errors: INVALID_ARGUMENT, with `where` (the file, or what is being saved) and the tensor,
// piece or file concerned, for metadata that breaks a check; unknown dtypes.
#ifndef FSDP_CPP_CHECKPOINT_SHARDED_METADATA_H_
#define FSDP_CPP_CHECKPOINT_SHARDED_METADATA_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "optim_state/optim_state_dict.h"

namespace fsdp::checkpoint {

inline constexpr absl::string_view kShardedFormatName = "fsdp-cpp-sharded";
inline constexpr int kShardedFormatVersion = 1;
inline constexpr int64_t kDefaultBlockBytes = int64_t{1} << 20;

// "rank-<r>-of-<n>.safetensors".
std::string DataFileName(int rank, int world_size);

// safetensors' dtype names: F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL.
absl::StatusOr<std::string> SafetensorsDtype(at::ScalarType type);
absl::StatusOr<at::ScalarType> ScalarTypeFromSafetensors(absl::string_view name);

uint64_t Xxh64(const void* data, size_t bytes);

struct PieceRecord {
  int file = -1;  // index into ShardedMetadata::files; -1: zeros, no bytes
  int64_t begin = 0;
  int64_t end = 0;     // elements [begin, end) of the flattened tensor
  int64_t offset = 0;  // first byte in the file
  int64_t bytes = 0;
  std::vector<uint64_t> block_xxh64;
};

struct TensorRecord {
  std::string key;  // "model/<fqn>" or "optim/<fqn>/<state>"
  bool is_optim = false;
  std::string fqn;
  std::string state;  // optimizer state name ("" for model tensors)
  std::vector<int64_t> shape;
  at::ScalarType dtype = at::kFloat;
  std::vector<PieceRecord> pieces;  // sorted by begin, tiling [0, numel())

  int64_t numel() const;
};

struct FileRecord {
  std::string name;
  int rank = 0;
  int64_t size = 0;
  int64_t header_bytes = 0;  // 8 + header length
  uint64_t header_xxh64 = 0;
};

// One state value of one parameter in the optimizer part: a non-tensor (or zero-dimension
// tensor) value, or a reference to a stored tensor.
struct OptimValueRecord {
  std::string name;
  bool is_tensor = false;
  optim_state::StateValue value;  // !is_tensor
  std::string tensor_key;         // is_tensor
};

struct OptimParamRecord {
  std::string fqn;
  std::vector<OptimValueRecord> values;
};

struct OptimRecord {
  std::vector<OptimParamRecord> state;
  std::vector<optim_state::ParamGroup> param_groups;  // FQN keys
  bool has_param_groups = true;
};

struct ShardedMetadata {
  std::string checkpoint_id;
  int world_size = 1;
  std::map<std::string, std::string> saved_with;
  // The saving program's own entries (e.g. examples/train's "steps_done"), committed atomically
  // with the checkpoint; metadata.json's "user_metadata" object (optional, string values).
  std::map<std::string, std::string> user_metadata;
  int64_t block_bytes = kDefaultBlockBytes;
  std::vector<FileRecord> files;
  std::vector<TensorRecord> tensors;
  // Every key of the model's state dict, in state_dict order, with the FQN of the model tensor
  // ("model/<fqn>") that holds its value.
  std::vector<std::pair<std::string, std::string>> model_keys;
  bool has_optim = false;
  OptimRecord optim;

  // Null if absent.
  const TensorRecord* FindTensor(const std::string& key) const;
};

// Every check a reader applies to metadata.json's contents (see above); `where` opens each
// message.
[[nodiscard]] absl::Status ValidateMetadata(const ShardedMetadata& metadata,
                                            const std::string& where);

// Before writing metadata.json: sorts each tensor's pieces, fills the ranges of optimizer
// tensors that no piece covers with zero pieces (file -1), and validates everything as
// MetadataFromJson does. Errors: INVALID_ARGUMENT (e.g. model pieces that do not tile).
[[nodiscard]] absl::Status FinalizeMetadata(ShardedMetadata& metadata);

}  // namespace fsdp::checkpoint

#endif  // FSDP_CPP_CHECKPOINT_SHARDED_METADATA_H_
