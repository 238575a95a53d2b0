// FlattenShardedOptimStateDict's work: a sharded dict (ShardedTensorValues, as
// ShardedOptimStateDict makes them, possibly saved by another world size) back into the dict
// this rank's optimizer loads. Steps: this rank's pieces checked and described as metadata,
// exchanged as one object; per (unit, state name), in sorted order on every rank, one
// all-gather of every rank's pieces packed into one buffer; each parameter's pieces unpacked
// straight into this rank's local part where they are whole rows (a stand-in of the
// parameter's shape then takes its place in the full dict), else into its full tensor; last,
// ShardFullOptimState (local_shard.h) with the stand-ins.
// Preconditions: a collective over `group` (null: fsdp.group()), the same wrapping on every
// rank.
// Errors: FlattenShardedOptimStateDict's (fsdp_optim_state.h), prefixed
// "FlattenShardedOptimStateDict".
#ifndef FSDP_CPP_OPTIM_STATE_INTERNAL_FLATTEN_SHARDED_H_
#define FSDP_CPP_OPTIM_STATE_INTERNAL_FLATTEN_SHARDED_H_

#include <memory>

#include "absl/status/statusor.h"
#include "comm/process_group.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "optim_state/optim_state_dict.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::optim_state::internal {

absl::StatusOr<OptimStateDict> FlattenShardedOptimState(const OptimStateDict& sharded_osd,
                                                        FullyShardedDataParallel& fsdp,
                                                        const OptimizerAdapter& adapter,
                                                        std::shared_ptr<comm::ProcessGroup> group);

}  // namespace fsdp::optim_state::internal

#endif  // FSDP_CPP_OPTIM_STATE_INTERNAL_FLATTEN_SHARDED_H_
