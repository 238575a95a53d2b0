// The sharded checkpoint format's writers (sharded_format.h describes the format): one data
// file (safetensors' layout, block checksums computed as it is written, fsynced), and a whole
// checkpoint from whole tensors, offline, committed atomically (atomic_dir.h).
//
// Errors: INVALID_ARGUMENT for what the format cannot hold (duplicate keys, unsupported dtypes,
// ID-keyed optimizer state, positive-dimension values); INTERNAL for I/O.
#ifndef FSDP_CPP_CHECKPOINT_SHARDED_WRITER_H_
#define FSDP_CPP_CHECKPOINT_SHARDED_WRITER_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "checkpoint/sharded_metadata.h"
#include "optim_state/optim_state_dict.h"

namespace fsdp::checkpoint {

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

}  // namespace fsdp::checkpoint

#endif  // FSDP_CPP_CHECKPOINT_SHARDED_WRITER_H_
