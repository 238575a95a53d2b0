// The public entry points of fsdp_optim_state.h; the work is in the internal targets:
// full_gather (FullOptimStateDict, ShardedOptimStateDict), local_shard
// (ShardFullOptimStateDict), scatter (ScatterFullOptimStateDict) and flatten_sharded
// (FlattenShardedOptimStateDict).
#include "optim_state/fsdp_optim_state.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <string>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "comm/status_macros.h"
#include "optim_state/internal/flatten_sharded.h"
#include "optim_state/internal/full_gather.h"
#include "optim_state/internal/local_shard.h"
#include "optim_state/internal/model_index.h"
#include "optim_state/internal/scatter.h"
#include "optim_state/internal/state_metadata.h"
#include "optim_state/internal/status_context.h"

namespace fsdp::optim_state {
namespace {

// ShardedOptimStateDict's chunks: each positive-dimension state replaced by this rank's chunk
// along dimension 0 (torch.chunk into `world_size` chunks, as 1.13's
// _create_chunk_sharded_tensor).
void ChunkAlongDim0(ParamState& state, int64_t rank, int64_t world_size) {
  ParamState chunked;
  for (const auto& [name, value] : state) {
    if (!internal::IsPosDimTensor(value)) {
      chunked.Set(name, value);
      continue;
    }
    const at::Tensor& t = value.Get<at::Tensor>();
    const int64_t dim0 = t.size(0);
    const int64_t chunk = (dim0 + world_size - 1) / world_size;
    const int64_t begin = std::min(dim0, chunk * rank);
    const int64_t end = std::min(dim0, begin + chunk);
    ShardedTensorValue sharded;
    sharded.local = t.narrow(0, begin, end - begin).clone();
    sharded.global_shape = t.sizes().vec();
    sharded.offsets.assign(t.dim(), 0);
    sharded.offsets[0] = begin;
    chunked.Set(name, StateValue(std::move(sharded)));
  }
  state = std::move(chunked);
}

}  // namespace

absl::StatusOr<OptimStateDict> FullOptimStateDict(FullyShardedDataParallel& fsdp,
                                                  const OptimizerAdapter& adapter,
                                                  const FullOptimStateDictOptions& options) {
  return internal::GatherFullOptimStateDict(
      fsdp, adapter,
      {.rank0_only = options.rank0_only,
       .group = options.group,
       .optim_input = options.optim_input.has_value() ? &*options.optim_input : nullptr,
       .optim_state_dict = options.optim_state_dict});
}

absl::StatusOr<OptimStateDict> RekeyFullOptimStateDictToIds(const OptimStateDict& full_osd) {
  constexpr absl::string_view kOp = "RekeyFullOptimStateDictToIds";
  if (!full_osd.has_param_groups) {
    return absl::InvalidArgumentError(absl::StrCat(kOp, ": the dict has no param_groups"));
  }
  absl::flat_hash_map<std::string, int64_t> ids;
  OptimStateDict out;
  for (const ParamGroup& g : full_osd.param_groups) {
    ParamGroup pg;
    pg.hyper_params = g.hyper_params;
    for (const ParamKey& key : g.params) {
      if (!key.is_fqn()) {
        return absl::InvalidArgumentError(
            absl::StrCat(kOp, ": param_groups list ", key.ToString(), ", not an FQN"));
      }
      const int64_t id = static_cast<int64_t>(ids.size());
      ids.emplace(key.fqn(), id);
      pg.params.push_back(ParamKey::Id(ids.at(key.fqn())));
    }
    out.param_groups.push_back(std::move(pg));
  }
  for (const auto& [key, state] : full_osd.state) {
    if (!key.is_fqn() || !ids.contains(key.fqn())) {
      return absl::InvalidArgumentError(
          absl::StrCat(kOp, ": state key ", key.ToString(), " is not an FQN of param_groups"));
    }
    out.state.Set(ParamKey::Id(ids.at(key.fqn())), state);
  }
  return out;
}

absl::StatusOr<OptimStateDict> ShardFullOptimStateDict(const OptimStateDict& full_osd,
                                                       FullyShardedDataParallel& fsdp,
                                                       const OptimizerAdapter& adapter) {
  return internal::ShardFullOptimState(full_osd, fsdp, internal::OptimizerParams(adapter),
                                       "ShardFullOptimStateDict");
}

absl::StatusOr<OptimStateDict> ShardFullOptimStateDict(const OptimStateDict& full_osd,
                                                       FullyShardedDataParallel& fsdp,
                                                       const OptimInput& optim_input) {
  constexpr absl::string_view kOp = "ShardFullOptimStateDict";
  WarnOptimInputDeprecated();
  FSDP_RETURN_IF_ERROR(CheckOptimInput(optim_input, kOp));
  return internal::ShardFullOptimState(full_osd, fsdp, optim_input.Params(), kOp);
}

absl::StatusOr<OptimStateDict> ShardFullOptimStateDict(const OptimStateDict& full_osd,
                                                       FullyShardedDataParallel& fsdp) {
  return internal::ShardFullOptimState(full_osd, fsdp, fsdp.parameters(),
                                       "ShardFullOptimStateDict");
}

absl::StatusOr<OptimStateDict> ScatterFullOptimStateDict(
    const OptimStateDict& full_osd, FullyShardedDataParallel& fsdp, const OptimizerAdapter& adapter,
    std::shared_ptr<comm::ProcessGroup> group) {
  return internal::ScatterFullOptimState(full_osd, fsdp, internal::OptimizerParams(adapter),
                                         absl::OkStatus(), std::move(group));
}

absl::StatusOr<OptimStateDict> ScatterFullOptimStateDict(
    const OptimStateDict& full_osd, FullyShardedDataParallel& fsdp, const OptimInput& optim_input,
    std::shared_ptr<comm::ProcessGroup> group) {
  WarnOptimInputDeprecated();
  return internal::ScatterFullOptimState(full_osd, fsdp, optim_input.Params(),
                                         CheckOptimInput(optim_input, "ScatterFullOptimStateDict"),
                                         std::move(group));
}

absl::StatusOr<OptimStateDict> ShardedOptimStateDict(FullyShardedDataParallel& fsdp,
                                                     const OptimizerAdapter& adapter,
                                                     std::shared_ptr<comm::ProcessGroup> group,
                                                     const OptimStateDict* optim_state_dict) {
  constexpr absl::string_view kOp = "ShardedOptimStateDict";
  if (group == nullptr) group = fsdp.group();
  const int64_t rank = group->rank();
  const int64_t world_size = group->size();
  absl::StatusOr<OptimStateDict> dict = internal::CallTorchOr(kOp, [&] {
    return internal::GatherFullOptimStateDict(fsdp, adapter,
                                              {.rank0_only = false,
                                               .group = group,
                                               .optim_state_dict = optim_state_dict,
                                               .on_managed = [rank, world_size](ParamState& state) {
                                                 ChunkAlongDim0(state, rank, world_size);
                                               }});
  });
  if (!dict.ok()) return ::fsdp::Annotate(dict.status(), kOp);
  return dict;
}

absl::StatusOr<OptimStateDict> FlattenShardedOptimStateDict(
    const OptimStateDict& sharded_osd, FullyShardedDataParallel& fsdp,
    const OptimizerAdapter& adapter, std::shared_ptr<comm::ProcessGroup> group) {
  return internal::FlattenShardedOptimState(sharded_osd, fsdp, adapter, std::move(group));
}

}  // namespace fsdp::optim_state
