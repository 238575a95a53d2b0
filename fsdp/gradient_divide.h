// Gradient averaging as PyTorch FSDP1 (`FullyShardedDataParallel`) does it, so that a C++ job
// and a PyTorch job average the same gradients to the same bits.
//
// FSDP averages a unit's gradient over the N ranks of its group in two divisions around a
// sum-reduction: the unsharded gradient is divided by `predivide` before the reduce-scatter
// (NO_SHARD: all-reduce), the reduced gradient by `postdivide` after it, predivide *
// postdivide == N. Dividing part of the way first keeps the sum's magnitude down; dividing
// once by N after the sum (or averaging in the collective) rounds differently in the last
// bits. PyTorch 2.13 sets the factors in `_init_process_group_state`
// (torch/distributed/fsdp/_init_utils.py) from `DefaultState._get_gradient_predivide_factor`
// (torch/distributed/algorithms/_comm_hooks/default_hooks.py) and divides in `_reduce_grad` /
// `_reduce_grad_no_shard` (torch/distributed/fsdp/_runtime_utils.py) with `_div_if_needed`: an
// in-place `div_` by the factor as a double scalar, skipped when the factor is 1.
//
//   N          1  2  3    4  5    6    7    8
//   predivide  1  2  2    2  2    4    2    4
//   postdivide 1  1  1.5  2  2.5  1.5  3.5  2
#ifndef FSDP_CPP_FSDP_GRADIENT_DIVIDE_H_
#define FSDP_CPP_FSDP_GRADIENT_DIVIDE_H_

#include <ATen/ATen.h>

#include "absl/status/statusor.h"

namespace fsdp {

struct GradientDivideFactors {
  double predivide = 1.0;   // applied to the unsharded gradient, before the reduction
  double postdivide = 1.0;  // applied to the reduced gradient, after it
};

// PyTorch FSDP1's factors for a group of `world_size` ranks: predivide is the first power of
// two f (from 1, doubling) for which world_size % f != 0 or world_size / f <= f; postdivide is
// world_size / predivide. Errors: INVALID_ARGUMENT for world_size < 1.
[[nodiscard]] absl::StatusOr<GradientDivideFactors> GradientDivideFactorsFor(int world_size);

// `tensor.div_(factor)` when factor > 1, else nothing: PyTorch's `_div_if_needed`.
void DivideIfNeeded(at::Tensor& tensor, double factor);

}  // namespace fsdp

#endif  // FSDP_CPP_FSDP_GRADIENT_DIVIDE_H_
