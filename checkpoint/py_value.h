// PyValue: one Python value read from a pickle (a torch.save file, see torch_load.h) as a
// plain C++ value tree: None, bool, int, float, str, bytes, list, tuple, dict (insertion
// order) and tensors. No errors: accessors have their preconditions stated below.
#ifndef FSDP_CPP_CHECKPOINT_PY_VALUE_H_
#define FSDP_CPP_CHECKPOINT_PY_VALUE_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

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

}  // namespace fsdp::checkpoint

#endif  // FSDP_CPP_CHECKPOINT_PY_VALUE_H_
