#include "optim_state/optim_input.h"

#include <c10/util/Exception.h>

#include <string>

#include "absl/strings/str_cat.h"

namespace fsdp::optim_state {

std::vector<at::Tensor> OptimInput::Params() const {
  std::vector<at::Tensor> out;
  for (const auto& group : groups) out.insert(out.end(), group.begin(), group.end());
  return out;
}

void WarnOptimInputDeprecated() { TORCH_WARN(std::string(kOptimInputDeprecationWarning)); }

absl::Status CheckOptimInput(const OptimInput& input, absl::string_view op) {
  const std::vector<at::Tensor> params = input.Params();
  if (params.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": Optimizer input should not be empty"));
  }
  for (size_t i = 0; i < params.size(); ++i) {
    if (!params[i].defined()) {
      return absl::InvalidArgumentError(
          absl::StrCat(op, ": optim_input has an undefined tensor (ID ", i, ")"));
    }
  }
  return absl::OkStatus();
}

}  // namespace fsdp::optim_state
