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

#include <ATen/ATen.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "comm/process_group.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "optim_state/optim_input.h"
#include "optim_state/optim_state_dict.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::optim_state::internal {

// One gather of one flat parameter's (or use_orig_params unit's) state `name`, recorded instead
// of run (FullGatherRequest::deferred) so that a writer can run it when it needs the values.
struct DeferredGather {
  FlatParamHandle* handle = nullptr;
  std::string name;
  bool to_root = false;  // as GatherPlan: only rank 0 of the handle's group receives
  // This rank's flat shard of the state, built when the gather runs (under use_orig_params a
  // fresh tensor, so that no rank holds a second copy of its shard before then).
  std::function<absl::StatusOr<at::Tensor>()> local;
  // On receiving ranks, the stand-in the dict's views refer to (as FullGatherRequest's
  // `placeholder` made it); undefined elsewhere.
  at::Tensor placeholder;
};

// Runs `gather`: the whole gathered buffer (padded; what the dict's views were cut from) on
// receiving ranks, undefined elsewhere. A collective over the handle's group.
[[nodiscard]] absl::StatusOr<at::Tensor> RunDeferredGather(const DeferredGather& gather);

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
  // If set, positive-dimension state is not gathered: each gather is appended here in the order
  // it would have run (the same on every rank) and the dict's tensors are views of
  // `placeholder(numel, dtype)`, a buffer the size the gather would fill (checkpoint/'s
  // streaming save gives tensors without memory). Only the metadata exchange runs.
  std::vector<DeferredGather>* deferred = nullptr;
  std::function<at::Tensor(int64_t numel, at::ScalarType dtype)> placeholder;
};

[[nodiscard]] absl::StatusOr<OptimStateDict> GatherFullOptimStateDict(
    FullyShardedDataParallel& fsdp, const OptimizerAdapter& adapter,
    const FullGatherRequest& request);

}  // namespace fsdp::optim_state::internal

#endif  // FSDP_CPP_OPTIM_STATE_INTERNAL_FULL_GATHER_H_
