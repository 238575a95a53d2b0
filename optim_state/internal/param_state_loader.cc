#include "optim_state/internal/param_state_loader.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "optim_state/internal/py_repr.h"

namespace fsdp::optim_state::internal {

std::optional<double> AsNumber(const StateValue& v) {
  if (const auto* i = v.GetIf<int64_t>()) return static_cast<double>(*i);
  if (const auto* d = v.GetIf<double>()) return *d;
  return std::nullopt;
}

bool ParamStateLoader::HasAny(std::initializer_list<const char*> names) const {
  for (const char* n : names) {
    if (Has(n)) return true;
  }
  return false;
}

absl::Status ParamStateLoader::Error(const std::string& name, const std::string& what) const {
  return absl::InvalidArgumentError(absl::StrCat("parameter ", id_, ": state '", name, "' ", what));
}

absl::Status ParamStateLoader::Require(std::initializer_list<const char*> names,
                                       const std::string& needs) const {
  for (const char* n : names) {
    if (!Has(n)) return Error(n, absl::StrCat("is missing (", needs, ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<at::Tensor> ParamStateLoader::Tensor(const char* name) const {
  const StateValue& v = *loaded_.Find(name);
  const auto* t = v.GetIf<at::Tensor>();
  if (t == nullptr || !t->defined()) {
    return Error(name,
                 absl::StrCat("must be a tensor, got ", v.TypeName(), " (", DebugString(v), ")"));
  }
  if (!t->is_floating_point()) {
    return Error(
        name, absl::StrCat("must be a floating-point tensor, got ", DtypeName(t->scalar_type())));
  }
  if (t->sizes() != param_.sizes()) {
    return Error(name, absl::StrCat("has shape ", ShapeString(t->sizes()),
                                    ", but the parameter has shape ", ShapeString(param_.sizes())));
  }
  const bool adopt = adopted_ != nullptr && t->device() == param_.device() &&
                     t->scalar_type() == param_.scalar_type() &&
                     adopted_->insert(t->data_ptr()).second;
  return t->detach().to(param_.device(), param_.scalar_type(), /*non_blocking=*/false,
                        /*copy=*/!adopt);
}

absl::StatusOr<at::Tensor> ParamStateLoader::TensorIfPresent(const char* name) const {
  if (!Has(name)) return at::Tensor();
  return Tensor(name);
}

absl::StatusOr<int64_t> ParamStateLoader::Step() const {
  const StateValue& v = *loaded_.Find("step");
  std::optional<double> value = AsNumber(v);
  if (const auto* t = v.GetIf<at::Tensor>(); t != nullptr && t->defined() && t->numel() == 1) {
    value = t->detach().to(at::kCPU).to(at::kDouble).item<double>();
  }
  if (!value || !(*value >= 0) || std::trunc(*value) != *value || *value > 9.2e18) {
    return Error("step", absl::StrCat("must be a non-negative whole number (an int, a float "
                                      "or a one-element tensor), got ",
                                      DebugString(v)));
  }
  return static_cast<int64_t>(*value);
}

}  // namespace fsdp::optim_state::internal
