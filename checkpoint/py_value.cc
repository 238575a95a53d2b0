#include "checkpoint/py_value.h"

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace fsdp::checkpoint {

const std::vector<PyValue>& PyValue::items() const {
  if (is_tuple()) return as_tuple().items;
  return as_list().items;
}

const PyValue* PyValue::Find(std::string_view key) const {
  if (!is_dict()) return nullptr;
  for (const auto& [k, v] : as_dict().items) {
    if (k.is_str() && k.as_str() == key) return &v;
  }
  return nullptr;
}

const PyValue* PyValue::Find(int64_t key) const {
  if (!is_dict()) return nullptr;
  for (const auto& [k, v] : as_dict().items) {
    if (k.is_int() && k.as_int() == key) return &v;
  }
  return nullptr;
}

std::string PyValue::TypeName() const {
  static constexpr const char* kNames[] = {"None",  "bool", "int",   "float", "str",
                                           "bytes", "list", "tuple", "dict",  "Tensor"};
  return kNames[value_.index()];
}

std::string PyValue::DebugString() const {
  struct Printer {
    std::string operator()(const PyNone&) const { return "None"; }
    std::string operator()(bool b) const { return b ? "True" : "False"; }
    std::string operator()(int64_t i) const { return absl::StrCat(i); }
    std::string operator()(double d) const { return absl::StrCat(d); }
    std::string operator()(const std::string& s) const {
      return absl::StrCat("'", absl::CHexEscape(s), "'");
    }
    std::string operator()(const PyBytes& b) const {
      return absl::StrCat("b'", absl::CHexEscape(b.data), "'");
    }
    std::string operator()(const PyList& l) const { return absl::StrCat("[", Join(l.items), "]"); }
    std::string operator()(const PyTuple& t) const {
      return absl::StrCat("(", Join(t.items), t.items.size() == 1 ? ",)" : ")");
    }
    std::string operator()(const PyDict& d) const {
      std::vector<std::string> parts;
      for (const auto& [k, v] : d.items) {
        parts.push_back(absl::StrCat(k.DebugString(), ": ", v.DebugString()));
      }
      return absl::StrCat("{", absl::StrJoin(parts, ", "), "}");
    }
    std::string operator()(const at::Tensor& t) const {
      return absl::StrCat("tensor(", std::string(c10::toString(t.scalar_type())), ", [",
                          absl::StrJoin(t.sizes(), ", "), "])");
    }
    static std::string Join(const std::vector<PyValue>& items) {
      std::vector<std::string> parts;
      for (const PyValue& item : items) parts.push_back(item.DebugString());
      return absl::StrJoin(parts, ", ");
    }
  };
  return std::visit(Printer{}, value_);
}

}  // namespace fsdp::checkpoint
