// OptimizerKind: which of LibTorch's optimizers an OptimizerAdapter (optimizer_adapter.h)
// speaks for, and its PyTorch class name for messages. No preconditions; nothing fails.
#ifndef FSDP_CPP_OPTIM_STATE_OPTIMIZER_KIND_H_
#define FSDP_CPP_OPTIM_STATE_OPTIMIZER_KIND_H_

#include "absl/strings/string_view.h"

namespace fsdp::optim_state {

enum class OptimizerKind { kAdam, kAdamW, kSGD, kAdagrad, kRMSprop };

// "Adam", "AdamW", "SGD", "Adagrad", "RMSprop".
absl::string_view OptimizerKindName(OptimizerKind kind);

}  // namespace fsdp::optim_state

#endif  // FSDP_CPP_OPTIM_STATE_OPTIMIZER_KIND_H_
