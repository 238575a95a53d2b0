#include "optim_state/internal/py_repr.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace fsdp::optim_state::internal {

std::string PyStr(const std::string& s) { return absl::StrCat("'", s, "'"); }

std::string PyList(const std::vector<std::string>& items) {
  return absl::StrCat(
      "[",
      absl::StrJoin(items, ", ",
                    [](std::string* out, const std::string& s) { absl::StrAppend(out, PyStr(s)); }),
      "]");
}

std::string PyTuple(const std::vector<std::string>& items) {
  std::vector<std::string> quoted;
  for (const auto& s : items) quoted.push_back(PyStr(s));
  return absl::StrCat("(", absl::StrJoin(quoted, ", "), items.size() == 1 ? ",)" : ")");
}

std::string PySet(const std::vector<std::string>& reprs) {
  return absl::StrCat("{", absl::StrJoin(reprs, ", "), "}");
}

std::string ValuesRepr(const std::vector<const StateValue*>& values) {
  std::vector<std::string> reprs;
  for (const StateValue* v : values) reprs.push_back(DebugString(*v));
  return absl::StrCat("[", absl::StrJoin(reprs, ", "), "]");
}

std::string TorchSize(at::IntArrayRef shape) {
  return absl::StrCat("torch.Size(", ShapeString(shape), ")");
}

std::string ShapeString(at::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

std::string TorchDtype(at::ScalarType t) { return absl::StrCat("torch.", DtypeName(t)); }

std::string ItemRepr(const at::Tensor& t) {
  if (t.scalar_type() == at::kBool) return t.item<bool>() ? "True" : "False";
  if (at::isIntegralType(t.scalar_type(), /*includeBool=*/false)) {
    return absl::StrCat(t.item<int64_t>());
  }
  return DebugString(StateValue(t.item<double>()));
}

}  // namespace fsdp::optim_state::internal
