// OptimInput: PyTorch 1.13's deprecated `optim_input` argument of the FSDP
// optimizer-state functions, as a C++ value. It says which parameter ID is
// which without an optimizer: the parameters (or parameter groups) the
// optimizer was, or would be, constructed from. torch.optim numbers parameters
// 0, 1, ... across its groups in order, so ID i is the i-th tensor of `groups`
// flattened.
//
//   // Python: FSDP.shard_full_optim_state_dict(full_osd, model,
//   optim_input=list(model.parameters())) OptimInput input =
//   OptimInput::FromParams(fsdp->parameters());
//   FSDP_ASSIGN_OR_RETURN(OptimStateDict local,
//   ShardFullOptimStateDict(full_osd, *fsdp, input));
//   // Python: optim_input=[{"params": g0}, {"params": g1, "weight_decay":
//   0.9}] OptimInput groups = OptimInput::FromGroups({g0, g1});  //
//   hyper-parameters play no part
//
// Where it is taken, as in PyTorch: FullOptimStateDict
// (FullOptimStateDictOptions::optim_input, next to the optimizer, whose state
// it re-numbers), ShardFullOptimStateDict and ScatterFullOptimStateDict (in
// place of the optimizer: the result is keyed by the IDs the construction order
// gives), RekeyOptimStateDict (in place of the optimizer). Every function given
// an OptimInput raises PyTorch's deprecation warning through LibTorch's warning
// handler (TORCH_WARN, text kOptimInputDeprecationWarning), which a caller can
// capture with c10::WarningUtils::WarningHandlerGuard.
//
// PyTorch's own rules for the pair (optim, optim_input): optim_input, when
// given, wins over optim; neither means the model's parameters() order. Here
// each function's overloads take one of them (or neither, where PyTorch's
// default is the model's parameters), so the combinations PyTorch would read
// differently cannot be written.
#ifndef FSDP_CPP_OPTIM_STATE_OPTIM_INPUT_H_
#define FSDP_CPP_OPTIM_STATE_OPTIM_INPUT_H_

#include <ATen/ATen.h>

#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace fsdp::optim_state {

// PyTorch's UserWarning text for a given `optim_input`.
inline constexpr absl::string_view kOptimInputDeprecationWarning =
    "The `optim_input` argument is deprecated and will be removed after "
    "PyTorch 1.13. You may "
    "remove it from your code without changing its functionality.";

struct OptimInput {
  // The optimizer's parameter groups in order, each its parameters in order. A
  // plain list of parameters (Python's `list(model.parameters())`) is one
  // group.
  std::vector<std::vector<at::Tensor>> groups;

  static OptimInput FromParams(std::vector<at::Tensor> params) {
    return OptimInput{{std::move(params)}};
  }
  static OptimInput FromGroups(std::vector<std::vector<at::Tensor>> groups) {
    return OptimInput{std::move(groups)};
  }

  // ID order: the groups' parameters concatenated.
  std::vector<at::Tensor> Params() const;
};

// TORCH_WARN(kOptimInputDeprecationWarning).
void WarnOptimInputDeprecated();

// INVALID_ARGUMENT "<op>: Optimizer input should not be empty" (PyTorch's
// ValueError text) for an OptimInput without any parameter; "<op>: optim_input
// has an undefined tensor (ID <i>)".
[[nodiscard]] absl::Status CheckOptimInput(const OptimInput& input, absl::string_view op);

}  // namespace fsdp::optim_state

#endif  // FSDP_CPP_OPTIM_STATE_OPTIM_INPUT_H_
