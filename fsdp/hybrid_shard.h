// MakeHybridShardGroups: the two process groups of FSDP's HYBRID_SHARD, laid out as PyTorch's
// `init_device_mesh(device, (world // shard_size, shard_size), mesh_dim_names=("replicate",
// "shard"))` lays out its 2-D mesh: rank r shards with the ranks of its row, ranks
// [r - r % shard_size, ..., + shard_size - 1], and replicates with the ranks of its column, those
// equal to r modulo shard_size. With 4 ranks and shard_size 2: shard groups {0,1} and {2,3},
// replicate groups {0,2} and {1,3}.
//
//   FSDP_ASSIGN_OR_RETURN(fsdp::HybridShardGroups groups, fsdp::MakeHybridShardGroups(world, 2));
//   auto fsdp = fsdp::FullyShardedDataParallel::Wrap(
//       model, groups.shard, {.sharding_strategy = fsdp::ShardingStrategy::kHybridShard,
//                             .replicate_group = groups.replicate});
//
// Preconditions: every rank of `world` calls it with the same shard_size, at the same point
// relative to its other subgroup creations (it creates every row and column group in turn).
// Errors: INVALID_ARGUMENT when shard_size is not a positive divisor of the world size;
// collective errors of ProcessGroup::NewSubgroup.
#ifndef FSDP_CPP_FSDP_HYBRID_SHARD_H_
#define FSDP_CPP_FSDP_HYBRID_SHARD_H_

#include <memory>

#include "absl/status/statusor.h"
#include "comm/process_group.h"

namespace fsdp {

struct HybridShardGroups {
  std::shared_ptr<comm::ProcessGroup> shard;      // this rank's row
  std::shared_ptr<comm::ProcessGroup> replicate;  // this rank's column
};

[[nodiscard]] absl::StatusOr<HybridShardGroups> MakeHybridShardGroups(comm::ProcessGroup& world,
                                                                      int shard_size);

}  // namespace fsdp

#endif  // FSDP_CPP_FSDP_HYBRID_SHARD_H_
