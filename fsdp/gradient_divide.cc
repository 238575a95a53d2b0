#include "fsdp/gradient_divide.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace fsdp {

absl::StatusOr<GradientDivideFactors> GradientDivideFactorsFor(int world_size) {
  if (world_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("gradient divide factors: world size ", world_size, " is not positive"));
  }
  int factor = 1;
  while (world_size % factor == 0 && world_size / factor > factor) factor *= 2;
  GradientDivideFactors factors;
  factors.predivide = factor;
  factors.postdivide = static_cast<double>(world_size) / factors.predivide;
  return factors;
}

void DivideIfNeeded(at::Tensor& tensor, double factor) {
  if (factor > 1) tensor.div_(factor);
}

}  // namespace fsdp
