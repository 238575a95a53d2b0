// Reads a torch.distributed.checkpoint (DCP) directory written by PyTorch's FileSystemWriter
// (dcp.save): `.metadata` (dcp_metadata.h) and the `.distcp` files it names. Offline, no
// process group; what a loading rank builds on.
//
// A tensor entry is saved as chunks (boxes of its global shape), each stored as one
// torch.save archive at an offset of a .distcp file (FileSystemWriter's default
// serialization, TORCH_SAVE). ReadTensorRegion returns any box of the tensor, assembled from
// the chunks that overlap it; it reads only those chunks' archives, and of each only what
// torch.save's reader needs (the zip directory, the pickle, the storage), with pread. A bytes
// entry (a non-tensor value: dcp.save torch.save's the object) is returned as its stored
// bytes, or decoded into a PyValue by the torch.save reader (torch_load.h).
//
// What it can detect: DCP writes no checksums, so only what the structure shows: a missing
// .distcp file, one shorter than the entries .metadata places in it (checked at Open), an
// archive that is not a well-formed torch.save file (the zip reader checks its directory and
// each entry's CRC-32, which torch.save does write), a chunk whose dtype or shape differs from
// .metadata's. Bytes changed inside a tensor's data with the CRC-32 rewritten, or a file
// swapped for another checkpoint's file of the same layout, go unnoticed.
//
// Errors (each message names the file and the FQN; nothing is returned on an error):
//   NOT_FOUND         .metadata or a .distcp file it names is missing; an FQN that is not in
//                     the checkpoint.
//   INVALID_ARGUMENT  .metadata refused (dcp_metadata.h); a region outside the tensor or of
//                     another number of dimensions; a tensor read as bytes or the reverse; an
//                     entry with stream transforms (FileSystemWriter's _extensions); an archive
//                     that is not torch.save's format (e.g. FileSystemWriter's SAFETENSORS).
//   DATA_LOSS         a truncated .distcp; a damaged archive; a chunk whose dtype or shape is
//                     not what .metadata says.
//   PERMISSION_DENIED / UNKNOWN  a file cannot be opened or read.
#ifndef FSDP_CPP_CHECKPOINT_DCP_READER_H_
#define FSDP_CPP_CHECKPOINT_DCP_READER_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "checkpoint/dcp_metadata.h"
#include "checkpoint/py_value.h"

namespace fsdp::checkpoint {
class Source;
}

namespace fsdp::checkpoint::dcp {

struct DcpReadStats {
  int64_t bytes_read = 0;  // bytes of .distcp files read (not .metadata)
  int64_t items_read = 0;  // stored items (chunks, bytes entries) read
};

// Not thread-safe.
class DcpReader {
 public:
  // Reads and validates DIR/.metadata; checks that every .distcp file it names exists and is
  // long enough for the entries it holds. Opens no data file yet.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<DcpReader>> Open(const std::string& dir);
  ~DcpReader();

  const Metadata& metadata() const { return metadata_; }
  const std::string& dir() const { return dir_; }
  const DcpReadStats& stats() const { return stats_; }

  // The box [offsets, offsets + sizes) of tensor `fqn` (offsets and sizes with one value per
  // dimension; both empty for a scalar), a contiguous tensor of the saved dtype.
  [[nodiscard]] absl::StatusOr<at::Tensor> ReadTensorRegion(const std::string& fqn,
                                                            const std::vector<int64_t>& offsets,
                                                            const std::vector<int64_t>& sizes);
  // The whole tensor.
  [[nodiscard]] absl::StatusOr<at::Tensor> ReadTensor(const std::string& fqn);

  // A bytes entry's stored bytes, as FileSystemReader hands them to the planner.
  [[nodiscard]] absl::StatusOr<std::string> ReadBytes(const std::string& fqn);
  // A bytes entry decoded as the torch.save file dcp.save's planner made of the value.
  [[nodiscard]] absl::StatusOr<PyValue> ReadObject(const std::string& fqn);

 private:
  DcpReader() = default;
  absl::Status CheckFiles();
  // The open file of a stored item (`name` for messages), its bounds checked again.
  absl::StatusOr<const Source*> ItemFile(const StorageInfo& s, const std::string& name);
  absl::StatusOr<const StorageInfo*> BytesStorage(const std::string& fqn) const;
  absl::StatusOr<at::Tensor> ReadChunk(const std::string& fqn, const TensorStorageMetadata& t,
                                       const ChunkStorageMetadata& chunk);

  std::string dir_;
  Metadata metadata_;
  std::map<std::string, std::unique_ptr<Source>> files_;  // opened on first use
  DcpReadStats stats_;
};

}  // namespace fsdp::checkpoint::dcp

#endif  // FSDP_CPP_CHECKPOINT_DCP_READER_H_
