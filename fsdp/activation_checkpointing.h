// Activation checkpointing: a wrapped child's forward keeps no activations; backward runs it
// again, with gradients, to get them (PyTorch's checkpoint_wrapper, reentrant variant).
//
//   FSDP_RETURN_IF_ERROR(fsdp::ApplyActivationCheckpointing(model->layer));
//
// The child stays registered under its own name, so checkpointing never appears in FQNs, and
// it composes with FSDP wrapping the same slot (FSDP gathers the parameters before the
// recomputation, whose output hook fires first).
//
// Preconditions: the child's forward takes only torch::Tensor arguments and is deterministic
// (no dropout in training mode, or the recomputation differs from the first run).
// Errors: INVALID_ARGUMENT for an empty slot or one already checkpointed. A forward whose
// arguments are not all tensors throws c10::Error when called.
#ifndef FSDP_CPP_FSDP_ACTIVATION_CHECKPOINTING_H_
#define FSDP_CPP_FSDP_ACTIVATION_CHECKPOINTING_H_

#include "absl/status/status.h"
#include "fsdp/module_slot.h"

namespace fsdp {

[[nodiscard]] absl::Status ApplyActivationCheckpointing(ModuleSlot& slot);

}  // namespace fsdp

#endif  // FSDP_CPP_FSDP_ACTIVATION_CHECKPOINTING_H_
