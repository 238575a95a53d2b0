// The sharded checkpoint format's reader (sharded_format.h describes the format), offline (no
// process group): metadata.json at Open, the data files lazily, each checked on first use (size
// against metadata.json, header against its checksum and checkpoint id), every block read
// verified against its xxhash64; and a whole checkpoint read into a model and an optimizer
// state dict.
//
// Errors (each message names the file and, where one is concerned, the tensor): NOT_FOUND,
// metadata.json or a data file is missing; INVALID_ARGUMENT, metadata.json of another format
// or inconsistent, a range out of bounds; DATA_LOSS, a truncated or foreign data file, a block
// whose checksum differs; INTERNAL, a failing read.
#ifndef FSDP_CPP_CHECKPOINT_SHARDED_READER_H_
#define FSDP_CPP_CHECKPOINT_SHARDED_READER_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "checkpoint/sharded_metadata.h"
#include "optim_state/optim_state_dict.h"

namespace fsdp::checkpoint {

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

// The model state dict (every key of model_keys, in order) and the FQN-keyed full optimizer
// state dict (as FSDP's full_optim_state_dict writes it) of a sharded checkpoint, read whole.
struct FullContents {
  std::vector<std::pair<std::string, at::Tensor>> model;
  bool has_optim = false;
  optim_state::OptimStateDict optim;
};
[[nodiscard]] absl::StatusOr<FullContents> ReadFullContents(ShardedCheckpointReader& reader);

}  // namespace fsdp::checkpoint

#endif  // FSDP_CPP_CHECKPOINT_SHARDED_READER_H_
