// Reads files written by Python's `torch.save` (PyTorch 1.13 and newer: the zip format,
// pickle protocols 2 and 4) into a C++ value tree, without executing anything.
//
// LibTorch's torch::pickle_load stops at the APPEND opcode, so this is our own reader:
//   * a zip reader for stored (uncompressed) entries, as torch.save writes them, including
//     the zip64 records torch.save always writes; every size and offset read from the file is
//     checked against the file before anything is allocated, so a small damaged file cannot
//     make the reader allocate more than the file holds;
//   * a pickle machine for the opcodes torch.save emits, with an allow-list of globals:
//     collections.OrderedDict, torch._utils._rebuild_tensor_v2 / _rebuild_parameter /
//     _rebuild_parameter_with_state, the torch.<Type>Storage classes, torch.Size, and what
//     protocol 2 uses for `bytes` (_codecs.encode with 'latin1', builtins.bytes). Any other
//     global is refused; nothing from the file is ever called.
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
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/statusor.h"

namespace fsdp::checkpoint {

class PyValue;

// Python `None`.
struct PyNone {
  bool operator==(const PyNone&) const { return true; }
};
// Python `bytes` (a `str` is held as std::string, UTF-8).
struct PyBytes {
  std::string data;
};
// Python `list`.
struct PyList {
  std::vector<PyValue> items;
};
// Python `tuple` (also torch.Size).
struct PyTuple {
  std::vector<PyValue> items;
};
// Python `dict` or `collections.OrderedDict`: items in insertion order (pickle order). Keys
// are whatever the file holds (str and int in state dicts); a key the pickle sets twice keeps
// its first position and its last value, as in Python. An OrderedDict's attributes (a model
// state dict's `_metadata`, restored by pickle's BUILD) are not kept.
struct PyDict {
  std::vector<std::pair<PyValue, PyValue>> items;
};

// One Python value from a torch.save file. A plain value type: copying copies the tree
// (tensors are copied by reference, as at::Tensor always is).
class PyValue {
 public:
  using Variant = std::variant<PyNone, bool, int64_t, double, std::string, PyBytes, PyList, PyTuple,
                               PyDict, at::Tensor>;

  // Implicit from each held type (plain overloads: a string literal is a str, an int an int).
  PyValue() : value_(PyNone{}) {}
  PyValue(PyNone) : value_(PyNone{}) {}               // NOLINT
  PyValue(bool b) : value_(b) {}                      // NOLINT
  PyValue(int i) : value_(int64_t{i}) {}              // NOLINT
  PyValue(int64_t i) : value_(i) {}                   // NOLINT
  PyValue(double d) : value_(d) {}                    // NOLINT
  PyValue(const char* s) : value_(std::string(s)) {}  // NOLINT
  PyValue(std::string s) : value_(std::move(s)) {}    // NOLINT
  PyValue(PyBytes b) : value_(std::move(b)) {}        // NOLINT
  PyValue(PyList l) : value_(std::move(l)) {}         // NOLINT
  PyValue(PyTuple t) : value_(std::move(t)) {}        // NOLINT
  PyValue(PyDict d) : value_(std::move(d)) {}         // NOLINT
  PyValue(at::Tensor t) : value_(std::move(t)) {}     // NOLINT

  bool is_none() const { return std::holds_alternative<PyNone>(value_); }
  bool is_bool() const { return std::holds_alternative<bool>(value_); }
  bool is_int() const { return std::holds_alternative<int64_t>(value_); }
  bool is_float() const { return std::holds_alternative<double>(value_); }
  bool is_str() const { return std::holds_alternative<std::string>(value_); }
  bool is_bytes() const { return std::holds_alternative<PyBytes>(value_); }
  bool is_list() const { return std::holds_alternative<PyList>(value_); }
  bool is_tuple() const { return std::holds_alternative<PyTuple>(value_); }
  bool is_dict() const { return std::holds_alternative<PyDict>(value_); }
  bool is_tensor() const { return std::holds_alternative<at::Tensor>(value_); }

  // Accessors: precondition, the value holds that type (std::bad_variant_access otherwise).
  bool as_bool() const { return std::get<bool>(value_); }
  int64_t as_int() const { return std::get<int64_t>(value_); }
  double as_float() const { return std::get<double>(value_); }
  const std::string& as_str() const { return std::get<std::string>(value_); }
  const PyBytes& as_bytes() const { return std::get<PyBytes>(value_); }
  const PyList& as_list() const { return std::get<PyList>(value_); }
  const PyTuple& as_tuple() const { return std::get<PyTuple>(value_); }
  const PyDict& as_dict() const { return std::get<PyDict>(value_); }
  const at::Tensor& as_tensor() const { return std::get<at::Tensor>(value_); }

  // Items of a list or a tuple; precondition: is_list() || is_tuple().
  const std::vector<PyValue>& items() const;
  // For a dict: the value under a str / int key, or nullptr (also when not a dict). A linear
  // scan: iterate as_dict().items to visit every entry.
  const PyValue* Find(std::string_view key) const;
  const PyValue* Find(int64_t key) const;

  const Variant& variant() const { return value_; }
  Variant& variant() { return value_; }

  // Python's name of the type held: "None", "bool", "int", "float", "str", "bytes", "list",
  // "tuple", "dict", "Tensor".
  std::string TypeName() const;
  // A short Python-like rendering for messages and tests (tensors as `tensor(dtype, shape)`).
  std::string DebugString() const;

 private:
  Variant value_;
};

// Nesting of lists, tuples and dicts deeper than this is refused (INVALID_ARGUMENT).
inline constexpr int kMaxDepth = 256;

// Loads the torch.save file at `path`. Reads only the zip directory, data.pkl and the storages
// the pickle refers to; each storage is read straight into its tensor.
absl::StatusOr<PyValue> TorchLoad(const std::string& path);

// The same from the file's bytes in memory; `name` stands for the file in messages.
absl::StatusOr<PyValue> TorchLoadFromBytes(std::string_view bytes,
                                           const std::string& name = "<bytes>");

}  // namespace fsdp::checkpoint

#endif  // FSDP_CPP_CHECKPOINT_TORCH_LOAD_H_
