// The train example's choices by name (examples/train.cc's flags): sharding strategies,
// backward prefetch and optimizers, the last with PyTorch 2.13's defaults, so that a run
// configured by name matches a PyTorch script written with the same names.
//
// Errors: INVALID_ARGUMENT naming the flag, the value given and the values allowed.
#ifndef FSDP_CPP_EXAMPLES_TRAIN_OPTIONS_H_
#define FSDP_CPP_EXAMPLES_TRAIN_OPTIONS_H_

#include <torch/optim/optimizer.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "fsdp/flat_param.h"
#include "fsdp/fully_sharded_data_parallel.h"

namespace fsdp::examples {

// --sharding_strategy: full_shard, shard_grad_op, no_shard, hybrid_shard, hybrid_shard_zero2.
absl::StatusOr<ShardingStrategy> ParseStrategy(const std::string& name);

// --backward_prefetch: none, backward_pre, backward_post.
absl::StatusOr<BackwardPrefetch> ParseBackwardPrefetch(const std::string& name);

// One optimizer parameter group: its tensors and, if set, its own weight decay.
struct Group {
  std::vector<torch::Tensor> params;
  std::optional<double> weight_decay;
};

// --optimizer: adam, adamw, sgd (with momentum 0.9), adagrad, rmsprop; PyTorch's defaults with
// learning rate `lr`, one LibTorch parameter group per Group.
absl::StatusOr<std::unique_ptr<torch::optim::Optimizer>> MakeOptimizer(
    const std::string& name, double lr, const std::vector<Group>& groups);

}  // namespace fsdp::examples

#endif  // FSDP_CPP_EXAMPLES_TRAIN_OPTIONS_H_
