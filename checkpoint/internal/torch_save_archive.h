// torch.save's zip archive written from C++, shared by the full checkpoint files (whole:
// full_checkpoint.h; streamed one FSDP unit at a time: save_full_checkpoint.h) and DCP's
// .distcp items (dcp_writer.h).
//
// The pickle (data.pkl) is LibTorch's pickler's without TorchScript type tags (PyTorch 2.x's
// torch.load(weights_only=True) refuses them); tensors appear in it as references to their
// storages. A value may hold placeholder tensors (shape, dtype and storage size, no memory): the
// pickle needs only their metadata, their bytes are handed to the ArchiveWriter later, record by
// record, so that a streaming writer never holds the whole archive. Bytes go to the file
// descriptor from the callers' memory, with no copy of the archive.
//
// Two record sets:
//  - kPickleSave, torch::pickle_save's: data/<i> for each storage, data.pkl, then version and
//    .data/serialization_id;
//  - kTorchSave, Python torch.save's (torch/serialization.py's _save), as DCP's
//    FileSystemWriter writes each item: data.pkl, .format_version, .storage_alignment, byteorder,
//    data/<i>, then the same end records.
//
// Preconditions: CPU tensors; storages written in the pickle's order, each once.
// Errors: INVALID_ARGUMENT for a value with no place in a torch.save file (a sharded tensor),
// naming `where`; INTERNAL naming the file with errno's text ("cannot create|write|fsync|close
// PATH"; the first failure is kept, LibTorch's writer never sees a short write) or LibTorch's
// exception text ("serializing PATH" / "writing PATH").
#ifndef FSDP_CPP_CHECKPOINT_INTERNAL_TORCH_SAVE_ARCHIVE_H_
#define FSDP_CPP_CHECKPOINT_INTERNAL_TORCH_SAVE_ARCHIVE_H_

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "optim_state/optim_state_dict.h"

namespace caffe2::serialize {
class PyTorchStreamWriter;
}  // namespace caffe2::serialize

namespace fsdp::checkpoint::internal {

// None, bool, int, float, str, tensor, tuple and list (of those) as IValues.
[[nodiscard]] absl::StatusOr<c10::IValue> StateValueToIValue(const optim_state::StateValue& value,
                                                             const std::string& where);

// A 1-D tensor of `numel` elements of `dtype` whose storage has the right size but no memory.
at::Tensor PlaceholderTensor(int64_t numel, at::ScalarType dtype);
bool IsPlaceholder(const at::Tensor& tensor);

// A value's pickle (data.pkl) and the tensors whose storages it names, in its order
// (storage i is record data/<i>; tensors sharing a storage name it once).
struct Pickled {
  std::vector<char> pickle;
  std::vector<at::Tensor> storages;
};
[[nodiscard]] absl::StatusOr<Pickled> PickleIValue(const c10::IValue& value,
                                                   const std::string& path);

// The bytes of storage `tensor` (its whole storage, as torch.save writes it).
const void* StorageData(const at::Tensor& tensor);
size_t StorageBytes(const at::Tensor& tensor);

enum class ArchiveRecords { kPickleSave, kTorchSave };

// One archive written record by record. The pickle is given first (kTorchSave writes it at once,
// kPickleSave after the storages).
class ArchiveWriter {
 public:
  // Creates or truncates `path`, which the writer owns. With `durable`, Finish fsyncs it, passing
  // the crash points "written <name>" and "fsynced <name>" (checkpoint/atomic_dir.h).
  static absl::StatusOr<std::unique_ptr<ArchiveWriter>> Create(const std::string& path,
                                                               ArchiveRecords records,
                                                               std::vector<char> pickle,
                                                               bool durable);
  // Appends to `fd` from its current position; the caller keeps `fd` (Finish neither syncs nor
  // closes it). `path` names the file in messages.
  static absl::StatusOr<std::unique_ptr<ArchiveWriter>> Append(int fd, const std::string& path,
                                                               ArchiveRecords records,
                                                               std::vector<char> pickle);
  ~ArchiveWriter();
  ArchiveWriter(const ArchiveWriter&) = delete;
  ArchiveWriter& operator=(const ArchiveWriter&) = delete;

  // Record data/<index>: `nbytes` bytes at `data`. After an error, later calls return it and
  // write nothing.
  absl::Status WriteStorage(size_t index, const void* data, size_t nbytes);
  // Marks the archive failed (a caller's error): later calls write nothing and return it.
  void Fail(absl::Status status);
  // The records still due and the zip directory; then, for a file the writer owns, fsync
  // (durable) and close. Returns the archive's length in bytes.
  absl::StatusOr<int64_t> Finish();

 private:
  ArchiveWriter(std::string path, int fd, bool owns_fd, bool durable, ArchiveRecords records,
                std::vector<char> pickle);
  static absl::StatusOr<std::unique_ptr<ArchiveWriter>> Start(
      std::unique_ptr<ArchiveWriter> writer);
  absl::Status Torch(const char* what, const std::function<void()>& fn);
  absl::Status CloseOwnedFile();

  const std::string path_;
  int fd_;
  const bool owns_fd_;
  const bool durable_;
  const ArchiveRecords records_;
  const std::vector<char> pickle_;
  int64_t written_ = 0;
  absl::Status io_;  // the first error
  std::unique_ptr<caffe2::serialize::PyTorchStreamWriter> zip_;
};

// The whole archive of `pickled` to a new file `path` with pickle_save's records, every
// storage's bytes taken from its tensor.
[[nodiscard]] absl::Status WriteArchive(const Pickled& pickled, const std::string& path,
                                        bool durable);
// The whole archive of `pickled` appended to `fd` (see ArchiveWriter::Append); its length.
[[nodiscard]] absl::StatusOr<int64_t> AppendArchive(int fd, const Pickled& pickled,
                                                    ArchiveRecords records,
                                                    const std::string& path);

}  // namespace fsdp::checkpoint::internal

#endif  // FSDP_CPP_CHECKPOINT_INTERNAL_TORCH_SAVE_ARCHIVE_H_
