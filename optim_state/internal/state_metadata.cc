#include "optim_state/internal/state_metadata.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "comm/status_macros.h"
#include "optim_state/internal/status_context.h"

namespace fsdp::optim_state::internal {
namespace {

absl::StatusOr<json> ZeroDimTensorToJson(const at::Tensor& t) {
  json j{{"t", "tensor"}, {"dtype", static_cast<int>(t.scalar_type())}};
  if (t.scalar_type() == at::kBool) {
    j["v"] = t.item<bool>();
  } else if (at::isIntegralType(t.scalar_type(), /*includeBool=*/false)) {
    j["v"] = t.item<int64_t>();
  } else if (at::isFloatingType(t.scalar_type())) {
    j["v"] = t.item<double>();
  } else {
    return absl::UnimplementedError(
        absl::StrCat("a zero-dimension tensor of dtype ", DtypeName(t.scalar_type())));
  }
  return j;
}

StateValue ZeroDimTensorFromJson(const json& j) {
  const auto dtype = static_cast<at::ScalarType>(j.at("dtype").get<int>());
  const auto options = at::TensorOptions().dtype(dtype);
  if (dtype == at::kBool) return StateValue(at::scalar_tensor(j.at("v").get<bool>(), options));
  if (at::isIntegralType(dtype, /*includeBool=*/false)) {
    return StateValue(at::scalar_tensor(j.at("v").get<int64_t>(), options));
  }
  return StateValue(at::scalar_tensor(j.at("v").get<double>(), options));
}

}  // namespace

bool IsPosDimTensor(const StateValue& v) {
  const at::Tensor* t = v.GetIf<at::Tensor>();
  return t != nullptr && t->defined() && t->dim() > 0;
}

bool IsZeroDimTensor(const StateValue& v) {
  const at::Tensor* t = v.GetIf<at::Tensor>();
  return t != nullptr && t->defined() && t->dim() == 0;
}

absl::StatusOr<json> StateValueToJson(const StateValue& value) {
  if (value.IsNone()) return json{{"t", "none"}};
  if (const bool* b = value.GetIf<bool>()) return json{{"t", "bool"}, {"v", *b}};
  if (const int64_t* i = value.GetIf<int64_t>()) return json{{"t", "int"}, {"v", *i}};
  if (const double* d = value.GetIf<double>()) return json{{"t", "float"}, {"v", *d}};
  if (const std::string* s = value.GetIf<std::string>()) return json{{"t", "str"}, {"v", *s}};
  if (const StateSequence* seq = value.GetIf<StateSequence>()) {
    json items = json::array();
    for (const StateValue& item : seq->items) {
      FSDP_ASSIGN_OR_RETURN(json j, StateValueToJson(item));
      items.push_back(std::move(j));
    }
    return json{{"t", seq->is_tuple ? "tuple" : "list"}, {"v", std::move(items)}};
  }
  if (IsZeroDimTensor(value)) return ZeroDimTensorToJson(value.Get<at::Tensor>());
  return absl::UnimplementedError(
      absl::StrCat("a value of type ", value.TypeName(), " cannot travel as metadata"));
}

StateValue StateValueFromJson(const json& j) {
  const std::string t = j.at("t").get<std::string>();
  if (t == "bool") return StateValue(j.at("v").get<bool>());
  if (t == "int") return StateValue(j.at("v").get<int64_t>());
  if (t == "float") return StateValue(j.at("v").get<double>());
  if (t == "str") return StateValue(j.at("v").get<std::string>());
  if (t == "tuple" || t == "list") {
    std::vector<StateValue> items;
    for (const json& item : j.at("v")) items.push_back(StateValueFromJson(item));
    return t == "tuple" ? StateValue::Tuple(std::move(items)) : StateValue::List(std::move(items));
  }
  if (t == "tensor") return ZeroDimTensorFromJson(j);
  return StateValue::None();
}

absl::StatusOr<json> ParamStateToJson(const ParamState& state) {
  json out = json::array();
  for (const auto& [name, value] : state) {
    OPTIM_ASSIGN_OR_RETURN(json v, StateValueToJson(value), absl::StrCat("state '", name, "'"));
    out.push_back(json{{"name", name}, {"v", std::move(v)}});
  }
  return out;
}

ParamState ParamStateFromJson(const json& j) {
  ParamState out;
  for (const json& e : j) out.Set(e.at("name").get<std::string>(), StateValueFromJson(e.at("v")));
  return out;
}

absl::StatusOr<json> StateEntriesToJson(const ParamState& state, absl::string_view op,
                                        const std::string& fqn, bool with_shape) {
  json entries = json::array();
  for (const auto& [name, value] : state) {
    if (IsPosDimTensor(value)) {
      const at::Tensor& t = value.Get<at::Tensor>();
      json entry{{"name", name}, {"dtype", static_cast<int>(t.scalar_type())}};
      if (with_shape) entry["shape"] = t.sizes().vec();
      entries.push_back(std::move(entry));
    } else {
      OPTIM_ASSIGN_OR_RETURN(json v, StateValueToJson(value),
                             absl::StrCat(op, ": state '", name, "' of '", fqn, "'"));
      entries.push_back(json{{"name", name}, {"v", std::move(v)}});
    }
  }
  return entries;
}

NamesByKind SortNames(const ParamState& state) {
  NamesByKind n;
  for (const auto& [name, value] : state) {
    (IsPosDimTensor(value) ? n.pos : IsZeroDimTensor(value) ? n.zero : n.other).push_back(name);
  }
  std::sort(n.pos.begin(), n.pos.end());
  std::sort(n.zero.begin(), n.zero.end());
  std::sort(n.other.begin(), n.other.end());
  return n;
}

absl::StatusOr<json> ParseMetadata(const std::string& bytes) {
  json j = json::parse(bytes, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InternalError("malformed metadata object");
  return j;
}

}  // namespace fsdp::optim_state::internal
