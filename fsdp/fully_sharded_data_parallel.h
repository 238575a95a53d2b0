// FullyShardedDataParallel: wraps a LibTorch module so that its parameters, gradients and
// (through the optimizer that owns the flat shards) optimizer state are sharded across the
// ranks of a process group, with PyTorch FSDP's semantics.
//
//   auto fsdp = fsdp::FullyShardedDataParallel::Wrap(
//       model, group, {.sharding_strategy = fsdp::ShardingStrategy::kFullShard,
//                      .nested = {&model->block1, &model->block2}});
//   torch::optim::Adam optim(fsdp.value()->parameters(), 1e-3);
//   auto loss = fsdp.value()->forward(x).sum();
//   loss.backward();        // gradients are reduce-scattered as units finish
//   optim.step();
//
// Units. Every slot in `nested` (a ModuleSlot inside the model, see module_slot.h) becomes its
// own FSDP unit, and, unless `wrap_root` is false, the model itself is the root unit. A unit
// manages the parameters of its module's subtree that no nested unit claims (units claim
// inside-out, as PyTorch wraps them) and that are not in an ignored module. Without a root
// unit, parameters outside every unit stay ordinary local parameters ("unmanaged", as in
// PyTorch's model-parallel tests): FSDP neither shards nor synchronizes them.
//
// Forward and backward. A unit all-gathers its flat parameter before its module's forward and
// makes the original parameters views of it. FULL_SHARD frees it again after the forward
// (except the root's) and gathers it anew when the backward pass reaches the unit (a hook on
// the forward's output); SHARD_GRAD_OP keeps it until the end of backward; NO_SHARD never
// shards and all-reduces gradients. Gradients are reduce-scattered, averaged over ranks, as
// soon as all of a unit's parameters have theirs, and at the end of the backward pass for the
// rest. Names (FQNs) are those of the unwrapped model: wrapping never renames anything.
//
// Mixed precision (`FsdpOptions::mixed_precision`, mixed_precision.h): units gather their
// parameters in param_dtype and reduce gradients in reduce_dtype, while the flat shards, the
// gradients the optimizer sees, the optimizer state and every state dict stay in the
// parameters' dtype; floating-point buffers are kept in buffer_dtype and saved in their own.
//
// HYBRID_SHARD shards each unit over the group given to Wrap and replicates it over
// `FsdpOptions::replicate_group`: gradients are reduce-scattered inside the shard group, then
// all-reduced across the replicas. State dicts and rank0_only refer to the shard group, as in
// PyTorch FSDP1 (each shard group's rank 0 holds a full dict).
//
// Prefetching (`backward_prefetch`, `forward_prefetch`, `limit_all_gathers`, PyTorch FSDP1's):
// a unit starts the all-gather of the unit that runs after it (an asynchronous gather on the
// group's communication thread, comm/work.h) so that it proceeds while this unit computes. The
// "next" unit comes from the execution order: the order in which units began their forward in
// the first forward pass (forward prefetch: the next one), and the order in which they ended
// it in this iteration (backward prefetch: the one before, as backward runs in reverse), as
// FSDP1's _ExecOrderData records them. BACKWARD_PRE issues it in a unit's pre-backward hook,
// after its own gather and before its gradients are computed; BACKWARD_POST once its gradients
// are there, before they are reduce-scattered; forward prefetch after a unit's own gather in
// its pre-forward. Gathered bytes are those of a blocking gather, so results are bit for bit
// those without prefetching. A prefetched gather that no unit used (the execution order
// changed) is waited for and dropped at the end of the backward pass, or of a forward of the
// root with no backward.
//
// Preconditions: every rank builds the same model with the same initial values (same seed)
// and wraps it with the same options; the model is on the CPU; parameters of one unit share
// a floating dtype. Between a forward and its backward, do not read the original parameters
// of a resharded unit in non-use_orig_params mode (they hold no data, as in PyTorch).
//
// Deferred initialisation (deferred_init.h, FsdpOptions::param_init_fn): parameters and buffers
// may be meta tensors; units are then materialised, and sharded, one at a time, inside-out.
//
// Errors (from Wrap): deferred_init.h's for meta models; INVALID_ARGUMENT for a nested slot whose
// module is not inside the model or is ignored, a unit with mixed dtypes, a null group, a hybrid
// strategy without a replicate group (or another strategy with one); collective errors as
// comm::ProcessGroup's. forward()/backward() throw c10::Error carrying the status message when
// a collective fails (the LibTorch edge).
#ifndef FSDP_CPP_FSDP_FULLY_SHARDED_DATA_PARALLEL_H_
#define FSDP_CPP_FSDP_FULLY_SHARDED_DATA_PARALLEL_H_

#include <torch/nn/module.h>

#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/process_group.h"
#include "fsdp/deferred_init.h"
#include "fsdp/flat_param.h"
#include "fsdp/mixed_precision.h"
#include "fsdp/module_slot.h"

namespace fsdp {

// PyTorch's BackwardPrefetch (None is kNone).
enum class BackwardPrefetch { kNone, kBackwardPre, kBackwardPost };

// "NONE", "BACKWARD_PRE", "BACKWARD_POST".
absl::string_view BackwardPrefetchName(BackwardPrefetch prefetch);

// What prefetching did (FullyShardedDataParallel::prefetch_stats()): counters, and, while
// recording is on, each hook and gather in order, by unit index (units() order).
struct PrefetchEvent {
  enum class Kind {
    kPreForward,    // `unit` gathered (or took its prefetched gather) before its forward
    kPreBackward,   // `unit` gathered before its gradients are computed
    kPostBackward,  // `unit`'s gradients are all there, before they are reduced
    kPrefetch,      // `unit`'s gather issued ahead, by `by_unit`'s hook
    kLimitWait,     // limit_all_gathers: `unit`'s pending gather awaited before another issue
  };
  Kind kind;
  int unit;
  int by_unit = -1;
};

struct PrefetchStats {
  int64_t gathers_issued_ahead = 0;   // asynchronous gathers issued by prefetching
  int64_t limit_waits = 0;            // gathers awaited early by limit_all_gathers
  int max_in_flight = 0;              // most prefetched gathers pending at once
  std::vector<PrefetchEvent> events;  // only while recording (RecordPrefetchEvents)
};

struct FsdpOptions {
  ShardingStrategy sharding_strategy = ShardingStrategy::kFullShard;
  // The optimizer sees the original parameters, each holding this rank's slice.
  bool use_orig_params = false;
  // Slots inside the model to wrap as their own units, in any order.
  std::vector<ModuleSlot*> nested;
  // Make the model itself a unit (PyTorch's outermost FSDP(model)).
  bool wrap_root = true;
  // Modules whose parameters FSDP leaves alone (kept whole and local on every rank).
  std::vector<std::shared_ptr<torch::nn::Module>> ignored_modules;
  // PyTorch's `mixed_precision=MixedPrecision(...)`; unset dtypes: full precision.
  MixedPrecision mixed_precision;
  // HYBRID_SHARD / _HYBRID_SHARD_ZERO2 only (and required by them): the group over which this
  // rank's shard is replicated; the group given to Wrap is then the shard group. PyTorch's
  // `process_group=(shard_group, replicate_group)`; MakeHybridShardGroups (hybrid_shard.h)
  // builds both as `init_device_mesh(("replicate", "shard"))` lays them out.
  std::shared_ptr<comm::ProcessGroup> replicate_group;
  // PyTorch's sync_module_states: before sharding, rank 0's parameters and buffers (ignored
  // modules' aside) are broadcast over the group (and, under HYBRID_SHARD, then over the
  // replicate group), so ranks may build the model with different values.
  bool sync_module_states = false;
  // PyTorch's backward_prefetch: when the backward pass gathers the next unit's parameters
  // ahead (see the top). PyTorch's default.
  BackwardPrefetch backward_prefetch = BackwardPrefetch::kBackwardPre;
  // PyTorch's forward_prefetch: a unit's pre-forward issues the next unit's gather.
  bool forward_prefetch = false;
  // PyTorch's limit_all_gathers: at most two prefetched gathers in flight (FSDP1's rate
  // limiter, _limiter_utils.py); a third first waits for the oldest. With one unit prefetched
  // ahead (FSDP1's limits) at most one is in flight, so the bound holds as it is.
  bool limit_all_gathers = true;
  // PyTorch's param_init_fn, for models built on the meta device (deferred_init.h): each unit
  // whose tensors are meta is materialised just before it is sharded, by calling this on each of
  // its modules (breadth-first); without it, by ToEmpty + reset_parameters() per module. A rank
  // holds at most its shards plus one full unit (and that unit's flattened copy while it is
  // sharded). With sync_module_states, rank 0's values are broadcast unit by unit, after each
  // unit's materialisation.
  ParamInitFn param_init_fn;
};

class FsdpUnit;
struct FsdpBackwardState;

class FullyShardedDataParallel {
 public:
  template <typename ModuleType>
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<FullyShardedDataParallel>> Wrap(
      torch::nn::ModuleHolder<ModuleType> model, std::shared_ptr<comm::ProcessGroup> group,
      FsdpOptions options = {}) {
    std::shared_ptr<torch::nn::Module> module = model.ptr();
    return WrapSlot(ModuleSlot(std::move(model)), std::move(module), std::move(group),
                    std::move(options));
  }
  template <typename ModuleType>
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<FullyShardedDataParallel>> Wrap(
      std::shared_ptr<ModuleType> model, std::shared_ptr<comm::ProcessGroup> group,
      FsdpOptions options = {}) {
    std::shared_ptr<torch::nn::Module> module = model;
    return WrapSlot(ModuleSlot(std::move(model)), std::move(module), std::move(group),
                    std::move(options));
  }

  ~FullyShardedDataParallel();

  template <typename... Args>
  torch::Tensor forward(Args&&... args) {
    return root_slot_.forward(std::forward<Args>(args)...);
  }

  // The tensors an optimizer should own, in PyTorch FSDP's order (a pre-order walk of the
  // modules): each unit's flat parameter at its module's place, and the parameters FSDP does
  // not manage at theirs. With use_orig_params: the original parameters in registration order.
  // Given a module of the model, only those of its subtree: what PyTorch's
  // `fsdp_model.block1.parameters()` returns, for optimizer parameter groups.
  std::vector<at::Tensor> parameters(const torch::nn::Module* subtree = nullptr) const;

  // The units' flat parameter handles, in pre-order of their modules; with the FQN prefix of
  // each unit's module ("" for the root, "block1." ...).
  struct UnitView {
    std::string module_prefix;
    FlatParamHandle* handle;  // null for a unit that manages no parameter
  };
  std::vector<UnitView> units() const;

  // Original parameters that no unit manages (outside every unit, or ignored), with FQNs.
  std::vector<std::pair<std::string, at::Tensor>> unmanaged_parameters() const;

  torch::nn::Module& module() const { return *module_; }
  const std::shared_ptr<comm::ProcessGroup>& group() const { return group_; }
  const FsdpOptions& options() const { return options_; }
  // The dtype a state dict holds `buffer` in: its dtype before mixed precision's buffer_dtype
  // cast it, else its own.
  at::ScalarType StateDictDtype(const at::Tensor& buffer) const;
  // Model state dicts (full and sharded, saving and loading) are in fsdp/state_dict.h.

  // What prefetching did since Wrap (or the last ResetPrefetchStats); events only while
  // RecordPrefetchEvents(true).
  const PrefetchStats& prefetch_stats() const;
  void ResetPrefetchStats();
  void RecordPrefetchEvents(bool record);

 private:
  FullyShardedDataParallel() = default;
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<FullyShardedDataParallel>> WrapSlot(
      ModuleSlot root_slot, std::shared_ptr<torch::nn::Module> module,
      std::shared_ptr<comm::ProcessGroup> group, FsdpOptions options);

  ModuleSlot root_slot_;
  std::shared_ptr<torch::nn::Module> module_;
  std::shared_ptr<comm::ProcessGroup> group_;
  FsdpOptions options_;
  std::shared_ptr<FsdpBackwardState> state_;
  // Units in pre-order of their modules, with their module prefixes.
  std::vector<std::shared_ptr<FsdpUnit>> units_;
  std::vector<std::string> unit_prefixes_;
  std::vector<torch::nn::Module*> unit_modules_;
  // Buffers cast to buffer_dtype, with their original dtypes.
  std::unordered_map<const c10::TensorImpl*, at::ScalarType> buffer_dtypes_;
};

// PyTorch's `with model.no_sync():` as a scope: while a NoSyncGuard lives, backward passes
// accumulate each unit's unsharded gradient locally, with no communication (parameters still
// reshard as usual); the first backward after the guard is gone reduces that sum together with
// its own gradient. Meanwhile the parameters hold no gradient (NO_SHARD without use_orig_params:
// the flat parameter's gradient holds the unreduced sum, as PyTorch's), so step the optimizer
// only after that backward. Each unsharded gradient costs a full unit's memory per rank, as in
// PyTorch. Guards may nest; each restores what it found.
class NoSyncGuard {
 public:
  explicit NoSyncGuard(FullyShardedDataParallel& fsdp);
  ~NoSyncGuard();
  NoSyncGuard(const NoSyncGuard&) = delete;
  NoSyncGuard& operator=(const NoSyncGuard&) = delete;

 private:
  std::vector<std::pair<FlatParamHandle*, bool>> previous_;
};

}  // namespace fsdp

#endif  // FSDP_CPP_FSDP_FULLY_SHARDED_DATA_PARALLEL_H_
