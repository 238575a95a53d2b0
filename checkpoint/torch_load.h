// Reads files written by Python's `torch.save` (PyTorch 1.13 and newer: the zip format,
// pickle protocols 2 and 4) into a C++ value tree, without executing anything.
//
// LibTorch's torch::pickle_load stops at the APPEND opcode, so this is our own reader:
//   * a zip reader (internal/zip_reader.h) for stored (uncompressed) entries, as torch.save
//     writes them, including the zip64 records torch.save always writes; every size and offset read
//     from the file is checked against the file before anything is allocated, so a small damaged
//     file cannot make the reader allocate more than the file holds;
//   * the pickle machine (pickle.h) with torch.save's client: its allow-list of globals,
//     collections.OrderedDict, torch._utils._rebuild_tensor_v2 / _rebuild_parameter /
//     _rebuild_parameter_with_state, the torch.<Type>Storage classes, torch.Size, and what
//     protocol 2 uses for `bytes` (_codecs.encode with 'latin1', builtins.bytes). Any other
//     global is refused; nothing from the file is ever called. Storages are the persistent
//     ids, read from the archive's data/ entries.
//
// Tensors come back on the CPU (whatever `location` the file records), with the dtype,
// shape, strides and storage offset they had when saved. Tensors that shared one storage in
// Python share one at::Tensor storage here (views of one base), so a write through one is
// seen through the others, as after Python's torch.load.
//
// Errors (every message names the file, and the zip entry or tensor where known):
//   NOT_FOUND / PERMISSION_DENIED / UNKNOWN  the file cannot be opened or read.
//   INVALID_ARGUMENT  not a zip file (including torch.save's legacy non-zip format); a
//                     compressed or encrypted entry; no `<dir>/data.pkl`; a pickle opcode or
//                     structure torch.save does not write (unsupported opcode, wrong
//                     arguments to a global, an int beyond 64 bits, nesting deeper than
//                     kMaxDepth); "refusing to load global module.name from FILE" for a
//                     global outside the allow-list; big-endian data.
//   DATA_LOSS         truncated or corrupted: the zip directory or a local header out of the
//                     file's bounds or overlapping; a CRC-32 mismatch; a pickle that ends
//                     early; a storage entry missing or whose size does not match the
//                     element count the pickle records; a tensor view reaching outside its
//                     storage.
#ifndef FSDP_CPP_CHECKPOINT_TORCH_LOAD_H_
#define FSDP_CPP_CHECKPOINT_TORCH_LOAD_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "checkpoint/py_value.h"  // IWYU pragma: export

namespace fsdp::checkpoint {

// Nesting of lists, tuples and dicts deeper than this is refused (INVALID_ARGUMENT).
inline constexpr int kMaxDepth = 256;

// Loads the torch.save file at `path`. Reads only the zip directory, data.pkl and the storages
// the pickle refers to; each storage is read straight into its tensor.
absl::StatusOr<PyValue> TorchLoad(const std::string& path);

// The same from the file's bytes in memory; `name` stands for the file in messages.
absl::StatusOr<PyValue> TorchLoadFromBytes(std::string_view bytes,
                                           const std::string& name = "<bytes>");

// The same from any byte source of internal/zip_reader.h (for this package's readers: an
// archive stored inside a larger file, read through a SliceSource); `name` as above.
class Source;
absl::StatusOr<PyValue> TorchLoadFromSource(const Source& source, const std::string& name);

// Lazy loading, for readers that need one part of a big file at a time (a full checkpoint
// loaded unit by unit, checkpoint/load_full_checkpoint.h). TorchLoadLazy reads the zip
// directory and the pickle, and makes every check above but the storages' CRC-32s; storages
// are left unread (but those a zero-dimension tensor views, read at once: scalars are compared
// by value before anything else is read): their tensors have their dtype, shape, strides and
// offset, but no memory (LibTorch refuses to read them: "data is not allocated").
// TorchStorages reads them when asked.
class ZipReader;
struct ZipEntry;
class TorchStorages {
 public:
  ~TorchStorages();

  // Reads the unread storages that `tensors` view, each whole and once, checking each record's
  // CRC-32. On an error (DATA_LOSS / UNKNOWN naming the file and the record: the file was cut
  // or changed since it was opened) every storage asked for still gets memory, zeros where the
  // read failed, so that a caller in the middle of a collective can keep going; the first
  // error is returned.
  absl::Status Read(const std::vector<at::Tensor>& tensors);

  // Frees the lazily read storages that `tensors` view (a later Read reads them again).
  void Release(const std::vector<at::Tensor>& tensors);

  // Bytes of lazily read storages in memory now, and the most there were at once.
  int64_t live_bytes() const { return live_bytes_; }
  int64_t max_live_bytes() const { return max_live_bytes_; }
  // Bytes of all storages left unread by TorchLoadLazy.
  int64_t lazy_bytes() const { return lazy_bytes_; }

 private:
  friend class TorchStoragesBuilder;
  struct Record {
    const ZipEntry* entry = nullptr;
    bool live = false;
  };
  TorchStorages() = default;

  std::string path_;
  std::unique_ptr<Source> source_;
  std::unique_ptr<ZipReader> zip_;
  std::unordered_map<const c10::StorageImpl*, Record> records_;
  int64_t live_bytes_ = 0;
  int64_t max_live_bytes_ = 0;
  int64_t lazy_bytes_ = 0;
};

struct LazyTorchLoad {
  PyValue value;
  std::unique_ptr<TorchStorages> storages;  // reads value's unread storages from the file
};

// TorchLoad of `path` with the big storages left unread (see above); errors as TorchLoad's,
// but for the CRC-32 of unread storages, which TorchStorages::Read checks.
absl::StatusOr<LazyTorchLoad> TorchLoadLazy(const std::string& path);

}  // namespace fsdp::checkpoint

#endif  // FSDP_CPP_CHECKPOINT_TORCH_LOAD_H_
