#include "optim_state/internal/optimizer_family.h"

#include <algorithm>
#include <utility>

namespace fsdp::optim_state::internal {

const OptimizerFamily& FamilyOf(OptimizerKind kind) {
  switch (kind) {
    case OptimizerKind::kAdam:
      return AdamFamily();
    case OptimizerKind::kAdamW:
      return AdamWFamily();
    case OptimizerKind::kSGD:
      return SgdFamily();
    case OptimizerKind::kAdagrad:
      return AdagradFamily();
    case OptimizerKind::kRMSprop:
      return RmspropFamily();
  }
  return AdamFamily();
}

HyperSpec Number(const char* name, StateValue python_default, bool filled_on_load) {
  return {name, HyperType::kNumber, std::move(python_default), filled_on_load};
}

HyperSpec Flag(const char* name) { return {name, HyperType::kBool, false, true}; }

HyperSpec PythonOnly(const char* name, StateValue python_default) {
  return {name, HyperType::kPythonOnly, std::move(python_default), true};
}

std::vector<HyperSpec> WithPythonOnlyFlags(std::vector<HyperSpec> held,
                                           std::initializer_list<const char*> flags) {
  for (const char* flag : flags) {  // string literals: HyperSpec keeps the pointer
    const std::string name = flag;
    const bool none_by_default = name == "foreach" || name == "fused";
    held.push_back(PythonOnly(flag, none_by_default ? StateValue::None() : StateValue(false)));
  }
  return held;
}

const std::vector<std::string>& AllStateNames() {
  static const auto* names = new std::vector<std::string>{
      "step", "exp_avg",    "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer",
      "sum",  "square_avg", "grad_avg"};
  return *names;
}

bool Contains(const std::vector<std::string>& names, const std::string& name) {
  return std::find(names.begin(), names.end(), name) != names.end();
}

at::Tensor StepTensor(int64_t step) {
  return at::scalar_tensor(static_cast<double>(step), at::TensorOptions().dtype(at::kFloat));
}

}  // namespace fsdp::optim_state::internal
