// torch.save's zip archive as LibTorch's torch::pickle_save lays it out ("archive/data/<i>" for
// each storage in the pickle's order, then "archive/data.pkl", then the version records), written
// record by record to a file, so that a writer can hand over each storage's bytes when it has
// them (a full checkpoint streamed one FSDP unit at a time) and never holds the whole archive.
// The pickle is torch::jit::Pickler's without TorchScript's type tags (which PyTorch 2.x's
// torch.load(weights_only=True) refuses). A value may hold placeholder tensors (shape, dtype and
// storage size, no memory): the pickle only needs their metadata; their bytes come later.
// Preconditions: CPU tensors; storages written in the pickle's order, each once.
// Errors: INTERNAL naming the file, with errno's text ("cannot create|write|fsync|close PATH"),
// or LibTorch's exception text ("serializing PATH" / "writing PATH").
#ifndef FSDP_CPP_CHECKPOINT_INTERNAL_TORCH_SAVE_ARCHIVE_H_
#define FSDP_CPP_CHECKPOINT_INTERNAL_TORCH_SAVE_ARCHIVE_H_

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>

#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace caffe2::serialize {
class PyTorchStreamWriter;
}  // namespace caffe2::serialize

namespace fsdp::checkpoint::internal {

// A 1-D tensor of `numel` elements of `dtype` whose storage has the right size but no memory.
at::Tensor PlaceholderTensor(int64_t numel, at::ScalarType dtype);
bool IsPlaceholder(const at::Tensor& tensor);

// A value's pickle (data.pkl) and the tensors whose storages it names, in its order
// (storage i is record data/<i>; tensors sharing a storage name it once).
struct Pickled {
  std::vector<char> pickle;
  std::vector<at::Tensor> storages;
};
[[nodiscard]] absl::StatusOr<Pickled> Pickle(const c10::IValue& value, const std::string& path);

// The bytes of storage `tensor` (its whole storage, as torch.save writes it).
const void* StorageData(const at::Tensor& tensor);
size_t StorageBytes(const at::Tensor& tensor);

class ArchiveWriter {
 public:
  // Creates or truncates `path`. With `durable`, Finish fsyncs it, passing the crash points
  // "written <name>" and "fsynced <name>" (checkpoint/atomic_dir.h).
  static absl::StatusOr<std::unique_ptr<ArchiveWriter>> Create(const std::string& path,
                                                               bool durable);
  ~ArchiveWriter();
  ArchiveWriter(const ArchiveWriter&) = delete;
  ArchiveWriter& operator=(const ArchiveWriter&) = delete;

  // Record data/<index>: `nbytes` bytes at `data`. After an error, later calls return it and
  // write nothing.
  absl::Status WriteStorage(size_t index, const void* data, size_t nbytes);
  // Marks the archive failed (a caller's error): later calls write nothing and return it.
  void Fail(absl::Status status);
  // data.pkl, the end records and the zip directory; then fsync (durable) and close.
  absl::Status Finish(const std::vector<char>& pickle);

 private:
  ArchiveWriter(std::string path, int fd, bool durable);
  absl::Status Torch(const char* what, const std::function<void()>& fn);

  const std::string path_;
  int fd_;
  const bool durable_;
  absl::Status io_;  // the first write error
  std::unique_ptr<caffe2::serialize::PyTorchStreamWriter> zip_;
};

// The whole archive of `pickled`, every storage's bytes taken from its tensor.
[[nodiscard]] absl::Status WriteArchive(const Pickled& pickled, const std::string& path,
                                        bool durable);

}  // namespace fsdp::checkpoint::internal

#endif  // FSDP_CPP_CHECKPOINT_INTERNAL_TORCH_SAVE_ARCHIVE_H_
