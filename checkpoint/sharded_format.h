// The sharded checkpoint format (fsdp-cpp-sharded, version 1): its data model, the data files,
// metadata.json, and the offline readers (no process group) that the FSDP loader
// (sharded_checkpoint.h) and the ckpt tool build on.
//
// Directory layout:
//   DIR/metadata.json                 written last (by rank 0), describes everything
//   DIR/rank-<r>-of-<N>.safetensors   one data file per saving rank r of N
//
// A data file has safetensors' layout, so Python's `safetensors` can open it: an 8-byte
// little-endian header length H, a JSON header of H bytes (padded with spaces to a multiple of
// 8), then the raw little-endian bytes of its tensors end to end. The header is
//   {"<key>": {"dtype": "F32", "shape": [n], "data_offsets": [b, e]}, ...,
//    "__metadata__": {"format": "fsdp-cpp-sharded", "version": "1", "checkpoint_id": "<id>",
//                     "rank": "<r>", "world_size": "<N>"}}
// with offsets relative to the end of the header. Each stored tensor is a 1-D *piece*: elements
// [begin, end) of an original tensor flattened in row-major order. Keys are
// "model/<fqn>" (a parameter or buffer) and "optim/<fqn>/<state name>" (a positive-dimension
// optimizer state of a parameter); a file holds at most one piece of each key.
//
// metadata.json:
//   {"format": "fsdp-cpp-sharded", "version": 1, "kind": "sharded", "checkpoint_id": "<id>",
//    "world_size": N, "saved_with": {...informational: sharding strategy, use_orig_params,
//    units...}, "block_bytes": 1048576,
//    "files": [{"name": "rank-0-of-2.safetensors", "rank": 0, "size": <bytes>,
//               "header_bytes": 8 + H, "header_xxh64": "<16 hex>"}, ...],
//    "tensors": [{"key": "model/a.weight", "kind": "model", "fqn": "a.weight",
//                 "state": "" (optim: the state name), "shape": [4, 3], "dtype": "F32",
//                 "pieces": [{"file": 0, "begin": 0, "end": 6, "offset": <byte in file>,
//                             "bytes": 24, "xxh64": ["<16 hex>", ...]}, ...]}, ...],
//    "model_keys": [["a.weight", "a.weight"], ["tied.weight", "a.weight"], ...],
//    "optim": null | {"has_param_groups": true,
//        "state": [{"fqn": "a.weight", "values": [
//            {"name": "step", "value": {"type": "tensor", "dtype": "F32", "value": 3.0}},
//            {"name": "exp_avg", "tensor": "optim/a.weight/exp_avg"}, ...]}, ...],
//        "param_groups": [{"hyper_params": [{"name": "lr", "value": {"type": "float",
//                          "value": 0.01}}, ...], "params": ["a.weight", ...]}, ...]}}
//   * `model_keys` lists every key of the model's state dict in state_dict order with the
//     tensor that holds it (a parameter shared under several names is stored once).
//   * A piece's checksums are xxhash64 (seed 0) of consecutive `block_bytes`-sized blocks of its
//     bytes (the last block shorter), so that a reader that needs part of a piece reads and
//     verifies only the blocks it overlaps. A piece with "file": -1 holds zeros and has no
//     bytes (optimizer state of a range no saving rank held state for).
//   * The pieces of a tensor tile [0, numel) exactly (checked on reading).
//   * Non-tensor values (optimizer scalars, zero-dimension tensors such as Adam's `step`,
//     hyper-parameters) are JSON: {"type": "none"|"bool"|"int"|"float"|"str"|"tuple"|"list"|
//     "tensor", "value": ..., "dtype" (tensor)}; non-finite floats are the strings "nan",
//     "inf", "-inf".
//
// Errors of the readers (each message names the file and, where one is concerned, the tensor):
//   NOT_FOUND         metadata.json or a data file is missing;
//   INVALID_ARGUMENT  not this format (foreign JSON), unsupported version, a metadata.json
//                     whose contents are inconsistent (pieces that do not tile their tensor,
//                     out-of-range offsets, unknown dtypes, sizes that overflow);
//   DATA_LOSS         a data file shorter than metadata.json says (truncated), a damaged or
//                     foreign header (checksum / checkpoint id), a block whose xxhash differs
//                     (flipped bytes), metadata.json that is not valid JSON;
//   INTERNAL          a failing read (errno's text).
// Byte order: data is little-endian; this code assumes a little-endian host (x86-64, arm64).
// Sizes read from files are bounds-checked before anything is allocated: the reader allocates
// no more than the files' actual sizes (and what the caller asks for).
#ifndef FSDP_CPP_CHECKPOINT_SHARDED_FORMAT_H_
#define FSDP_CPP_CHECKPOINT_SHARDED_FORMAT_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <memory>
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

// metadata.json's text / parsing and validation (see the errors above; `where` names the file).
std::string MetadataToJson(const ShardedMetadata& metadata);
absl::StatusOr<ShardedMetadata> MetadataFromJson(absl::string_view text, const std::string& where);

// Before writing metadata.json: sorts each tensor's pieces, fills the ranges of optimizer
// tensors that no piece covers with zero pieces (file -1), and validates everything as
// MetadataFromJson does. Errors: INVALID_ARGUMENT (e.g. model pieces that do not tile).
[[nodiscard]] absl::Status FinalizeMetadata(ShardedMetadata& metadata);

// JSON encoding of a non-tensor state value (see above). Errors: INVALID_ARGUMENT for
// positive-dimension tensors and sharded values.
absl::StatusOr<std::string> StateValueToJson(const optim_state::StateValue& value);

// ------------------------------------------------------------------ writing a data file

struct PieceToWrite {
  std::string key;
  at::Tensor data;  // 1-D (any contiguity), the piece's elements
};

struct WrittenPiece {
  std::string key;
  int64_t offset = 0;
  int64_t bytes = 0;
  std::vector<uint64_t> block_xxh64;
};

struct WrittenFile {
  int64_t size = 0;
  int64_t header_bytes = 0;
  uint64_t header_xxh64 = 0;
  std::vector<WrittenPiece> pieces;  // in the order given
};

// Writes a data file (safetensors layout) at `path` and fsyncs it. Keys must be distinct.
// Errors: INVALID_ARGUMENT for duplicate keys / unsupported dtypes; INTERNAL for I/O.
[[nodiscard]] absl::StatusOr<WrittenFile> WriteDataFile(
    const std::string& path, const std::vector<PieceToWrite>& pieces,
    const std::map<std::string, std::string>& header_metadata, int64_t block_bytes);

// ------------------------------------------------------------------ reading

struct ReadStats {
  int64_t bytes_read = 0;       // every byte read: metadata.json, headers, data blocks
  int64_t data_bytes_read = 0;  // of which data blocks
  int64_t files_opened = 0;
};

// Reads a sharded checkpoint directory: metadata.json at Open, data files lazily (each file is
// checked on first use: size against metadata.json, header against its checksum and
// checkpoint id). Not thread-safe.
class ShardedCheckpointReader {
 public:
  // Reads and validates DIR/metadata.json.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<ShardedCheckpointReader>> Open(
      const std::string& dir);
  ~ShardedCheckpointReader();

  const ShardedMetadata& metadata() const { return metadata_; }
  const std::string& dir() const { return dir_; }
  const ReadStats& stats() const { return stats_; }

  // Elements [begin, end) of `tensor` (flattened) into `out`, a contiguous tensor of
  // end - begin elements of the tensor's dtype, reading (and verifying) only the checksum
  // blocks of pieces that overlap the range. Blocks the range covers whole are read straight
  // into `out` and verified there, so on an error `out` holds unverified bytes: a caller
  // keeps it only on success.
  [[nodiscard]] absl::Status ReadRange(const TensorRecord& tensor, int64_t begin, int64_t end,
                                       at::Tensor& out);
  // The whole tensor, with its shape.
  [[nodiscard]] absl::StatusOr<at::Tensor> ReadTensor(const TensorRecord& tensor);

  // One damaged range found by Verify.
  struct BadRange {
    std::string file;
    int64_t offset = 0;  // bytes in the file
    int64_t bytes = 0;
    std::string tensor;  // key ("" for a file-level problem)
    std::string problem;
  };
  // Reads every file and block and reports each problem (an empty list: all is well). Errors
  // only for what stops verification itself (e.g. an unreadable directory).
  [[nodiscard]] absl::StatusOr<std::vector<BadRange>> Verify();

 private:
  ShardedCheckpointReader() = default;
  [[nodiscard]] absl::Status OpenFile(int file);
  [[nodiscard]] absl::Status PRead(int file, int64_t offset, int64_t bytes, char* out);
  // A buffer of at least `bytes` for blocks read in part.
  char* Scratch(int64_t bytes);

  std::string dir_;
  ShardedMetadata metadata_;
  std::vector<int> fds_;       // -1 until opened
  std::vector<bool> checked_;  // file validated
  std::unique_ptr<char[]> scratch_;
  int64_t scratch_bytes_ = 0;
  ReadStats stats_;
};

// ------------------------------------------------------------------ whole checkpoints offline

// The model state dict (every key of model_keys, in order) and the FQN-keyed full optimizer
// state dict (as FSDP's full_optim_state_dict writes it) of a sharded checkpoint, read whole.
struct FullContents {
  std::vector<std::pair<std::string, at::Tensor>> model;
  bool has_optim = false;
  optim_state::OptimStateDict optim;
};
[[nodiscard]] absl::StatusOr<FullContents> ReadFullContents(ShardedCheckpointReader& reader);

// Writes a sharded checkpoint of `world_size` data files from whole tensors, offline, into
// `dir` atomically (atomic_dir.h): each tensor (model tensors, then optimizer positive-dimension
// states, in order) is split into `world_size` even element ranges (the first numel % M parts one
// element longer), range r going to rank r's file. A shared tensor is stored once if the same
// at::Tensor appears under several keys. `optim` must be FQN-keyed (full_optim_state_dict's
// form); null for none. This is not the layout an M-rank FULL_SHARD job writes (which follows
// its flat parameters), but any job loads it all the same.
[[nodiscard]] absl::Status WriteShardedFromFull(
    const std::string& dir, const std::vector<std::pair<std::string, at::Tensor>>& model,
    const optim_state::OptimStateDict* optim, int world_size,
    int64_t block_bytes = kDefaultBlockBytes);

// ------------------------------------------------------------------ kinds

enum class CheckpointKind { kFull, kSharded };
// "full" / "sharded".
absl::string_view CheckpointKindName(CheckpointKind kind);

// Which kind of checkpoint DIR holds: kSharded if DIR/metadata.json names this format, kFull if
// DIR/model.pt exists (and no metadata.json). Errors: NOT_FOUND (no such directory, or neither
// file), INVALID_ARGUMENT (a metadata.json of another format).
[[nodiscard]] absl::StatusOr<CheckpointKind> DetectCheckpointKind(const std::string& dir);

}  // namespace fsdp::checkpoint

#endif  // FSDP_CPP_CHECKPOINT_SHARDED_FORMAT_H_
