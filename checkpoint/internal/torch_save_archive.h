// torch.save's zip archive written from C++, shared by the full checkpoint files
// (full_checkpoint.h) and DCP's .distcp items (dcp_writer.h): a value converted to an IValue,
// pickled by LibTorch's pickler without TorchScript type tags (PyTorch 2.x's
// torch.load(weights_only=True) refuses them), and the archive streamed to a file descriptor
// from the tensors' own memory, with no copy of the whole archive.
//
// Two record sets: torch::pickle_save's (data.pkl, data/<n>, version, .data/serialization_id)
// and Python torch.save's, which adds .format_version, .storage_alignment and byteorder after
// data.pkl, in that order (torch/serialization.py's _save), as DCP's FileSystemWriter writes
// each item.
//
// Errors: INVALID_ARGUMENT for a value with no place in a torch.save file (a sharded tensor),
// naming `where`; INTERNAL naming the path and errno's text when a write fails (the first
// failure is kept; LibTorch's writer never sees a short write).
#ifndef FSDP_CPP_CHECKPOINT_INTERNAL_TORCH_SAVE_ARCHIVE_H_
#define FSDP_CPP_CHECKPOINT_INTERNAL_TORCH_SAVE_ARCHIVE_H_

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "optim_state/optim_state_dict.h"

namespace fsdp::checkpoint::internal {

// None, bool, int, float, str, tensor, tuple and list (of those) as IValues.
[[nodiscard]] absl::StatusOr<c10::IValue> StateValueToIValue(const optim_state::StateValue& value,
                                                             const std::string& where);

// A value pickled (data.pkl; tensors appear in it as references to their storages).
struct Pickled {
  std::vector<char> pickle;
  std::vector<at::Tensor> storages;  // in the order data.pkl names them
};

[[nodiscard]] absl::StatusOr<Pickled> PickleIValue(const c10::IValue& value,
                                                   const std::string& path);

enum class ArchiveRecords { kPickleSave, kTorchSave };

// Writes the archive of `pickled` to `fd` from its current position; returns its length.
// `path` names the file in messages.
[[nodiscard]] absl::StatusOr<int64_t> AppendArchive(int fd, const Pickled& pickled,
                                                    ArchiveRecords records,
                                                    const std::string& path);

}  // namespace fsdp::checkpoint::internal

#endif  // FSDP_CPP_CHECKPOINT_INTERNAL_TORCH_SAVE_ARCHIVE_H_
