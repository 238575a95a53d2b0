#include "fsdp/clip_grad_norm.h"

#include <ATen/core/grad_mode.h>

#include <cmath>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/status_macros.h"

namespace fsdp {
namespace {

// PyTorch's _get_grad_norm: the norm of the per-gradient float32 norms; 0 without gradients.
at::Tensor GradNorm(const std::vector<at::Tensor>& grads, double norm_type) {
  if (grads.empty()) return at::zeros({}, at::kFloat);
  std::vector<at::Tensor> norms;
  norms.reserve(grads.size());
  for (const at::Tensor& grad : grads) {
    norms.push_back(at::linalg_vector_norm(grad, norm_type, /*dim=*/c10::nullopt, /*keepdim=*/false,
                                           at::kFloat));
  }
  return at::linalg_vector_norm(at::stack(norms), norm_type, c10::nullopt, false, at::kFloat);
}

void AddGrad(const at::Tensor& param, std::vector<at::Tensor>& grads) {
  if (param.grad().defined()) grads.push_back(param.grad());
}

}  // namespace

absl::StatusOr<at::Tensor> ClipGradNorm(FullyShardedDataParallel& fsdp, double max_norm,
                                        double norm_type) {
  if (!(norm_type > 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("ClipGradNorm: norm_type ", norm_type, " is not positive"));
  }
  if (!(max_norm >= 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("ClipGradNorm: max_norm ", max_norm, " is not a non-negative number"));
  }
  at::NoGradGuard no_grad;
  const bool is_inf = std::isinf(norm_type);
  // The gradients of each group, in PyTorch's order (handles in pre-order, then the rest).
  std::vector<at::Tensor> sharded, nonsharded;
  bool any_sharded_unit = false;
  for (const FullyShardedDataParallel::UnitView& unit : fsdp.units()) {
    if (unit.handle == nullptr) continue;
    any_sharded_unit |= unit.handle->sharded();
    std::vector<at::Tensor>& target = unit.handle->sharded() ? sharded : nonsharded;
    if (unit.handle->use_orig_params()) {
      for (const at::Tensor& param : unit.handle->params()) AddGrad(param, target);
    } else {
      AddGrad(unit.handle->flat_param(), target);
    }
  }
  for (const auto& [fqn, param] : fsdp.unmanaged_parameters()) AddGrad(param, nonsharded);

  std::vector<at::Tensor> grads = sharded;
  grads.insert(grads.end(), nonsharded.begin(), nonsharded.end());
  at::Tensor total;
  if (!any_sharded_unit) {
    // torch.nn.utils.clip_grad_norm_(self.parameters(), ...): one norm over the parameters.
    total = GradNorm(grads, norm_type);
  } else {
    at::Tensor local_sharded = GradNorm(sharded, norm_type);
    const bool has_nonsharded = !nonsharded.empty();
    at::Tensor local_nonsharded = has_nonsharded ? GradNorm(nonsharded, norm_type) : at::Tensor();
    if (is_inf) {
      total = has_nonsharded ? at::maximum(local_sharded, local_nonsharded) : local_sharded;
      FSDP_RETURN_IF_ERROR(fsdp.group()->AllReduce(total, comm::ReduceOp::kMax),
                           "ClipGradNorm: the maximum over the ranks");
    } else {
      total = local_sharded.pow(norm_type);
      FSDP_RETURN_IF_ERROR(fsdp.group()->AllReduce(total, comm::ReduceOp::kSum),
                           "ClipGradNorm: the sum over the ranks");
      if (has_nonsharded) total.add_(local_nonsharded.pow(norm_type));
      total = total.pow(1.0 / norm_type);
    }
  }
  const at::Tensor clip_coef = max_norm / (total + 1e-6);
  const at::Tensor clamped = at::clamp(clip_coef, /*min=*/c10::nullopt, /*max=*/1.0);
  for (at::Tensor& grad : grads) grad.mul_(clamped.to(grad.device(), grad.scalar_type()));
  if (grads.empty()) return total;
  c10::ScalarType dtype = grads.front().scalar_type();
  for (const at::Tensor& grad : grads) dtype = c10::promoteTypes(dtype, grad.scalar_type());
  return total.to(dtype);
}

}  // namespace fsdp
