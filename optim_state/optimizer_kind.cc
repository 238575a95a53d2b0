#include "optim_state/optimizer_kind.h"

namespace fsdp::optim_state {

absl::string_view OptimizerKindName(OptimizerKind kind) {
  switch (kind) {
    case OptimizerKind::kAdam:
      return "Adam";
    case OptimizerKind::kAdamW:
      return "AdamW";
    case OptimizerKind::kSGD:
      return "SGD";
    case OptimizerKind::kAdagrad:
      return "Adagrad";
    case OptimizerKind::kRMSprop:
      return "RMSprop";
  }
  return "unknown";
}

}  // namespace fsdp::optim_state
