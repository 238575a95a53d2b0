// Writes torch.distributed.checkpoint (DCP) directories as PyTorch 2.13's FileSystemWriter
// (dcp.save) does, so that dcp.load, FileSystemReader and format_utils.dcp_to_torch_save read
// them (and our DcpReader, dcp_reader.h):
//
//   * `__<rank>_0.distcp`: one file per writing rank (single_file_per_rank, one thread): its
//     bytes entries first, then its tensor chunks, each item a torch.save archive with Python
//     torch.save's records (data.pkl, .format_version, .storage_alignment, byteorder, data/0,
//     version, .data/serialization_id); a chunk's storage holds exactly its elements, as
//     FileSystemWriter's loader clones views. Bytes entries are torch.save files of the value
//     (DCP's planner torch.save's non-tensor values). The file is fsynced.
//   * `.metadata`: a pickle of DCP's dataclasses (Metadata, TensorStorageMetadata,
//     TensorProperties, ChunkStorageMetadata, BytesStorageMetadata, MetadataIndex,
//     _StorageInfo without its transform_descriptors, StorageMeta), naming only globals that
//     dcp_metadata.h's allow-list holds: what we write our reader reads, as does PyTorch.
//
// Items are written straight from the caller's tensors (views of a flat shard included: a
// chunk's archive is streamed from its memory, no copy unless it is not contiguous).
//
// Errors (each names the file and the item):
//   INVALID_ARGUMENT  a chunk on another device than the CPU, a bytes value with no place in a
//                     torch.save file, a dtype .metadata cannot name; PickleMetadata on a
//                     Metadata that ValidateMetadata refuses.
//   INTERNAL          a file cannot be created, written (e.g. the disk is full or RLIMIT_FSIZE
//                     is reached), fsynced or closed: "cannot write DIR/__1_0.distcp: ...".
#ifndef FSDP_CPP_CHECKPOINT_DCP_WRITER_H_
#define FSDP_CPP_CHECKPOINT_DCP_WRITER_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "checkpoint/dcp_metadata.h"
#include "optim_state/optim_state_dict.h"

namespace fsdp::checkpoint::dcp {

// The box [offsets, offsets + data.sizes()) of tensor `fqn`.
struct ChunkToWrite {
  std::string fqn;
  std::vector<int64_t> size;  // the tensor's global shape
  std::vector<int64_t> offsets;
  at::Tensor data;  // CPU; its shape is the chunk's sizes
};

// A non-tensor value stored as bytes (torch.save of the value).
struct BytesToWrite {
  std::string fqn;
  optim_state::StateValue value;
};

// Where an item went (.metadata's storage_data entry) and, for a chunk, what it holds.
struct WrittenItem {
  MetadataIndex index;  // offset: the chunk's offsets; none for bytes
  StorageInfo storage;
  at::ScalarType dtype = at::kFloat;  // chunks only
  std::vector<int64_t> size;          // chunks only: the tensor's global shape
  std::vector<int64_t> sizes;         // chunks only: the chunk's
};

// FileSystemWriter's name of rank `rank`'s n-th file, "__<rank>_<n>.distcp".
std::string DistcpFileName(int rank, int n = 0);

// Writes DIR/`name` (created or truncated): `bytes` then `chunks`, in order, then fsyncs it.
// Returns the items in the order written.
[[nodiscard]] absl::StatusOr<std::vector<WrittenItem>> WriteDistcpFile(
    const std::string& dir, const std::string& name, const std::vector<BytesToWrite>& bytes,
    const std::vector<ChunkToWrite>& chunks);

// The Metadata of a checkpoint whose files hold `items` (every writer's, in rank order; a
// tensor's chunks listed in that order), with `planner_data` and `checkpoint_id`, validated
// (ValidateMetadata). INVALID_ARGUMENT naming the FQN when two items disagree on a tensor's
// dtype or size, or an FQN is both a tensor and bytes.
[[nodiscard]] absl::StatusOr<Metadata> AssembleMetadata(
    const std::vector<WrittenItem>& items,
    std::map<std::string, std::vector<PathElement>> planner_data, const std::string& checkpoint_id);

// The .metadata pickle of `metadata` (validated first; `file` names it in messages).
[[nodiscard]] absl::StatusOr<std::string> PickleMetadata(const Metadata& metadata,
                                                         const std::string& file);

// DIR/.metadata, written and fsynced; its size.
[[nodiscard]] absl::StatusOr<int64_t> WriteMetadataFile(const std::string& dir,
                                                        const Metadata& metadata);

// A whole DCP directory from whole tensors and values, by one process (e.g. a full checkpoint
// converted offline), laid out as `files` ranks of an FSDP job would save it: file r holds the
// r-th of `files` even flat pieces of every tensor (FSDP's split: ceil(numel / files) elements
// each), as the fewest boxes (FlatRangeToBoxes); zero-dimension and empty tensors and every
// bytes entry go to file 0. Committed atomically (atomic_dir.h: DIR is the old or the new
// checkpoint after a crash). `planner_data` maps each FQN to its path in the nested state
// dict. The parent of DIR must exist; INVALID_ARGUMENT for files < 1.
struct WholeEntries {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  std::vector<BytesToWrite> bytes;
  std::map<std::string, std::vector<PathElement>> planner_data;
};
[[nodiscard]] absl::Status WriteWholeDcpCheckpoint(const std::string& dir,
                                                   const WholeEntries& entries, int files = 1);

// Text of the CPU dtype as .metadata names it ("torch.float32"), or INVALID_ARGUMENT.
[[nodiscard]] absl::StatusOr<std::string> DtypeGlobal(at::ScalarType dtype);

}  // namespace fsdp::checkpoint::dcp

#endif  // FSDP_CPP_CHECKPOINT_DCP_WRITER_H_
