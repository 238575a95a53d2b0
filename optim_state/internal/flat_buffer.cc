#include "optim_state/internal/flat_buffer.h"

#include <algorithm>

namespace fsdp::optim_state::internal {

at::Tensor ReuseBuffer(at::Tensor& buffer, int64_t numel, at::ScalarType dtype) {
  if (!buffer.defined() || buffer.scalar_type() != dtype || buffer.numel() < numel) {
    buffer = at::Tensor();  // frees the old one first
    buffer = at::empty({numel}, at::TensorOptions().dtype(dtype));
  }
  return buffer.narrow(0, 0, numel);
}

void ZeroOutside(const at::Tensor& t, std::vector<std::pair<int64_t, int64_t>> ranges) {
  std::sort(ranges.begin(), ranges.end());
  int64_t next = 0;
  for (const auto& [offset, numel] : ranges) {
    if (offset > next) t.narrow(0, next, offset - next).zero_();
    next = std::max(next, offset + numel);
  }
  if (next < t.numel()) t.narrow(0, next, t.numel() - next).zero_();
}

}  // namespace fsdp::optim_state::internal
