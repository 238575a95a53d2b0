// FlatParamHandle: one FSDP unit's parameters flattened into one padded flat tensor, of which
// this rank keeps 1/N.
//
// Layout. The unit's original parameters (unique tensors, in the order given) are laid end to
// end in a flat tensor of `numel()` elements, padded with zeros to `padded_numel()`, a multiple
// of the group size N, and cut into N equal shards of `shard_numel()` elements; rank r keeps
// shard r. `ParamShard` says which part of each original parameter lies in a rank's shard.
// Under NO_SHARD the "shard" is the whole unpadded flat tensor.
//
// Life cycle:
//   * Sharded (the resting state): `flat_param()` holds this rank's shard. Original parameters
//     hold nothing (shape [0]), or, with use_orig_params, their 1-D slice of the shard (a view
//     that an optimizer updates in place; possibly empty).
//   * Unshard(): all-gathers the shards into the padded full buffer and makes every original
//     parameter a view of it with its own shape, keeping its identity (so modules, saved
//     autograd state and user handles see the full values). With a mixed-precision
//     param_dtype the shard is cast to it first, so the gathered parameters (and the gradients
//     computed from them) have that dtype; NO_SHARD then "unshards" into a cast copy too.
//   * ReduceGradients(): flattens the original parameters' gradients (zeros where a parameter
//     has none), reduce-scatters them averaged over ranks, and gives the shard's gradient to
//     `flat_param()` (or each original parameter its slice, with use_orig_params). Gradients
//     already there are accumulated into, as autograd would. The average is PyTorch FSDP1's,
//     to the bit: divided by GradientDivideFactors' predivide before the sum-reduction and by
//     its postdivide after it (gradient_divide.h); the hybrid strategies all-reduce the
//     reduce-scattered shard over the replica group before the postdivide, and divide by the
//     factors of both groups' ranks together, as FSDP1 does. Under NO_SHARD, as in PyTorch, a
//     gradient already there is added to the new one before the all-reduce, not after. With mixed
//     precision the gradients are cast to the reduce dtype for the reduction and the division
//     and back to the flat parameter's dtype after it, as FSDP1's `_reduce_grad` does.
//   * Reshard(): frees the full buffer's storage (every view of it loses its memory) and
//     returns to the resting state.
//   * Prefetch() (FSDP's backward_prefetch / forward_prefetch): starts the all-gather that
//     Unshard() would do (cast first under mixed precision) without waiting for it
//     (comm::ProcessGroup::AllGatherIntoTensorAsync); the next Unshard() waits for it instead of
//     gathering. Reshard() with a gather pending waits for it and frees the buffer (a gather
//     cannot be taken back once the peers take part in it); so does the destructor. The
//     gathered bytes are those of a blocking gather, so prefetching never changes a result.
//     NO_SHARD has nothing to gather across ranks: Prefetch() does nothing and Unshard() casts.
//
// Preconditions: all parameters are CPU tensors of one floating dtype, identical on every rank
// (same seed), and every rank of the group creates its handles in the same order.
// Errors: INVALID_ARGUMENT (no parameters, mixed dtypes, non-CPU tensors, duplicates, a hybrid
// strategy without a replicate group or another strategy with one);
// collective errors from comm::ProcessGroup, annotated with the handle's FQNs.
#ifndef FSDP_CPP_FSDP_FLAT_PARAM_H_
#define FSDP_CPP_FSDP_FLAT_PARAM_H_

#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/process_group.h"
#include "fsdp/gradient_divide.h"
#include "fsdp/mixed_precision.h"

namespace fsdp {

// PyTorch's ShardingStrategy. The hybrid strategies shard over the handle's group and
// replicate over a second group (FULL_SHARD / SHARD_GRAD_OP inside, DDP-like across).
enum class ShardingStrategy { kFullShard, kShardGradOp, kNoShard, kHybridShard, kHybridShardZero2 };

// Whether `strategy` frees gathered parameters after the forward (FULL_SHARD, HYBRID_SHARD).
bool ReshardsAfterForward(ShardingStrategy strategy);
bool IsHybrid(ShardingStrategy strategy);

absl::string_view ShardingStrategyName(ShardingStrategy strategy);

// One original parameter of a flat parameter.
struct FlatParamEntry {
  // Every name under which the parameter is registered (a shared parameter has several), the
  // first being its canonical FQN.
  std::vector<std::string> fqns;
  at::Tensor param;
};

// The part of one original parameter that lies in one rank's shard: elements
// [param_offset, param_offset + numel) of the flattened parameter sit at
// [shard_offset, shard_offset + numel) of the shard. numel == 0 when none does.
struct ParamShard {
  int64_t param_offset = 0;
  int64_t shard_offset = 0;
  int64_t numel = 0;
};

// Metadata of one original parameter inside the flat tensor.
struct FlatParamInfo {
  std::vector<std::string> fqns;
  std::vector<int64_t> shape;
  int64_t numel = 0;
  int64_t offset = 0;  // in the (unpadded) flat tensor
  bool requires_grad = true;
};

class FlatParamHandle {
 public:
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<FlatParamHandle>> Create(
      std::vector<FlatParamEntry> params, std::shared_ptr<comm::ProcessGroup> group,
      ShardingStrategy strategy, bool use_orig_params, const MixedPrecision& mixed_precision = {},
      std::shared_ptr<comm::ProcessGroup> replicate_group = nullptr);

  ~FlatParamHandle();
  FlatParamHandle(const FlatParamHandle&) = delete;
  FlatParamHandle& operator=(const FlatParamHandle&) = delete;

  // --- layout ---
  const std::vector<FlatParamInfo>& infos() const { return infos_; }
  int64_t numel() const { return numel_; }
  int64_t padded_numel() const { return padded_numel_; }
  int64_t shard_numel() const { return shard_numel_; }
  int world_size() const { return sharded() ? group_->size() : 1; }
  int rank() const { return sharded() ? group_->rank() : 0; }
  bool sharded() const { return strategy_ != ShardingStrategy::kNoShard; }
  ShardingStrategy strategy() const { return strategy_; }
  bool use_orig_params() const { return use_orig_params_; }
  const std::shared_ptr<comm::ProcessGroup>& group() const { return group_; }
  // The hybrid strategies' replica group (the same shard on every member); null otherwise.
  const std::shared_ptr<comm::ProcessGroup>& replicate_group() const { return replicate_group_; }
  // The dtype of the gathered parameters and their gradients (mixed precision's param_dtype,
  // else the flat parameter's), and the dtype gradients are reduced in.
  at::ScalarType compute_dtype() const { return compute_dtype_; }
  at::ScalarType reduce_dtype() const { return reduce_dtype_; }
  // Whether Unshard() casts: then even NO_SHARD gathers into a buffer of its own.
  bool uses_low_precision_params() const { return compute_dtype_ != flat_param_.scalar_type(); }
  // Which part of parameter `index` lies in shard `rank` (any rank, not only this one).
  ParamShard ShardOf(size_t index, int rank) const;
  // "a.weight, a.bias" (canonical FQNs), for messages.
  std::string Describe() const;

  // --- tensors ---
  // This rank's shard (NO_SHARD: the full flat tensor): the leaf an optimizer updates unless
  // use_orig_params. Its identity never changes.
  const at::Tensor& flat_param() const { return flat_param_; }
  // The original parameters, in layout order (identities as given to Create).
  const std::vector<at::Tensor>& params() const { return params_; }
  bool is_unsharded() const { return unsharded_; }
  // Bytes currently held by the padded full buffer (0 when resharded).
  int64_t full_buffer_bytes() const;

  // Waits for a prefetched gather if one is pending, else gathers.
  [[nodiscard]] absl::Status Unshard();
  // Errors: INVALID_ARGUMENT from issuing the gather; a failed gather is Unshard()'s error.
  [[nodiscard]] absl::Status Prefetch();
  bool has_pending_gather() const { return pending_ != nullptr; }
  // With a gather pending: waits for it, frees the buffer; an error it ended with is returned
  // by the next Unshard() (the group is broken then).
  void Reshard();
  // Moves gradients that original parameters hold between steps (use_orig_params: their shard
  // slices) aside before a backward pass, to be added back by ReduceGradients.
  void StashGradients();
  [[nodiscard]] absl::Status ReduceGradients();
  // ReduceGradients() then Reshard() (FSDP's post-backward). The unsharded gradient is built
  // in the gathered buffer, which is freed right after anyway, instead of in a new buffer of
  // the same size: one fresh allocation of the unit's size (and its page faults) fewer per
  // backward pass. The parameters' values are overwritten first, so nothing may read them
  // after their gradients are computed (as after Reshard(), which frees them).
  [[nodiscard]] absl::Status ReduceGradientsAndReshard();
  // PyTorch's no_sync: while false, ReduceGradients keeps this pass's unsharded gradient
  // locally (added to the earlier passes'), reduces nothing and leaves the parameters without
  // a gradient (NO_SHARD without use_orig_params: in flat_param()'s gradient); the first
  // ReduceGradients after it is true again reduces the sum with that pass's own gradient.
  void set_sync_gradients(bool sync) { sync_gradients_ = sync; }
  bool sync_gradients() const { return sync_gradients_; }

  // The full, unpadded flat tensor (a gather for sharded strategies); leaves the handle as it
  // was. For state dicts.
  [[nodiscard]] absl::StatusOr<at::Tensor> GatherFullFlat();

 private:
  FlatParamHandle() = default;
  void PointParamsAtShard();
  // Waits for the pending gather; on failure the buffer's storage stays with the gather (which
  // may still write into it) and full_ gets a fresh one.
  absl::Status WaitForPendingGather();
  void FreeFullBuffer();
  bool gathers() const { return sharded() || uses_low_precision_params(); }

  std::shared_ptr<comm::ProcessGroup> group_;
  std::shared_ptr<comm::ProcessGroup> replicate_group_;
  ShardingStrategy strategy_ = ShardingStrategy::kFullShard;
  bool use_orig_params_ = false;
  at::ScalarType compute_dtype_ = at::kFloat;
  at::ScalarType reduce_dtype_ = at::kFloat;
  GradientDivideFactors divide_;  // for the group's size
  std::vector<FlatParamInfo> infos_;
  std::vector<at::Tensor> params_;
  std::vector<at::Tensor> stashed_grads_;
  // ReduceGradients with the buffer the unsharded gradient is built in: `reuse_full` takes the
  // gathered buffer when it can (see ReduceGradientsAndReshard).
  [[nodiscard]] absl::Status ReduceGradientsInto(bool reuse_full);
  // The padded unsharded gradient: this pass's parameter gradients (taken from the
  // parameters), zeros everywhere else; in `full_` when `reuse_full`, else in a new buffer.
  at::Tensor FlattenGradients(bool reuse_full);

  bool sync_gradients_ = true;
  at::Tensor unreduced_;  // padded, unsharded: gradients held back by no_sync
  int64_t numel_ = 0;
  int64_t padded_numel_ = 0;
  int64_t shard_numel_ = 0;
  at::Tensor flat_param_;
  // Padded full buffer (sharded strategies; NO_SHARD with a low-precision param_dtype: the
  // cast copy), in compute_dtype(); storage freed when resharded.
  at::Tensor full_;
  int64_t full_bytes_ = 0;
  bool unsharded_ = false;
  std::shared_ptr<comm::Work> pending_;  // a prefetched gather into full_
  absl::Status deferred_error_;          // a pending gather's failure, seen by Reshard()
};

}  // namespace fsdp

#endif  // FSDP_CPP_FSDP_FLAT_PARAM_H_
