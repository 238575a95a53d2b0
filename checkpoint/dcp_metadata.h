// The `.metadata` file of a torch.distributed.checkpoint (DCP) directory as a C++ data model,
// with PyTorch 2.13's names (torch/distributed/checkpoint/metadata.py, filesystem.py): which
// entries the checkpoint holds (tensors as chunks of a global shape, or bytes), where each
// chunk's or entry's bytes are (file, offset, length), and how the flattened keys map back to
// the nested state dict.
//
// `.metadata` is a Python pickle of DCP's dataclasses. ParseMetadata reads it with the pickle
// machine (pickle.h), executing nothing, with an allow-list of exactly the globals PyTorch
// 2.13's dcp.save writes (AllowedMetadataGlobals: the metadata dataclasses and enum,
// filesystem's _StorageInfo, torch.Size, the dtypes, torch.serialization._get_layout for the
// layout, pathlib.PosixPath for the checkpoint id); any other global is refused by name.
//
// Then ValidateMetadata checks what a reader relies on: every chunk lies within its tensor's
// size, the chunks of a tensor neither overlap nor leave a gap, the element count fits in
// 64 bits; every storage entry names an entry of state_dict_metadata (a tensor's by one of its
// chunk offsets), a plain file name inside the directory and a non-negative offset and length
// whose end fits in 64 bits; every chunk and every bytes entry has its storage entry, a
// chunk's at least as long as the chunk's data (unless stream-transformed), so that what a
// reader allocates is bounded by the files' sizes.
// It cannot check the files themselves (DCP writes no checksums): dcp_reader.h does what can be
// done there.
//
// Errors (every message names the file, and the FQN or the global concerned):
//   NOT_FOUND / PERMISSION_DENIED / UNKNOWN  (ReadMetadataFile) the file cannot be read.
//   INVALID_ARGUMENT  "refusing to load global module.name from FILE ..." for a global outside
//                     the allow-list; a pickle opcode or structure dcp.save does not write
//                     (wrong arguments to a global, a field of the wrong type, a dtype not
//                     among the allowed); any check of ValidateMetadata failing.
//   DATA_LOSS         the pickle ends early.
#ifndef FSDP_CPP_CHECKPOINT_DCP_METADATA_H_
#define FSDP_CPP_CHECKPOINT_DCP_METADATA_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace fsdp::checkpoint::dcp {

// The metadata file's name inside a DCP directory.
inline constexpr char kMetadataFileName[] = ".metadata";

// metadata.py's _MEM_FORMAT_ENCODING.
enum class MemoryFormat { kContiguous = 0, kChannelsLast = 1, kPreserve = 2 };

struct TensorProperties {
  at::ScalarType dtype = at::kFloat;
  // The deprecated fields, kept as written.
  std::string layout = "torch.strided";
  bool requires_grad = false;
  MemoryFormat memory_format = MemoryFormat::kContiguous;
  bool pin_memory = false;
};

// One saved piece of a tensor: the box [offsets, offsets + sizes) of its global shape.
struct ChunkStorageMetadata {
  std::vector<int64_t> offsets;
  std::vector<int64_t> sizes;
};

struct TensorStorageMetadata {
  TensorProperties properties;
  std::vector<int64_t> size;  // the global shape
  std::vector<ChunkStorageMetadata> chunks;
};

// A non-tensor value, stored as bytes (dcp.save's default planner torch.save's the object).
struct BytesStorageMetadata {};

using StorageMetadata = std::variant<TensorStorageMetadata, BytesStorageMetadata>;

// The key of a storage entry. As in Python, entries are told apart by fqn and offset; `index`
// is a hint only and not compared.
struct MetadataIndex {
  std::string fqn;
  std::optional<std::vector<int64_t>> offset;  // a chunk's offsets; none for bytes
  std::optional<int64_t> index;

  bool operator<(const MetadataIndex& o) const {
    return fqn != o.fqn ? fqn < o.fqn : offset < o.offset;
  }
};

// filesystem.py's _StorageInfo: where an entry's bytes are.
struct StorageInfo {
  std::string relative_path;  // a file in the checkpoint directory
  int64_t offset = 0;
  int64_t length = 0;
  // Stream transforms of FileSystemWriter's _extensions (none by default).
  std::vector<std::string> transform_descriptors;
};

struct StorageMeta {
  std::optional<std::string> checkpoint_id;  // a str or a pathlib path, as text
  std::optional<std::string> save_id;
  std::optional<std::string> load_id;
  std::vector<std::string> modules;
};

// One step of planner_data's path from the nested state dict's root to a flattened entry: a
// dict key or a list index.
using PathElement = std::variant<std::string, int64_t>;

struct Metadata {
  std::map<std::string, StorageMetadata> state_dict_metadata;  // by FQN
  std::map<MetadataIndex, StorageInfo> storage_data;
  std::map<std::string, std::vector<PathElement>> planner_data;  // empty when None
  std::optional<StorageMeta> storage_meta;
  std::optional<std::string> version;

  // The entry of `fqn`, or null.
  const StorageMetadata* Find(const std::string& fqn) const;
  // The storage of `fqn`'s chunk at `offsets` (nullopt: a bytes entry), or null.
  const StorageInfo* FindStorage(const std::string& fqn,
                                 const std::optional<std::vector<int64_t>>& offsets) const;
};

// Parses a .metadata pickle and validates it (ValidateMetadata); `file` names it in messages.
absl::StatusOr<Metadata> ParseMetadata(std::string_view pickle, const std::string& file);

// Reads and parses the file at `path`.
absl::StatusOr<Metadata> ReadMetadataFile(const std::string& path);

// The checks listed at the top; INVALID_ARGUMENT naming `file` and the FQN.
absl::Status ValidateMetadata(const Metadata& metadata, const std::string& file);

// The globals ParseMetadata accepts, "module.name", sorted.
std::vector<std::string> AllowedMetadataGlobals();

// Python's repr of a torch.Size-like tuple, "(3, 0)", for messages.
std::string ShapeString(const std::vector<int64_t>& shape);

}  // namespace fsdp::checkpoint::dcp

#endif  // FSDP_CPP_CHECKPOINT_DCP_METADATA_H_
