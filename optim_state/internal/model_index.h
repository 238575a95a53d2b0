// What each tensor an optimizer holds is to FSDP: a flat parameter, an original parameter of a
// unit (use_orig_params), or a parameter FSDP does not manage; with the FQNs each stands for.
// Every optimizer-state function starts from this index of the wrapped model and the
// optimizer's parameters in ID order, and checks an optimizer dict's keys against it.
// Preconditions: the index outlives no unit of the model it was built from.
// Errors: INVALID_ARGUMENT, prefixed with the calling function's name (`op`), for an optimizer
// parameter the model does not have, an ID key out of range or an FQN key where IDs belong (and
// the reverse).
#ifndef FSDP_CPP_OPTIM_STATE_INTERNAL_MODEL_INDEX_H_
#define FSDP_CPP_OPTIM_STATE_INTERNAL_MODEL_INDEX_H_

#include <ATen/ATen.h>

#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "fsdp/flat_param.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "optim_state/optim_state_dict.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::optim_state::internal {

enum class Role { kFlat, kOrig, kUnmanaged };

// What one tensor of the optimizer is to FSDP.
struct ParamRole {
  Role role = Role::kUnmanaged;
  size_t unit = 0;   // kFlat, kOrig: index into ModelIndex::handles
  size_t index = 0;  // kOrig: index of the original parameter in its handle
  std::string fqn;   // kOrig, kUnmanaged
};

struct ModelIndex {
  std::vector<FlatParamHandle*> handles;  // units that manage parameters, in pre-order
  absl::flat_hash_map<const c10::TensorImpl*, ParamRole> by_tensor;
  std::vector<std::pair<std::string, at::Tensor>> unmanaged;
};

ModelIndex IndexModel(const FullyShardedDataParallel& fsdp);

// The optimizer's parameters in ID order (param_groups order).
std::vector<at::Tensor> OptimizerParams(const OptimizerAdapter& adapter);

// The role of each of `params` (ID order).
absl::StatusOr<std::vector<ParamRole>> RolesOf(const ModelIndex& index,
                                               const std::vector<at::Tensor>& params,
                                               absl::string_view op);

// The FQNs a tensor of `role` stands for: a flat parameter's original parameters in layout
// order, else the one FQN.
std::vector<std::string> FqnsOf(const ModelIndex& index, const ParamRole& role);
// The canonical FQNs of a handle's original parameters, in layout order.
std::vector<std::string> HandleFqns(const FlatParamHandle& h);

// Every ID of `osd` ("state" keys and param_groups' "params") names one of `count` parameters.
absl::Status CheckIdsInRange(const OptimStateDict& osd, size_t count, bool from_optim_input,
                             absl::string_view op);
// Every "state" key of a full (or sharded) dict is an FQN.
absl::Status CheckFqnKeyed(const OptimStateDict& full_osd, absl::string_view op);

}  // namespace fsdp::optim_state::internal

#endif  // FSDP_CPP_OPTIM_STATE_INTERNAL_MODEL_INDEX_H_
