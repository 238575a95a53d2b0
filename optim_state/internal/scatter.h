// ScatterFullOptimStateDict's work: rank 0 flattens the full dict (flatten_unit.h) and
// broadcasts everything but positive-dimension tensors as one metadata object; each unit's
// positive-dimension state then reaches each rank as its own shard only (rank 0 sends it point
// to point; without sharding, one broadcast); unmanaged parameters' tensors are broadcast whole;
// every rank builds its local dict (local_shard.h).
// Preconditions: a collective over `group` (null: fsdp.group()); every rank walks the same
// units.
// Errors: ScatterFullOptimStateDict's (fsdp_optim_state.h): rank 0's flattening errors on
// every rank (prefixed "rank 0: "), `input_status` (this rank's optim_input check) after the
// broadcast, collective errors with the rank and group.
#ifndef FSDP_CPP_OPTIM_STATE_INTERNAL_SCATTER_H_
#define FSDP_CPP_OPTIM_STATE_INTERNAL_SCATTER_H_

#include <ATen/ATen.h>

#include <functional>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/process_group.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "optim_state/optim_state_dict.h"

namespace fsdp::optim_state::internal {

// Rank 0 calls it before it reads a unit's positive-dimension state from `full_osd` (the
// unit's handle; null before the unmanaged parameters' tensors, read last), after the metadata
// went out: a reader that fills the dict's tensors unit by unit (checkpoint/
// load_full_checkpoint.h) reads them then. It cannot fail: what the dict holds is sent.
using BeforeUnit = std::function<void(const FlatParamHandle*)>;

// `params`: this rank's optimizer parameters in ID order.
absl::StatusOr<OptimStateDict> ScatterFullOptimState(const OptimStateDict& full_osd,
                                                     FullyShardedDataParallel& fsdp,
                                                     const std::vector<at::Tensor>& params,
                                                     absl::Status input_status,
                                                     std::shared_ptr<comm::ProcessGroup> group,
                                                     const BeforeUnit& before_unit = nullptr);

}  // namespace fsdp::optim_state::internal

#endif  // FSDP_CPP_OPTIM_STATE_INTERNAL_SCATTER_H_
