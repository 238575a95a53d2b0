#include "bench/adam_job.h"

#include <exception>
#include <utility>

#include "absl/strings/str_cat.h"
#include "comm/status_macros.h"

namespace fsdp::bench {

absl::Status InitAdamJob(AdamJob& job, std::shared_ptr<comm::ProcessGroup> group,
                         const BenchTransformerConfig& config, int64_t seq) {
  job.world_size = group->size();
  job.group = group;
  job.model = BenchTransformer(config, /*seed=*/0);
  for (const at::Tensor& p : job.model->parameters()) job.params += p.numel();
  FsdpOptions options;
  options.sharding_strategy = ShardingStrategy::kFullShard;
  options.nested = job.model->layer_slots();
  FSDP_ASSIGN_OR_RETURN(job.fsdp, FullyShardedDataParallel::Wrap(job.model, group, options));
  job.adam =
      std::make_unique<torch::optim::Adam>(job.fsdp->parameters(), torch::optim::AdamOptions(1e-4));
  FSDP_ASSIGN_OR_RETURN(optim_state::OptimizerAdapter adapter,
                        optim_state::OptimizerAdapter::Create(*job.adam));
  job.adapter.emplace(std::move(adapter));
  std::tie(job.src, job.tgt) = job.model->MakeBatch(seq, /*batch=*/2, /*seed=*/1 + group->rank());
  return TrainStep(job);
}

absl::Status TrainStep(AdamJob& job) {
  try {
    torch::Tensor logits = job.fsdp->forward(job.src, job.tgt.slice(0, 0, -1));
    torch::Tensor loss = job.model->Loss(logits, job.tgt);
    job.adam->zero_grad();
    loss.backward();
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("training step: ", e.what()));
  }
  return job.adapter->Step();
}

}  // namespace fsdp::bench
