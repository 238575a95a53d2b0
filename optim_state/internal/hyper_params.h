// An optimizer's hyper-parameters as PyTorch's param groups hold them, read from and written to
// LibTorch's options through the family table (optimizer_family.h): lookup of a name's spec,
// Python's defaults, checking a loaded value's type, and writing LibTorch's doubles back with
// the types Python had (an int where Python had an int, a list where it had a list).
// Preconditions: `options` is of `kind`'s LibTorch type; WriteHeld's value passed
// CheckHyperValue for the name's spec.
// Errors (CheckHyperValue, INVALID_ARGUMENT, prefixed with `where`): "must be a number",
// "must be a bool", "must be a pair of numbers", maximize set, Adam's decoupled_weight_decay
// set.
#ifndef FSDP_CPP_OPTIM_STATE_INTERNAL_HYPER_PARAMS_H_
#define FSDP_CPP_OPTIM_STATE_INTERNAL_HYPER_PARAMS_H_

#include <torch/optim/optimizer.h>

#include <string>

#include "absl/status/status.h"
#include "optim_state/internal/optimizer_family.h"
#include "optim_state/optim_state_dict.h"
#include "optim_state/optimizer_kind.h"

namespace fsdp::optim_state::internal {

// The spec of hyper-parameter `name` of `kind`; null if PyTorch's optimizer has no such
// default.
const HyperSpec* FindHyperSpec(OptimizerKind kind, const std::string& name);

// Python's defaults, in order.
HyperParams DefaultHyperParams(OptimizerKind kind);

// LibTorch's value of a held hyper-parameter, as a double, bool or (double, double); None for
// a name the options do not hold.
StateValue ReadHeld(OptimizerKind kind, const torch::optim::OptimizerOptions& options,
                    const std::string& name);

// Sets a held hyper-parameter.
void WriteHeld(OptimizerKind kind, torch::optim::OptimizerOptions& options, const std::string& name,
               const StateValue& value);

// OK if `value` has the type `spec` needs; else a message naming the entry.
absl::Status CheckHyperValue(const HyperSpec& spec, const StateValue& value,
                             const std::string& where, OptimizerKind kind);

// `value` (LibTorch's double / tuple of doubles) written with the types of `like` (the
// group's loaded or default value): an int where Python had an int, a list where it had a
// list.
StateValue ConformTo(const StateValue& value, const StateValue* like);

}  // namespace fsdp::optim_state::internal

#endif  // FSDP_CPP_OPTIM_STATE_INTERNAL_HYPER_PARAMS_H_
