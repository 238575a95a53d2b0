#include "fsdp/hybrid_shard.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/status_macros.h"

namespace fsdp {

absl::StatusOr<HybridShardGroups> MakeHybridShardGroups(comm::ProcessGroup& world, int shard_size) {
  const int size = world.size();
  if (shard_size < 1 || size % shard_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat("HYBRID_SHARD: shard group size ", shard_size,
                                                   " does not divide the world size ", size));
  }
  const int replicas = size / shard_size;
  HybridShardGroups out;
  // Every rank creates every group, rows first, in the same order (NewSubgroup's contract).
  for (int row = 0; row < replicas; ++row) {
    std::vector<int> ranks;
    for (int s = 0; s < shard_size; ++s) ranks.push_back(row * shard_size + s);
    FSDP_ASSIGN_OR_RETURN(std::shared_ptr<comm::ProcessGroup> group, world.NewSubgroup(ranks));
    if (group != nullptr) out.shard = std::move(group);
  }
  for (int column = 0; column < shard_size; ++column) {
    std::vector<int> ranks;
    for (int row = 0; row < replicas; ++row) ranks.push_back(row * shard_size + column);
    FSDP_ASSIGN_OR_RETURN(std::shared_ptr<comm::ProcessGroup> group, world.NewSubgroup(ranks));
    if (group != nullptr) out.replicate = std::move(group);
  }
  return out;
}

}  // namespace fsdp
