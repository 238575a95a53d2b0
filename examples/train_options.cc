#include "examples/train_options.h"

#include <torch/optim.h>

#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace fsdp::examples {

absl::StatusOr<ShardingStrategy> ParseStrategy(const std::string& name) {
  if (name == "full_shard") return ShardingStrategy::kFullShard;
  if (name == "shard_grad_op") return ShardingStrategy::kShardGradOp;
  if (name == "no_shard") return ShardingStrategy::kNoShard;
  if (name == "hybrid_shard") return ShardingStrategy::kHybridShard;
  if (name == "hybrid_shard_zero2") return ShardingStrategy::kHybridShardZero2;
  return absl::InvalidArgumentError(
      absl::StrCat("--sharding_strategy=", name,
                   " is not one of full_shard, shard_grad_op, no_shard, hybrid_shard, "
                   "hybrid_shard_zero2"));
}

absl::StatusOr<BackwardPrefetch> ParseBackwardPrefetch(const std::string& name) {
  if (name == "none") return BackwardPrefetch::kNone;
  if (name == "backward_pre") return BackwardPrefetch::kBackwardPre;
  if (name == "backward_post") return BackwardPrefetch::kBackwardPost;
  return absl::InvalidArgumentError(absl::StrCat(
      "--backward_prefetch=", name, " is not one of none, backward_pre, backward_post"));
}

absl::StatusOr<std::unique_ptr<torch::optim::Optimizer>> MakeOptimizer(
    const std::string& name, double lr, const std::vector<Group>& groups) {
  auto build = [&](auto defaults, auto make) -> std::unique_ptr<torch::optim::Optimizer> {
    using Options = decltype(defaults);
    std::vector<torch::optim::OptimizerParamGroup> param_groups;
    for (const Group& group : groups) {
      auto options = std::make_unique<Options>(defaults);
      if (group.weight_decay) options->weight_decay(*group.weight_decay);
      param_groups.emplace_back(group.params, std::move(options));
    }
    return make(std::move(param_groups), defaults);
  };
  if (name == "adam") {
    return build(torch::optim::AdamOptions(lr), [](auto g, auto d) {
      return std::make_unique<torch::optim::Adam>(std::move(g), d);
    });
  }
  if (name == "adamw") {
    return build(torch::optim::AdamWOptions(lr), [](auto g, auto d) {
      return std::make_unique<torch::optim::AdamW>(std::move(g), d);
    });
  }
  if (name == "sgd") {
    return build(torch::optim::SGDOptions(lr).momentum(0.9), [](auto g, auto d) {
      return std::make_unique<torch::optim::SGD>(std::move(g), d);
    });
  }
  if (name == "adagrad") {
    return build(torch::optim::AdagradOptions(lr), [](auto g, auto d) {
      return std::make_unique<torch::optim::Adagrad>(std::move(g), d);
    });
  }
  if (name == "rmsprop") {
    return build(torch::optim::RMSpropOptions(lr), [](auto g, auto d) {
      return std::make_unique<torch::optim::RMSprop>(std::move(g), d);
    });
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--optimizer=", name, " is not one of adam, adamw, sgd, adagrad, rmsprop"));
}

}  // namespace fsdp::examples
