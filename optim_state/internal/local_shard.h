// This rank's optimizer state dict cut from a full (FQN-keyed) one: ShardFullOptimStateDict's
// work, and the last step of ScatterFullOptimStateDict and FlattenShardedOptimStateDict. Each
// unit's flattened state (flatten_unit.h) becomes this rank's part of it (LocalPart: only the
// part of each parameter's state that lies in this rank's shard is copied), then the dict
// keyed by this optimizer's IDs (BuildLocalDict). Local: no communication.
// Preconditions: CPU tensors; `units` indexed as ModelIndex::handles.
// Errors: ShardFullOptimStateDict's (fsdp_optim_state.h), prefixed "<op>: ".
#ifndef FSDP_CPP_OPTIM_STATE_INTERNAL_LOCAL_SHARD_H_
#define FSDP_CPP_OPTIM_STATE_INTERNAL_LOCAL_SHARD_H_

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "fsdp/flat_param.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "optim_state/internal/flatten_unit.h"
#include "optim_state/internal/model_index.h"
#include "optim_state/optim_state_dict.h"

namespace fsdp::optim_state::internal {

// FlattenShardedOptimStateDict's stand-ins: elements [begin, begin + data.numel()) of an
// original parameter's flattened state, this rank's part of it, already cut out of the
// gathered pieces. Keyed by the stand-in tensor of the parameter's shape that the full dict
// holds in its place (its values are not read).
struct PartialState {
  int64_t begin = 0;
  at::Tensor data;
  // The unit's local part that `data` is a view of (already zero outside the parameters'
  // parts), which LocalPart then fills in place; undefined if `data` stands alone.
  at::Tensor local_part;
};
using PartialStates = absl::flat_hash_map<const c10::TensorImpl*, PartialState>;

// Rank `rank`'s part of a unit's flat state: its padded shard, or the whole unpadded flat
// tensor without sharding. Copies into `out` (allocated if undefined) only the part of each
// parameter's state that lies in that shard, then zeros the rest (padding, parameters without
// state, gaps): the unit's whole flat tensor is never built. Throws LibTorch's exceptions.
at::Tensor LocalPart(const PosSource& source, const FlatParamHandle& h, int rank,
                     const PartialStates* partial, at::Tensor out = at::Tensor());

// The dict this rank's optimizer loads, from its units' local parts (`units`, by unit
// index), unmanaged parameters' states (by FQN) and FQN-keyed param groups. Throws LibTorch's
// exceptions.
absl::StatusOr<OptimStateDict> BuildLocalDict(
    const ModelIndex& index, const std::vector<ParamRole>& roles,
    const std::vector<UnitFlat>& units,
    const absl::flat_hash_map<std::string, ParamState>& unmanaged,
    const std::vector<ParamGroup>& param_groups, bool has_param_groups, absl::string_view op);

// ShardFullOptimStateDict under the name `op`. `params`: the optimizer's parameters in ID
// order. `partial`: FlattenShardedOptimStateDict's stand-ins in `full_osd` (null: none).
absl::StatusOr<OptimStateDict> ShardFullOptimState(const OptimStateDict& full_osd,
                                                   FullyShardedDataParallel& fsdp,
                                                   const std::vector<at::Tensor>& params,
                                                   absl::string_view op,
                                                   const PartialStates* partial = nullptr);

}  // namespace fsdp::optim_state::internal

#endif  // FSDP_CPP_OPTIM_STATE_INTERNAL_LOCAL_SHARD_H_
