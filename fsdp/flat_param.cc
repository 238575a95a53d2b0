#include "fsdp/flat_param.h"

#include <ATen/native/Resize.h>

#include <algorithm>
#include <unordered_set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "comm/status_macros.h"
#include "fsdp/gradient_divide.h"

namespace fsdp {

absl::string_view ShardingStrategyName(ShardingStrategy strategy) {
  switch (strategy) {
    case ShardingStrategy::kFullShard:
      return "FULL_SHARD";
    case ShardingStrategy::kShardGradOp:
      return "SHARD_GRAD_OP";
    case ShardingStrategy::kNoShard:
      return "NO_SHARD";
    case ShardingStrategy::kHybridShard:
      return "HYBRID_SHARD";
    case ShardingStrategy::kHybridShardZero2:
      return "_HYBRID_SHARD_ZERO2";
  }
  return "?";
}

bool ReshardsAfterForward(ShardingStrategy strategy) {
  return strategy == ShardingStrategy::kFullShard || strategy == ShardingStrategy::kHybridShard;
}

bool IsHybrid(ShardingStrategy strategy) {
  return strategy == ShardingStrategy::kHybridShard ||
         strategy == ShardingStrategy::kHybridShardZero2;
}

absl::StatusOr<std::unique_ptr<FlatParamHandle>> FlatParamHandle::Create(
    std::vector<FlatParamEntry> params, std::shared_ptr<comm::ProcessGroup> group,
    ShardingStrategy strategy, bool use_orig_params, const MixedPrecision& mixed_precision,
    std::shared_ptr<comm::ProcessGroup> replicate_group) {
  FSDP_RETURN_IF_ERROR(ValidateMixedPrecision(mixed_precision), "FlatParamHandle");
  if (params.empty()) return absl::InvalidArgumentError("FlatParamHandle: no parameters");
  if (group == nullptr) return absl::InvalidArgumentError("FlatParamHandle: no process group");
  if (IsHybrid(strategy) != (replicate_group != nullptr)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "FlatParamHandle: ", ShardingStrategyName(strategy),
        IsHybrid(strategy) ? " needs a replicate group" : " takes no replicate group"));
  }
  const at::ScalarType dtype = params[0].param.scalar_type();
  std::unordered_set<const c10::TensorImpl*> seen;
  for (const FlatParamEntry& entry : params) {
    const std::string name = entry.fqns.empty() ? std::string("<unnamed>") : entry.fqns[0];
    if (!entry.param.defined()) {
      return absl::InvalidArgumentError(absl::StrCat("parameter ", name, " is undefined"));
    }
    if (!entry.param.device().is_cpu()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "parameter ", name, " is on ", entry.param.device().str(), "; Gloo FSDP needs CPU"));
    }
    if (entry.param.scalar_type() != dtype || !at::isFloatingType(dtype)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "FSDP flattens parameters of one floating dtype; ", name, " is ",
          c10::toString(entry.param.scalar_type()), ", ",
          params[0].fqns.empty() ? "" : params[0].fqns[0], " is ", c10::toString(dtype)));
    }
    if (!seen.insert(entry.param.unsafeGetTensorImpl()).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("parameter ", name,
                       " is listed twice; give a shared parameter once "
                       "with all its FQNs"));
    }
  }

  std::unique_ptr<FlatParamHandle> handle(new FlatParamHandle());
  handle->group_ = std::move(group);
  handle->strategy_ = strategy;
  handle->use_orig_params_ = use_orig_params;
  handle->replicate_group_ = std::move(replicate_group);
  // FSDP1 averages over every data-parallel rank: both groups' ranks under the hybrid ones.
  const int data_parallel_size =
      handle->group_->size() * (handle->replicate_group_ ? handle->replicate_group_->size() : 1);
  FSDP_ASSIGN_OR_RETURN(handle->divide_, GradientDivideFactorsFor(data_parallel_size));
  bool any_requires_grad = false;
  std::vector<at::Tensor> pieces;
  for (FlatParamEntry& entry : params) {
    FlatParamInfo info;
    info.fqns = std::move(entry.fqns);
    info.shape = entry.param.sizes().vec();
    info.numel = entry.param.numel();
    info.offset = handle->numel_;
    info.requires_grad = entry.param.requires_grad();
    any_requires_grad |= info.requires_grad;
    handle->numel_ += info.numel;
    pieces.push_back(entry.param.detach().reshape({-1}));
    handle->infos_.push_back(std::move(info));
    handle->params_.push_back(std::move(entry.param));
  }
  handle->stashed_grads_.resize(handle->params_.size());
  at::Tensor flat = at::cat(pieces);
  const auto options = flat.options();
  handle->compute_dtype_ = mixed_precision.param_dtype.value_or(dtype);
  handle->reduce_dtype_ = mixed_precision.effective_reduce_dtype().value_or(dtype);
  const auto compute_options = options.dtype(handle->compute_dtype_);
  if (handle->sharded()) {
    const int64_t n = handle->group_->size();
    handle->shard_numel_ = (handle->numel_ + n - 1) / n;
    handle->padded_numel_ = handle->shard_numel_ * n;
    at::Tensor shard = at::zeros({handle->shard_numel_}, options);
    const int64_t begin = handle->group_->rank() * handle->shard_numel_;
    const int64_t valid = std::clamp<int64_t>(handle->numel_ - begin, 0, handle->shard_numel_);
    if (valid > 0) shard.narrow(0, 0, valid).copy_(flat.narrow(0, begin, valid));
    handle->flat_param_ = shard;
  } else {
    handle->shard_numel_ = handle->padded_numel_ = handle->numel_;
    handle->flat_param_ = flat.clone();
  }
  if (handle->gathers()) {
    handle->full_ = at::empty({handle->padded_numel_}, compute_options);
    handle->full_bytes_ = handle->full_.storage().nbytes();
    at::native::resize_bytes_cpu(handle->full_.storage().unsafeGetStorageImpl(), 0);
  }
  handle->flat_param_.set_requires_grad(any_requires_grad);
  handle->PointParamsAtShard();
  return handle;
}

ParamShard FlatParamHandle::ShardOf(size_t index, int rank) const {
  const FlatParamInfo& info = infos_[index];
  if (!sharded()) return ParamShard{0, info.offset, info.numel};
  const int64_t begin = static_cast<int64_t>(rank) * shard_numel_;
  const int64_t lo = std::max(begin, info.offset);
  const int64_t hi = std::min(begin + shard_numel_, info.offset + info.numel);
  if (hi <= lo) return ParamShard{};
  return ParamShard{lo - info.offset, lo - begin, hi - lo};
}

std::string FlatParamHandle::Describe() const {
  return absl::StrJoin(infos_, ", ", [](std::string* out, const FlatParamInfo& info) {
    absl::StrAppend(out, info.fqns.empty() ? std::string("<unnamed>") : info.fqns[0]);
  });
}

int64_t FlatParamHandle::full_buffer_bytes() const {
  if (!gathers()) return 0;
  return static_cast<int64_t>(full_.storage().nbytes());
}

void FlatParamHandle::PointParamsAtShard() {
  at::Tensor shard = flat_param_.detach();
  for (size_t i = 0; i < params_.size(); ++i) {
    if (!sharded()) {
      // NO_SHARD: views of the whole flat parameter, with their shapes.
      const FlatParamInfo& info = infos_[i];
      params_[i].set_data(shard.narrow(0, info.offset, info.numel).view(info.shape));
    } else if (use_orig_params_) {
      const ParamShard local = ShardOf(i, rank());
      params_[i].set_data(shard.narrow(0, local.shard_offset, local.numel));
    } else {
      params_[i].set_data(at::empty({0}, shard.options()));
    }
  }
}

FlatParamHandle::~FlatParamHandle() {
  // The gather writes into full_: let it end (its deadline bounds the wait).
  if (pending_ != nullptr) (void)WaitForPendingGather();
}

void FlatParamHandle::FreeFullBuffer() {
  at::native::resize_bytes_cpu(full_.storage().unsafeGetStorageImpl(), 0);
}

absl::Status FlatParamHandle::WaitForPendingGather() {
  const absl::Status status = pending_->Wait();
  pending_.reset();
  if (!status.ok()) {
    // The Work keeps the old storage alive for as long as the gather may write into it.
    full_ = at::empty({padded_numel_}, full_.options());
    FreeFullBuffer();
  }
  return status;
}

absl::Status FlatParamHandle::Prefetch() {
  if (!sharded() || unsharded_ || pending_ != nullptr) return absl::OkStatus();
  FSDP_RETURN_IF_ERROR(deferred_error_);
  at::native::resize_bytes_cpu(full_.storage().unsafeGetStorageImpl(), full_bytes_);
  at::Tensor shard = flat_param_.detach();
  // Mixed precision: cast, then gather in param_dtype; the Work keeps the cast copy alive.
  if (uses_low_precision_params()) shard = shard.to(compute_dtype_);
  auto work = group_->AllGatherIntoTensorAsync(full_, shard);
  if (!work.ok()) {
    FreeFullBuffer();
    return Annotate(work.status(), absl::StrCat("prefetching flat parameter [", Describe(), "]"));
  }
  pending_ = *std::move(work);
  return absl::OkStatus();
}

absl::Status FlatParamHandle::Unshard() {
  if (!gathers() || unsharded_) return absl::OkStatus();
  const std::string context = absl::StrCat("unsharding flat parameter [", Describe(), "]");
  if (!deferred_error_.ok()) return Annotate(deferred_error_, context);
  if (pending_ != nullptr) {
    FSDP_RETURN_IF_ERROR(WaitForPendingGather(), context);
  } else {
    at::native::resize_bytes_cpu(full_.storage().unsafeGetStorageImpl(), full_bytes_);
    // Mixed precision: cast, then gather in param_dtype (FSDP1's `_use_low_precision_shard`).
    at::Tensor shard = flat_param_.detach();
    if (uses_low_precision_params()) shard = shard.to(compute_dtype_);
    if (sharded()) {
      FSDP_RETURN_IF_ERROR(group_->AllGatherIntoTensor(full_, shard), context);
    } else {
      full_.copy_(shard);
    }
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    const FlatParamInfo& info = infos_[i];
    params_[i].set_data(full_.narrow(0, info.offset, info.numel).view(info.shape));
  }
  unsharded_ = true;
  return absl::OkStatus();
}

void FlatParamHandle::Reshard() {
  if (pending_ != nullptr) {
    absl::Status status = WaitForPendingGather();
    if (!status.ok()) deferred_error_ = status;
    FreeFullBuffer();
    return;
  }
  if (!unsharded_) return;
  PointParamsAtShard();
  FreeFullBuffer();
  unsharded_ = false;
}

void FlatParamHandle::StashGradients() {
  if (!use_orig_params_) return;
  for (size_t i = 0; i < params_.size(); ++i) {
    if (params_[i].grad().defined()) {
      stashed_grads_[i] = params_[i].grad();
      params_[i].mutable_grad() = at::Tensor();
    }
  }
}

at::Tensor FlatParamHandle::FlattenGradients(bool reuse_full) {
  // Filled gap by gap rather than zeroed first: every element is written once.
  at::Tensor full_grad =
      reuse_full ? full_.detach()
                 : at::empty({padded_numel_}, flat_param_.options().dtype(compute_dtype_));
  int64_t written = 0;  // elements [0, written) are filled
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor& grad = params_[i].mutable_grad();
    if (!grad.defined()) continue;
    const FlatParamInfo& info = infos_[i];
    if (info.offset > written) full_grad.narrow(0, written, info.offset - written).zero_();
    full_grad.narrow(0, info.offset, info.numel).copy_(grad.reshape({-1}));
    written = std::max(written, info.offset + info.numel);
    grad = at::Tensor();
  }
  if (written < padded_numel_) full_grad.narrow(0, written, padded_numel_ - written).zero_();
  return full_grad;
}

absl::Status FlatParamHandle::ReduceGradients() { return ReduceGradientsInto(false); }

absl::Status FlatParamHandle::ReduceGradientsAndReshard() {
  // Only a gathered buffer in the gradients' dtype, with no gather writing into it, outside
  // no_sync (which keeps the unsharded gradient past the reshard).
  const bool reuse = sharded() && unsharded_ && pending_ == nullptr && sync_gradients_ &&
                     full_.scalar_type() == compute_dtype_ && full_.numel() == padded_numel_;
  const absl::Status status = ReduceGradientsInto(reuse);
  Reshard();
  return status;
}

absl::Status FlatParamHandle::ReduceGradientsInto(bool reuse_full) {
  at::NoGradGuard no_grad;
  bool any_grad = false;
  for (const at::Tensor& p : params_) any_grad |= p.grad().defined();
  const bool no_shard_flat = !sharded() && !use_orig_params_;
  if (!any_grad && (!sync_gradients_ || !unreduced_.defined())) {
    // No parameter of this unit took part in the backward pass (and, outside no_sync, none
    // is waiting to be reduced): like PyTorch's flat parameter, it gets no gradient (and so no
    // optimizer state).
    if (use_orig_params_ && sync_gradients_) {
      for (size_t i = 0; i < params_.size(); ++i) {
        if (stashed_grads_[i].defined()) params_[i].mutable_grad() = stashed_grads_[i];
        stashed_grads_[i] = at::Tensor();
      }
    }
    return absl::OkStatus();
  }
  // In the gradients' own dtype (compute_dtype()): no_sync accumulates in it, as autograd
  // accumulates PyTorch's unsharded gradient.
  at::Tensor full_grad = FlattenGradients(reuse_full);
  if (!sync_gradients_) {
    // no_sync: kept local and unreduced, added to what earlier passes left, in the order
    // autograd accumulates PyTorch's unsharded gradient (earlier + this pass). NO_SHARD keeps
    // it in the flat parameter's gradient, as PyTorch's does.
    at::Tensor& sum = no_shard_flat ? flat_param_.mutable_grad() : unreduced_;
    if (sum.defined()) {
      sum.add_(full_grad);
    } else {
      sum = full_grad;
    }
    return absl::OkStatus();
  }
  if (unreduced_.defined()) {
    full_grad = unreduced_.add_(full_grad);
    unreduced_ = at::Tensor();
  }
  // Averaged over the group as PyTorch FSDP1 averages (gradient_divide.h): divided by the
  // predivide factor (the padded buffer, as PyTorch's `_reduce_grad`), summed, and the result
  // divided by the postdivide factor.
  // Mixed precision: in reduce_dtype, cast back to the flat parameter's dtype after the
  // postdivide (FSDP1's `_post_backward_hook` and `_cast_grad_to_param_dtype`).
  const at::ScalarType flat_dtype = flat_param_.scalar_type();
  at::Tensor shard_grad;
  if (sharded()) {
    full_grad = full_grad.to(reduce_dtype_);
    DivideIfNeeded(full_grad, divide_.predivide);
    shard_grad = at::empty({shard_numel_}, full_grad.options());
    FSDP_RETURN_IF_ERROR(group_->ReduceScatterTensor(shard_grad, full_grad, comm::ReduceOp::kSum),
                         absl::StrCat("reducing gradients of flat parameter [", Describe(), "]"));
    if (replicate_group_ != nullptr) {
      FSDP_RETURN_IF_ERROR(replicate_group_->AllReduce(shard_grad, comm::ReduceOp::kSum),
                           absl::StrCat("all-reducing gradients of flat parameter [", Describe(),
                                        "] over its replicas"));
    }
    DivideIfNeeded(shard_grad, divide_.postdivide);
    shard_grad = shard_grad.to(flat_dtype);
  } else {
    // NO_SHARD: PyTorch's flat parameter keeps its gradient between backward passes and
    // autograd adds the new one to it, so a gradient already there is reduced again with the
    // new one (`_reduce_grad_no_shard` divides and all-reduces flat_param.grad as it is).
    if (!use_orig_params_ && flat_param_.grad().defined()) {
      full_grad = flat_param_.grad().add_(full_grad);
    }
    if (use_orig_params_) {
      for (size_t i = 0; i < params_.size(); ++i) {
        if (!stashed_grads_[i].defined()) continue;
        // The earlier gradient's dtype (the parameter's): added as autograd would add.
        if (full_grad.scalar_type() != flat_dtype) full_grad = full_grad.to(flat_dtype);
        full_grad.narrow(0, infos_[i].offset, infos_[i].numel)
            .add_(stashed_grads_[i].reshape({-1}));
        stashed_grads_[i] = at::Tensor();
      }
    }
    full_grad = full_grad.to(reduce_dtype_);
    DivideIfNeeded(full_grad, divide_.predivide);
    FSDP_RETURN_IF_ERROR(group_->AllReduce(full_grad, comm::ReduceOp::kSum),
                         absl::StrCat("reducing gradients of flat parameter [", Describe(), "]"));
    DivideIfNeeded(full_grad, divide_.postdivide);
    shard_grad = full_grad.to(flat_dtype);
  }
  if (!use_orig_params_) {
    at::Tensor& flat_grad = flat_param_.mutable_grad();
    if (flat_grad.defined() && sharded()) {
      flat_grad.add_(shard_grad);
    } else {
      flat_grad = shard_grad;
    }
    return absl::OkStatus();
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor stash = std::move(stashed_grads_[i]);
    stashed_grads_[i] = at::Tensor();
    if (!params_[i].requires_grad()) continue;
    const ParamShard local = ShardOf(i, rank());
    if (local.numel == 0) continue;
    // Each parameter owns its gradient (not a view of the flat one): optimizers detach and
    // zero gradients in place, which autograd refuses on views.
    at::Tensor grad = shard_grad.narrow(0, local.shard_offset, local.numel);
    grad = (sharded() ? grad : grad.view(infos_[i].shape)).clone();
    if (stash.defined()) grad.add_(stash);
    params_[i].mutable_grad() = grad;
  }
  return absl::OkStatus();
}

absl::StatusOr<at::Tensor> FlatParamHandle::GatherFullFlat() {
  at::NoGradGuard no_grad;
  if (!sharded()) return flat_param_.detach().clone();
  // The gathered parameters are a low-precision copy under mixed precision: gather the shards.
  if (unsharded_ && !uses_low_precision_params()) return full_.narrow(0, 0, numel_).clone();
  at::Tensor out = at::empty({padded_numel_}, flat_param_.options());
  FSDP_RETURN_IF_ERROR(group_->AllGatherIntoTensor(out, flat_param_.detach()),
                       absl::StrCat("gathering flat parameter [", Describe(), "]"));
  return out.narrow(0, 0, numel_);
}

}  // namespace fsdp
