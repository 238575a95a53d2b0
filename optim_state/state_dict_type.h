// State-dict types for optimizer state: PyTorch FSDP's `StateDictType`,
// `FullOptimStateDictConfig`, `ShardedOptimStateDictConfig`,
// `set_state_dict_type` / `state_dict_type` and the `FSDP.optim_state_dict` /
// `FSDP.optim_state_dict_to_load` pair that follows them (PyTorch 2.0; 1.13 has
// only the model-state-dict half).
//
// Where the setting lives. PyTorch stores it on every FSDP module; here the
// caller owns a `StateDictSettings` value (one per FSDP model, or per
// checkpointing call site) and passes it to GetOptimStateDict /
// OptimStateDictToLoad. `SetStateDictType` changes it (returning the previous
// value) and `ScopedStateDictType` changes it for a scope, as PyTorch's `with
// FSDP.state_dict_type(model, ...)`, restoring it on destruction.
//
//   StateDictSettings settings;  // FULL_STATE_DICT, rank0_only = false
//   {
//     ScopedStateDictType scoped(settings, StateDictType::kShardedStateDict);
//     FSDP_ASSIGN_OR_RETURN(OptimStateDict osd, GetOptimStateDict(*fsdp,
//     adapter, settings));
//     ... save osd; later, in a job of any world size ...
//     FSDP_RETURN_IF_ERROR(OptimStateDictToLoad(*fsdp, adapter, osd, settings,
//                                               {.load_directly =
//                                               true}).status());
//   }
//
// offload_to_cpu: tensors of this project are on the CPU already; the flag is
// kept for the API (PyTorch 2.0's default, true) and changes nothing.
//
// Preconditions: those of fsdp_optim_state.h (every rank calls these
// collectives with the same settings and wrapping; the adapter is over the
// optimizer of `fsdp.parameters()`).
#ifndef FSDP_CPP_OPTIM_STATE_STATE_DICT_TYPE_H_
#define FSDP_CPP_OPTIM_STATE_STATE_DICT_TYPE_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "comm/process_group.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "optim_state/optim_state_dict.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::optim_state {

// PyTorch's StateDictType (LOCAL_STATE_DICT has no optimizer-state form and is
// left out).
enum class StateDictType { kFullStateDict, kShardedStateDict };

// "FULL_STATE_DICT", "SHARDED_STATE_DICT".
std::string StateDictTypeName(StateDictType type);

struct FullOptimStateDictConfig {
  bool offload_to_cpu = true;
  // Only rank 0 returns the full dict (others an empty one); loading then
  // expects the dict on rank 0 only and scatters it.
  bool rank0_only = false;
};

struct ShardedOptimStateDictConfig {
  bool offload_to_cpu = true;
  // The dict's sharded values are this rank's own flat-shard pieces
  // (LocalShardedOptimStateDict, local_sharded_optim_state.h: views of the
  // optimizer's state, made with no communication, as FSDP2's) instead of
  // FSDP1's dim-0 chunks (ShardedOptimStateDict: a gather of the whole state,
  // then copies). Keys, param_groups and scalars are the same either way, and
  // loading takes both. With load_directly, the optimizer then adopts the
  // loaded tensors without a copy, as torch.optim's load_state_dict keeps the
  // dict's tensors (the returned dict shares them; a dict taken from another
  // live optimizer at this layout then shares that optimizer's memory, as in
  // PyTorch: clone it, CloneOptimStateDict, to keep the two apart).
  bool local_shards = false;
};

struct StateDictSettings {
  StateDictType state_dict_type = StateDictType::kFullStateDict;
  FullOptimStateDictConfig full_optim_config;
  ShardedOptimStateDictConfig sharded_optim_config;
};

// FSDP.set_state_dict_type: sets the type and that type's config; returns the
// previous settings.
StateDictSettings SetStateDictType(StateDictSettings& settings,
                                   StateDictType type);
StateDictSettings SetStateDictType(StateDictSettings& settings,
                                   const FullOptimStateDictConfig& config);
StateDictSettings SetStateDictType(StateDictSettings& settings,
                                   const ShardedOptimStateDictConfig& config);

// FSDP.state_dict_type as a scope: sets `settings` on construction and restores
// the previous value on destruction. Precondition: `settings` outlives the
// object.
class ScopedStateDictType {
 public:
  ScopedStateDictType(StateDictSettings& settings, StateDictType type)
      : settings_(settings), previous_(SetStateDictType(settings, type)) {}
  ScopedStateDictType(StateDictSettings& settings,
                      const FullOptimStateDictConfig& config)
      : settings_(settings), previous_(SetStateDictType(settings, config)) {}
  ScopedStateDictType(StateDictSettings& settings,
                      const ShardedOptimStateDictConfig& config)
      : settings_(settings), previous_(SetStateDictType(settings, config)) {}
  ~ScopedStateDictType() { settings_ = previous_; }
  ScopedStateDictType(const ScopedStateDictType&) = delete;
  ScopedStateDictType& operator=(const ScopedStateDictType&) = delete;

 private:
  StateDictSettings& settings_;
  StateDictSettings previous_;
};

// FSDP.optim_state_dict(model, optim, group) (named GetOptimStateDict because
// the type OptimStateDict owns the plain name): with kFullStateDict
// FullOptimStateDict (FQN keys; rank0_only per the config), with
// kShardedStateDict ShardedOptimStateDict (LocalShardedOptimStateDict with
// local_shards, not a collective). A collective over `group` (null:
// fsdp.group()). Errors: those of FullOptimStateDict / ShardedOptimStateDict
// (fsdp_optim_state.h).
[[nodiscard]] absl::StatusOr<OptimStateDict> GetOptimStateDict(
    FullyShardedDataParallel& fsdp, const OptimizerAdapter& adapter,
    const StateDictSettings& settings,
    std::shared_ptr<comm::ProcessGroup> group = nullptr);

// FSDP.optim_state_dict(model, optim, optim_state_dict=osd, group) (PyTorch 2.0): as above
// from `optim_state_dict`, the optimizer's own dict (possibly edited: extra entries such as
// PyTorch's test's `value1=2.74` are carried; a dict without param_groups gives one without),
// instead of adapter.StateDict(). As PyTorch's _is_named_optimizer, a dict whose first state
// key is a name is a named optimizer's (torchrec KeyedOptimizer style): its keys are this
// rank's parameter names as OptimStateDictToLoadOptions::is_named_optimizer describes them
// (an original or unmanaged parameter's FQN, a flat parameter's "<prefix>_flat_param"), in
// state and param_groups. The result is the same FQN-keyed dict either way.
// Errors: those above; INVALID_ARGUMENT "GetOptimStateDict: the named optimizer's dict has
// state key '<k>', which names none of the optimizer's parameters" (or a param_groups key);
// "<id> is not a parameter ID of the optimizer" for an ID past the optimizer's parameters.
[[nodiscard]] absl::StatusOr<OptimStateDict> GetOptimStateDict(
    FullyShardedDataParallel& fsdp, const OptimizerAdapter& adapter,
    const StateDictSettings& settings, const OptimStateDict& optim_state_dict,
    std::shared_ptr<comm::ProcessGroup> group = nullptr);

struct OptimStateDictToLoadOptions {
  // The optimizer is a named (torchrec KeyedOptimizer style) one: the returned
  // dict is keyed by this rank's parameter names instead of IDs (PyTorch 2.0's
  // _get_param_to_param_key): an original parameter (use_orig_params,
  // unmanaged) by its FQN, a flat parameter by its unit's module prefix +
  // "_flat_param" (PyTorch's FlatParameter name, e.g. "block1._flat_param",
  // "_flat_param" for the root).
  bool is_named_optimizer = false;
  // Also load the (ID-keyed) dict into `adapter`; nothing is loaded if any step
  // fails.
  bool load_directly = false;
  std::shared_ptr<comm::ProcessGroup> group;  // null: fsdp.group()
};

// FSDP.optim_state_dict_to_load(model, optim, osd, is_named_optimizer,
// load_directly, group): the dict this rank's optimizer loads from `osd`, a
// dict GetOptimStateDict made under the same type (possibly by another world
// size or wrapping): kFullStateDict shards it (ShardFullOptimStateDict; with
// rank0_only, ScatterFullOptimStateDict, reading `osd` on rank 0 only),
// kShardedStateDict flattens it (FlattenShardedOptimStateDict). A collective
// for scatter and flatten.
// Errors: those of the function used (fsdp_optim_state.h); the adapter's
// LoadStateDict errors with load_directly (prefixed "OptimStateDictToLoad: ");
// INVALID_ARGUMENT "OptimStateDictToLoad: the optimizer holds a parameter (ID
// <i>) FSDP does not know" for a named optimizer over foreign tensors.
[[nodiscard]] absl::StatusOr<OptimStateDict> OptimStateDictToLoad(
    FullyShardedDataParallel& fsdp, OptimizerAdapter& adapter,
    const OptimStateDict& osd, const StateDictSettings& settings,
    const OptimStateDictToLoadOptions& options = {});

}  // namespace fsdp::optim_state

#endif  // FSDP_CPP_OPTIM_STATE_STATE_DICT_TYPE_H_
