// OptimizerAdapter: PyTorch's `optim.state_dict()` and `optim.load_state_dict()` for
// LibTorch's torch::optim::Adam, AdamW, SGD, Adagrad and RMSprop, producing and consuming the
// dicts PyTorch 2.13's torch.optim does (optim_state_dict.h).
//
//   torch::optim::Adam adam(model->parameters(), torch::optim::AdamOptions(1e-3));
//   FSDP_ASSIGN_OR_RETURN(auto adapter, OptimizerAdapter::Create(adam));
//   ... loss.backward(); FSDP_RETURN_IF_ERROR(adapter.Step()); ...
//   FSDP_ASSIGN_OR_RETURN(OptimStateDict saved, adapter.StateDict());
//   FSDP_RETURN_IF_ERROR(other_adapter.LoadStateDict(saved));
//
// What the dicts hold (as PyTorch 2.13):
//   * Keys: parameter IDs 0, 1, ... numbered across param_groups in order. "state" lists only
//     parameters that have state, in the order they gained it.
//   * State names: Adam/AdamW `step`, `exp_avg`, `exp_avg_sq`, `max_exp_avg_sq` (amsgrad);
//     SGD `momentum_buffer` (only with momentum; a loaded None is kept); Adagrad `step`,
//     `sum`; RMSprop `step`, `square_avg`, `momentum_buffer` (momentum > 0), `grad_avg`
//     (centered). `step` is a zero-dim float32 tensor; LibTorch keeps it as an int64 and we
//     convert both ways.
//   * Hyper-parameters, in Python's order, with Python's defaults for what LibTorch lacks:
//       Adam    lr betas eps weight_decay amsgrad maximize foreach capturable differentiable fused
//               decoupled_weight_decay (False; True is refused: load it into AdamW)
//       AdamW   the same, decoupled_weight_decay=True
//       SGD     lr momentum dampening weight_decay nesterov maximize foreach differentiable fused
//       Adagrad lr lr_decay eps weight_decay initial_accumulator_value foreach maximize
//               differentiable fused
//       RMSprop lr momentum alpha eps centered weight_decay capturable foreach maximize
//               differentiable
//     Values LibTorch holds are read from the group's options at save time. Where Python's
//     default is an int (`weight_decay=0`, `momentum=0`, ...) an integral value is written as
//     an int, as Python would; `betas` is a tuple. A group built in C++ lists its
//     hyper-parameters in this default order (Python moves keys a group sets itself, other
//     than `lr`, to the front); after LoadStateDict, in the loaded order.
//
// The side table. A LibTorch optimizer cannot hold everything a PyTorch dict may carry, so the
// adapter keeps, next to it:
//   * per parameter, state entries LibTorch has no field for (e.g. PyTorch's test's
//     `value1=2.74`, `value2=None`, SGD's `momentum_buffer=None`) and the order of the
//     parameter's state names;
//   * per group, its hyper-parameters as last loaded (or Python's defaults), which supplies
//     the names LibTorch lacks (`maximize`, `foreach`, `initial_lr`, ...), their order and
//     whether a number was an int or a float;
//   * the order in which parameters gained state.
// Hence save -> load -> save returns the same dict. The side table is filled by Step(),
// LoadStateDict(), SetExtraState() and SetExtraHyperParam(); step through the adapter (not
// `optimizer.step()` directly) so that SGD's None buffers and the state order follow Python.
// Without that, parameters that gained state unseen are listed in param_groups order.
//
// Differences from PyTorch, all refusals of input Python would take and later trip over:
// a loaded dict must be keyed by parameter IDs and mention no ID outside its param_groups;
// `maximize=True` is refused (LibTorch cannot maximize); Adagrad needs state for every
// parameter. A dict with has_param_groups == false is accepted: its IDs are the optimizer's
// own and the hyper-parameters stay as they are. RMSprop's `step` is always saved as an int,
// Adam's as a float32 tensor, whatever was loaded.
//
// Tensors in a saved dict share storage with the optimizer's state (as in Python; use
// CloneOptimStateDict for a snapshot), except `step`, which is a new tensor. Loading copies
// every tensor (as Python's deepcopy), cast to its parameter's dtype and device.
//
// Preconditions: the optimizer outlives the adapter; parameters are not removed from it.
// Not thread-safe.
#ifndef FSDP_CPP_OPTIM_STATE_OPTIMIZER_ADAPTER_H_
#define FSDP_CPP_OPTIM_STATE_OPTIMIZER_ADAPTER_H_

#include <torch/optim/optimizer.h>

#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "optim_state/optim_state_dict.h"
#include "optim_state/optimizer_kind.h"

namespace fsdp::optim_state {

// OptimizerKind and OptimizerKindName ("Adam", "AdamW", ...): optimizer_kind.h.

class OptimizerAdapter {
 public:
  // Errors: INVALID_ARGUMENT if `optimizer` is not one of the five supported types.
  [[nodiscard]] static absl::StatusOr<OptimizerAdapter> Create(torch::optim::Optimizer& optimizer);

  OptimizerKind kind() const { return kind_; }
  torch::optim::Optimizer& optimizer() const { return *optimizer_; }

  // `optim.step()`: runs the optimizer's step and records what Python would (SGD's None
  // momentum buffers, the order in which parameters gain state).
  // Errors: LibTorch's exceptions as INTERNAL (CallTorch).
  [[nodiscard]] absl::Status Step();

  // `optim.state_dict()`.
  // Errors: LibTorch's exceptions as INTERNAL.
  [[nodiscard]] absl::StatusOr<OptimStateDict> StateDict() const;

  // `optim.load_state_dict(state_dict)`: replaces every parameter's state and (unless
  // !state_dict.has_param_groups) every group's hyper-parameters. Parameters map to the
  // dict's IDs by position: the j-th ID of the dict's group g is the optimizer's group g's
  // j-th parameter. Everything is checked before anything changes: on error the optimizer
  // and the side table are as they were.
  // Errors (INVALID_ARGUMENT, prefixed "LoadStateDict (<optimizer>): "):
  //   * "loaded state dict has a different number of parameter groups";
  //   * "loaded state dict contains a parameter group that doesn't match the size of
  //     optimizer's group" (both PyTorch's texts, followed by the counts);
  //   * a key that is an FQN, or an ID listed twice or in no group;
  //   * "parameter <id>: state '<name>' ..." for state another optimizer keeps (e.g. Adam's
  //     `step` loaded into SGD), a missing required entry, a value of the wrong type, a
  //     tensor of the wrong shape or not floating-point, a `step` that is not a non-negative
  //     whole number;
  //   * "param_groups[<g>]['<name>'] ..." for a hyper-parameter of the wrong type, a missing
  //     one LibTorch needs (`lr`, ...), `maximize` set.
  // LibTorch's exceptions while copying tensors: INTERNAL (nothing changed either).
  [[nodiscard]] absl::Status LoadStateDict(const OptimStateDict& state_dict);
  // The same, for a dict the caller gives up: a state tensor that already has its parameter's
  // device and dtype becomes the optimizer's state as it is, without a copy (the first of
  // several tensors at one address; the others are copied). For loaders that build a dict only
  // to load it (a checkpoint's state read from disk); the tensors must not be used elsewhere.
  [[nodiscard]] absl::Status LoadStateDict(OptimStateDict&& state_dict);

  // `optim.state[param][name] = value` for a name the optimizer does not keep itself.
  // Errors: INVALID_ARGUMENT if `param` is not one of the optimizer's parameters or `name` is
  // an optimizer state name (`step`, `exp_avg`, ... of any supported optimizer).
  [[nodiscard]] absl::Status SetExtraState(const at::Tensor& param, const std::string& name,
                                           StateValue value);
  // The value set by SetExtraState or loaded for `name`; null if there is none.
  const StateValue* FindExtraState(const at::Tensor& param, const std::string& name) const;

  // `optim.param_groups[group_index][name] = value` for a name LibTorch's options do not
  // hold (e.g. `initial_lr`, `foreach`).
  // Errors: INVALID_ARGUMENT for a group index out of range, `params`, a name the options
  // hold (set those on the options), `maximize` other than False.
  [[nodiscard]] absl::Status SetExtraHyperParam(size_t group_index, const std::string& name,
                                                StateValue value);

 private:
  // Per parameter: state LibTorch cannot hold, and the order of all its state names.
  struct ParamExtras {
    std::vector<std::string> order;
    ParamState values;
  };
  // LibTorch 2.x keys an optimizer's state by the parameter's TensorImpl.
  using StateKey = void*;
  // A parameter of the optimizer with its Python ID and LibTorch state key.
  struct ParamRef {
    size_t group;
    at::Tensor param;
    int64_t id;
    StateKey key;
  };

  OptimizerAdapter(torch::optim::Optimizer& optimizer, OptimizerKind kind);

  // The dict's IDs -> the optimizer's parameters.
  using IdMap = absl::flat_hash_map<int64_t, const ParamRef*>;
  // What LoadImpl checked and built, committed only when all of it is.
  struct StagedLoad;

  std::vector<ParamRef> ParamRefs() const;
  const HyperParams& GroupTemplate(size_t group) const;
  bool HasState(StateKey key) const;
  void RecordStateOrder();
  // A parameter's state as `state_dict()` lists it: LibTorch's, merged with the side table's.
  ParamState SavedState(const ParamRef& ref) const;
  [[nodiscard]] absl::Status LoadImpl(const OptimStateDict& state_dict, bool adopt);
  // LoadImpl's steps (optimizer_adapter.cc), in order.
  [[nodiscard]] absl::StatusOr<IdMap> MapLoadedIds(const OptimStateDict& state_dict,
                                                   const std::vector<ParamRef>& refs) const;
  [[nodiscard]] absl::Status CheckLoadedKeys(const OptimStateDict& state_dict,
                                             const IdMap& id_map) const;
  [[nodiscard]] absl::Status StageHyperParams(const OptimStateDict& state_dict,
                                              StagedLoad& staged) const;
  [[nodiscard]] absl::Status StageState(const OptimStateDict& state_dict, const IdMap& id_map,
                                        bool adopt, StagedLoad& staged) const;
  [[nodiscard]] absl::Status StageMissingAdagradState(const std::vector<ParamRef>& refs,
                                                      StagedLoad& staged) const;
  void Commit(StagedLoad& staged, bool has_param_groups);

  torch::optim::Optimizer* optimizer_;
  OptimizerKind kind_;
  HyperParams default_template_;
  std::vector<HyperParams> group_templates_;
  absl::flat_hash_map<StateKey, ParamExtras> extras_;
  std::vector<StateKey> state_order_;
  absl::flat_hash_set<StateKey> in_state_order_;
};

}  // namespace fsdp::optim_state

#endif  // FSDP_CPP_OPTIM_STATE_OPTIMIZER_ADAPTER_H_
