// Two operations on the 1-D buffers that optimizer state is gathered into and cut from: reuse
// one buffer across gathers of one size and dtype, and zero what lies outside written ranges
// (padding, parameters without state, gaps), so that a unit's whole flat tensor is never built
// only to be overwritten.
// Preconditions: CPU tensors; ranges lie inside the tensor. Errors: LibTorch's exceptions
// (callers run these inside CallTorch).
#ifndef FSDP_CPP_OPTIM_STATE_INTERNAL_FLAT_BUFFER_H_
#define FSDP_CPP_OPTIM_STATE_INTERNAL_FLAT_BUFFER_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace fsdp::optim_state::internal {

// A buffer of `numel` elements of `dtype`: the front of `buffer` when it is large enough, else
// a new one stored there.
at::Tensor ReuseBuffer(at::Tensor& buffer, int64_t numel, at::ScalarType dtype);

// Zeros the elements of the 1-D `t` outside the given (offset, numel) ranges.
void ZeroOutside(const at::Tensor& t, std::vector<std::pair<int64_t, int64_t>> ranges);

}  // namespace fsdp::optim_state::internal

#endif  // FSDP_CPP_OPTIM_STATE_INTERNAL_FLAT_BUFFER_H_
