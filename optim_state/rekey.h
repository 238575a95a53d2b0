// RekeyOptimStateDict: PyTorch FSDP's `FSDP.rekey_optim_state_dict(osd,
// key_type, model, optim=optim)`
// (torch/distributed/fsdp/fully_sharded_data_parallel.py, 1.13): re-keys an
// optimizer state dict between parameter IDs (torch.optim's numbering: the
// optimizer's parameters across param_groups, in order) and parameter names
// (FQNs).
//
//   // FSDP's full dict -> loadable by the optimizer of the unwrapped model:
//   FSDP_ASSIGN_OR_RETURN(OptimStateDict by_id, RekeyOptimStateDict(
//       full, OptimStateKeyType::kParamId, *unwrapped_model,
//       unwrapped_adapter));
//   // an unwrapped optimizer's dict -> input for ShardFullOptimStateDict:
//   FSDP_ASSIGN_OR_RETURN(OptimStateDict by_name, RekeyOptimStateDict(
//       osd, OptimStateKeyType::kParamName, *unwrapped_model,
//       unwrapped_adapter));
//
// Semantics, as 1.13's code:
//   * Every "state" key must be of one type (all IDs or all FQNs). If they
//   already are of the
//     requested type (also when "state" is empty), the dict is returned
//     unchanged.
//   * Names are the model's parameter names, a shared parameter under its first
//   name. The
//     mapping ID <-> name goes through the optimizer's parameter tensors: ID i
//     is the i-th tensor across the optimizer's param_groups; its name is that
//     tensor's name in the model.
//   * "state" keeps its order; each param group's "params" is sorted (names
//   lexicographically,
//     IDs numerically); hyper-parameters are copied. Values are shared (tensor
//     handles), not cloned. A dict without param_groups stays without (1.13
//     would raise a KeyError).
//   * Models. For a plain (unwrapped) module every parameter has one name. For
//   an FSDP model
//     the tensors are those FSDP gives the optimizer: with use_orig_params and
//     for parameters FSDP does not manage, the original parameters (one name
//     each); without use_orig_params, each unit's flat parameter, which stands
//     for all of its original parameters' names. As 1.13's
//     `_get_param_to_param_name`, a flat parameter with more than one name
//     makes rekeying fail (checked for every unit, in pre-order, only when a
//     rekey is needed); one with a single original parameter maps to that name.
//     To move a full dict between FSDP and IDs, rekey against the unwrapped
//     model (or use ShardFullOptimStateDict).
//
// Errors (INVALID_ARGUMENT, prefixed "RekeyOptimStateDict: "):
//   * "Invalid parameter keys: dict_keys([0, 'a.weight', ...])" (PyTorch's
//   text) for mixed
//     ID and FQN keys in "state";
//   * "Each parameter should only map to one parameter name but got <n>: ['a',
//   'b', ...]"
//     (PyTorch's text) for an FSDP flat parameter with several original
//     parameters;
//   * "the optimizer's parameter ID <i> is not a parameter of the model" (ID ->
//   name);
//   * "state key <k> is not a parameter of the optimizer" / "param_groups[<g>]
//   lists <k>,
//     which is not a parameter of the optimizer" (an ID out of range, or a name
//     that is not a parameter of the model held by the optimizer; 1.13 raises
//     KeyError / IndexError there).
//
// Preconditions: the adapter's optimizer holds tensors of `model` / `fsdp`
// (those a name is asked for). Local: no communication.
#ifndef FSDP_CPP_OPTIM_STATE_REKEY_H_
#define FSDP_CPP_OPTIM_STATE_REKEY_H_

#include <torch/nn/module.h>

#include "absl/status/statusor.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "optim_state/optim_input.h"
#include "optim_state/optim_state_dict.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::optim_state {

// PyTorch's OptimStateKeyType.
enum class OptimStateKeyType { kParamName, kParamId };

// Against an FSDP-wrapped model and the optimizer over its `parameters()`.
[[nodiscard]] absl::StatusOr<OptimStateDict> RekeyOptimStateDict(
    const OptimStateDict& osd, OptimStateKeyType key_type,
    const FullyShardedDataParallel& fsdp, const OptimizerAdapter& adapter);

// Against a plain module (not wrapped) and an optimizer over (some of) its
// parameters.
[[nodiscard]] absl::StatusOr<OptimStateDict> RekeyOptimStateDict(
    const OptimStateDict& osd, OptimStateKeyType key_type,
    const torch::nn::Module& model, const OptimizerAdapter& adapter);

// FSDP.rekey_optim_state_dict(osd, key_type, model, optim_input=...): the IDs are those the
// optimizer constructed from `optim_input` gives (optim_input.h). Warns that optim_input is
// deprecated. Errors: as above; "RekeyOptimStateDict: Optimizer input should not be empty".
[[nodiscard]] absl::StatusOr<OptimStateDict> RekeyOptimStateDict(
    const OptimStateDict& osd, OptimStateKeyType key_type,
    const FullyShardedDataParallel& fsdp, const OptimInput& optim_input);
[[nodiscard]] absl::StatusOr<OptimStateDict> RekeyOptimStateDict(
    const OptimStateDict& osd, OptimStateKeyType key_type,
    const torch::nn::Module& model, const OptimInput& optim_input);

}  // namespace fsdp::optim_state

#endif  // FSDP_CPP_OPTIM_STATE_REKEY_H_
