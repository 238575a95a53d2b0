// The full optimizer state dict gathered from every rank's shards: FullOptimStateDict's work,
// and ShardedOptimStateDict's, which chunks each managed parameter's entry as soon as it is
// complete. Steps, in order: the optimizer's dict and parameters; each rank's keys (flat and
// unmanaged parameters with their positive-dimension state names; original parameters with all
// their state) exchanged as one object; the check that every rank holds rank 0's states; one
// gather per flat parameter (or use_orig_params unit) and state name, unflattened into each
// original parameter's entry; the FQN-keyed dict in this rank's ID order.
// Preconditions: as fsdp_optim_state.h's (a collective; the same wrapping on every rank).
// Errors: FullOptimStateDict's (fsdp_optim_state.h), prefixed "FullOptimStateDict".
#ifndef FSDP_CPP_OPTIM_STATE_INTERNAL_FULL_GATHER_H_
#define FSDP_CPP_OPTIM_STATE_INTERNAL_FULL_GATHER_H_

#include <functional>
#include <memory>

#include "absl/status/statusor.h"
#include "comm/process_group.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "optim_state/optim_input.h"
#include "optim_state/optim_state_dict.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::optim_state::internal {

// What to gather, as FullOptimStateDictOptions says it, plus a hook.
struct FullGatherRequest {
  // Only rank 0 receives the gathered state; other ranks return an empty dict.
  bool rank0_only = true;
  // Null: fsdp.group().
  std::shared_ptr<comm::ProcessGroup> group;
  // Null: the optimizer's own parameters give the IDs.
  const OptimInput* optim_input = nullptr;
  // Null: adapter.StateDict().
  const OptimStateDict* optim_state_dict = nullptr;
  // If set, transforms each managed parameter's entry as soon as it is complete (so that a rank
  // holds at most one unit's full state beyond what it keeps); each state name's gathers then
  // share one buffer.
  std::function<void(ParamState&)> on_managed;
};

[[nodiscard]] absl::StatusOr<OptimStateDict> GatherFullOptimStateDict(
    FullyShardedDataParallel& fsdp, const OptimizerAdapter& adapter,
    const FullGatherRequest& request);

}  // namespace fsdp::optim_state::internal

#endif  // FSDP_CPP_OPTIM_STATE_INTERNAL_FULL_GATHER_H_
