// One FSDP unit's entries of a full (FQN-keyed) optimizer state dict, checked against the
// unit's layout and described as its flat state: for a flat parameter, the state names every
// original parameter shares, its positive-dimension states (each parameter's tensor, to be cut
// into shards later, no copy) and its scalars, which must agree across parameters; for
// use_orig_params, each original parameter's state. PyTorch 1.13's
// _flatten_optim_state / _flatten_tensor_optim_state / _flatten_zero_dim_tensor_optim_state /
// _flatten_non_tensor_optim_state, with their error texts.
// Preconditions: CPU tensors. Errors (INVALID_ARGUMENT, PyTorch's texts): "Differing optimizer
// state names ...", "Differing optimizer state types ...", "All unflattened parameters
// comprising a single flat parameter must have ..." (dtypes, scalar values), "Tensor optimizer
// state does not have same shape as its parameter: ...", "Flattening a zero-dimension parameter
// is not supported"; LibTorch's exceptions as INTERNAL. FlattenUnitFor prefixes "<op>: ".
#ifndef FSDP_CPP_OPTIM_STATE_INTERNAL_FLATTEN_UNIT_H_
#define FSDP_CPP_OPTIM_STATE_INTERNAL_FLATTEN_UNIT_H_

#include <ATen/ATen.h>

#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "fsdp/flat_param.h"
#include "optim_state/optim_state_dict.h"

namespace fsdp::optim_state::internal {

// One positive-dimension state of a unit before it is cut into shards: its name, dtype and
// each original parameter's tensor (of the parameter's shape; undefined where the parameter
// has no such state, which counts as zeros).
struct PosSource {
  std::string name;
  at::ScalarType dtype = at::kFloat;
  std::vector<at::Tensor> values;
};

// One unit's state in its flat layout, built from a full dict: `sources` as FlattenUnit
// checked them, then `pos`, this rank's local part of each (LocalPart, local_shard.h).
struct UnitFlat {
  bool has_state = false;
  std::vector<PosSource> sources;
  std::vector<std::pair<std::string, at::Tensor>> pos;
  // Flat parameters: the unit's state names in order and its scalar states.
  std::vector<std::string> order;
  ParamState scalars;
  // use_orig_params: per original parameter.
  struct Orig {
    bool present = false;
    std::vector<std::string> order;
    ParamState scalars;
  };
  std::vector<Orig> params;
};

// Unit `h`'s state from `full_state` (has_state is false if none of its parameters has any).
absl::StatusOr<UnitFlat> FlattenUnit(const OrderedMap<ParamKey, ParamState>& full_state,
                                     const FlatParamHandle& h);

// FlattenUnit with LibTorch's exceptions caught and errors prefixed "<op>: ".
absl::StatusOr<UnitFlat> FlattenUnitFor(absl::string_view op,
                                        const OrderedMap<ParamKey, ParamState>& full_state,
                                        const FlatParamHandle& h);

}  // namespace fsdp::optim_state::internal

#endif  // FSDP_CPP_OPTIM_STATE_INTERNAL_FLATTEN_UNIT_H_
