// SaveShardedCheckpoint (sharded_checkpoint.h): the steps of internal/sharded_save_steps.h back
// to back, in the calling thread.
#include <chrono>

#include "checkpoint/internal/sharded_checkpoint_common.h"
#include "checkpoint/internal/sharded_save_steps.h"
#include "checkpoint/sharded_checkpoint.h"

namespace fsdp::checkpoint {

absl::StatusOr<SaveStats> SaveShardedCheckpoint(const std::string& dir,
                                                FullyShardedDataParallel& fsdp,
                                                const optim_state::OptimizerAdapter* adapter,
                                                const SaveShardedOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  comm::ProcessGroup& group = *fsdp.group();
  return internal::SaveAcrossReplicas(
      fsdp.options().replicate_group.get(), internal::Where("SaveShardedCheckpoint", dir, group),
      [&] {
        return internal::WriteShardGroup(
            dir, group, internal::CollectLocalSave(fsdp, adapter, group.rank()), options, start);
      });
}

}  // namespace fsdp::checkpoint
