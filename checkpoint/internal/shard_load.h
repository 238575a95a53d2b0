// LoadShardedCheckpoint's steps (sharded_checkpoint.h), whatever the checkpoint's format: a
// ShardSource describes the checkpoint in the sharded format's data model (sharded_metadata.h:
// tensors with their global shapes and dtypes, the model's keys, the optimizer's state values
// and parameter groups) and reads any flat element range of a stored tensor; LoadFromShardSource
// builds every rank's flat shards and optimizer local state dict from it, agrees across ranks,
// then commits. Our format's reader and the DCP reader (dcp_load.h) are the sources.
// Not for use outside :sharded_checkpoint and :dcp_load.
#ifndef FSDP_CPP_CHECKPOINT_INTERNAL_SHARD_LOAD_H_
#define FSDP_CPP_CHECKPOINT_INTERNAL_SHARD_LOAD_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "checkpoint/sharded_load_options.h"
#include "checkpoint/sharded_metadata.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::checkpoint::internal {

class ShardSource {
 public:
  virtual ~ShardSource() = default;
  // Every model key has a tensor ("model/<stored fqn>"), every optimizer value with is_tensor
  // one (its tensor_key); pieces are the source's own business (a DCP source has none).
  virtual const ShardedMetadata& metadata() const = 0;
  // The file that describes the checkpoint ("DIR/metadata.json", "DIR/.metadata"), for messages.
  virtual const std::string& metadata_file() const = 0;
  // Elements [begin, end) of `tensor` flattened, into `out` (end - begin elements of its dtype);
  // on an error `out` may hold anything.
  [[nodiscard]] virtual absl::Status ReadRange(const TensorRecord& tensor, int64_t begin,
                                               int64_t end, at::Tensor& out) = 0;
  // The whole tensor, with its shape.
  [[nodiscard]] virtual absl::StatusOr<at::Tensor> ReadTensor(const TensorRecord& tensor) = 0;
  virtual ReadStats stats() const = 0;
};

// Opens the source; called inside the load's first step, so its errors are agreed like any other.
using OpenShardSource = std::function<absl::StatusOr<std::unique_ptr<ShardSource>>()>;

// The load described in sharded_checkpoint.h; `dir` names the checkpoint in messages.
[[nodiscard]] absl::StatusOr<LoadStats> LoadFromShardSource(const std::string& dir,
                                                            const OpenShardSource& open,
                                                            FullyShardedDataParallel& fsdp,
                                                            optim_state::OptimizerAdapter* adapter);

}  // namespace fsdp::checkpoint::internal

#endif  // FSDP_CPP_CHECKPOINT_INTERNAL_SHARD_LOAD_H_
