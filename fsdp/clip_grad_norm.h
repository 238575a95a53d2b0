// Gradient clipping across shards: PyTorch FSDP1's `FullyShardedDataParallel.clip_grad_norm_`.
//
//   loss.backward();
//   FSDP_ASSIGN_OR_RETURN(at::Tensor total_norm, fsdp::ClipGradNorm(*fsdp, /*max_norm=*/1.0));
//   optimizer.step();
//
// The norm is that of every gradient of the model viewed as one vector: each rank's shards of
// the sharded units' gradients, and once the gradients no rank shards (NO_SHARD units and
// parameters FSDP does not manage, the same on every rank). Every gradient is then multiplied
// by min(1, max_norm / (total_norm + 1e-6)). Computed as PyTorch 2.13 computes it, step for
// step, so that the same gradients give the same bits: the local norm of each group is the
// norm of the per-tensor float32 norms (in unit pre-order, then the unmanaged parameters in
// model order); for a finite p the sharded group's norm^p is summed over the ranks and the
// unsharded group's norm^p added, for p = inf the maximum is taken; when no unit is sharded it
// is torch.nn.utils.clip_grad_norm_ over the model's parameters.
//
// Preconditions: a collective (every rank of the FSDP group calls it) after backward has
// reduced the gradients and before the optimizer step.
// Returns the total norm as a scalar tensor in the promoted dtype of the gradients (float32
// when this rank has none).
// Errors: INVALID_ARGUMENT for a norm_type that is not positive (or is NaN) or a max_norm
// that is negative or NaN; the collective's errors (comm/process_group.h) with context.
#ifndef FSDP_CPP_FSDP_CLIP_GRAD_NORM_H_
#define FSDP_CPP_FSDP_CLIP_GRAD_NORM_H_

#include <ATen/ATen.h>

#include "absl/status/statusor.h"
#include "fsdp/fully_sharded_data_parallel.h"

namespace fsdp {

[[nodiscard]] absl::StatusOr<at::Tensor> ClipGradNorm(FullyShardedDataParallel& fsdp,
                                                      double max_norm, double norm_type = 2.0);

}  // namespace fsdp

#endif  // FSDP_CPP_FSDP_CLIP_GRAD_NORM_H_
