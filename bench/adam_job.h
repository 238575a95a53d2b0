// AdamJob: the job the optimizer-state, checkpoint and scale benchmarks measure, built once
// for all three: a BenchTransformer wrapped FULL_SHARD with one unit per layer, Adam (lr 1e-4)
// over its parameters, and one training step taken on this rank's batch so that Adam's state
// exists.
// Preconditions: every rank of `group` calls InitAdamJob with the same config (a collective:
// wrapping and the step communicate).
// Errors: Wrap's and OptimizerAdapter's; INTERNAL "training step: ..." for a LibTorch error in
// the step; collective errors as in comm/process_group.h.
#ifndef FSDP_CPP_BENCH_ADAM_JOB_H_
#define FSDP_CPP_BENCH_ADAM_JOB_H_

#include <torch/optim/adam.h>

#include <cstdint>
#include <memory>
#include <optional>

#include "absl/status/status.h"
#include "bench/bench_transformer.h"
#include "comm/process_group.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::bench {

struct AdamJob {
  int64_t world_size = 0;
  std::shared_ptr<comm::ProcessGroup> group;
  BenchTransformer model{nullptr};
  int64_t params = 0;   // the model's parameter count
  at::Tensor src, tgt;  // this rank's batch
  std::unique_ptr<FullyShardedDataParallel> fsdp;
  std::unique_ptr<torch::optim::Adam> adam;
  std::optional<optim_state::OptimizerAdapter> adapter;
};

// Fills `job` (a fresh one) on `group`; the batch is `seq` tokens x 2 sequences, seeded by rank.
[[nodiscard]] absl::Status InitAdamJob(AdamJob& job, std::shared_ptr<comm::ProcessGroup> group,
                                       const BenchTransformerConfig& config, int64_t seq);

// One forward, cross-entropy backward and Adam step on the job's batch.
[[nodiscard]] absl::Status TrainStep(AdamJob& job);

}  // namespace fsdp::bench

#endif  // FSDP_CPP_BENCH_ADAM_JOB_H_
