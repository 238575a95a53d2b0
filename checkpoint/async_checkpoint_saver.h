// AsyncCheckpointSaver: sharded checkpoints (sharded_checkpoint.h) written while training goes
// on, as PyTorch's `dcp.async_save`. Save() copies this rank's pieces (its flat shards, the
// buffers and parameters it writes, its optimizer state) into staging buffers and returns; a
// thread of the saver's own writes, fsyncs and commits the directory exactly as
// SaveShardedCheckpoint does, so the result is the same checkpoint, committed atomically.
//
//   FSDP_ASSIGN_OR_RETURN(auto saver, AsyncCheckpointSaver::Create(*fsdp));
//   for (step ...) {
//     ... forward, backward, optimizer step ...
//     if (step % 100 == 0) FSDP_RETURN_IF_ERROR(saver->Save(dir_for(step), &adapter).status());
//   }
//   FSDP_RETURN_IF_ERROR(saver->Wait().status());   // the last save's outcome
//
// The background thread talks over process groups of its own (the same ranks as the model's
// group and, under HYBRID_SHARD, its replicate group, created by Create), so its collectives
// never interleave with the training's. The staging buffers are kept and reused by the next
// save (one copy of this rank's share of the checkpoint stays allocated: the price of not
// blocking, as PyTorch's staging). A save runs at a time: Save() first waits for the one in
// flight.
//
// Errors. A failed background save surfaces from the next Save() (which then starts nothing and
// returns it) or Wait(), on every rank, with SaveShardedCheckpoint's message naming the
// directory, the rank and the file; the old checkpoint at that path stays as it was (the commit
// is atomic). Save() itself fails for the staging's errors (the model's or optimizer's state,
// out of memory), after taking part in the background protocol so that the other ranks fail
// too instead of waiting. Create: INVALID_ARGUMENT for options.staging_threads below 1, the
// collective errors of comm::ProcessGroup::NewSubgroup.
// Preconditions: as SaveShardedCheckpoint's (every rank calls Save with the same arguments in
// the same order, the model and optimizer are idle during Save()); the saver lives no longer
// than the model's process groups; the destructor waits for the save in flight.
#ifndef FSDP_CPP_CHECKPOINT_ASYNC_CHECKPOINT_SAVER_H_
#define FSDP_CPP_CHECKPOINT_ASYNC_CHECKPOINT_SAVER_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <future>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "checkpoint/sharded_checkpoint.h"
#include "comm/process_group.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::checkpoint {

struct AsyncSaveStats {
  double blocked_seconds = 0;  // the time Save() held the caller (waiting + staging)
  double waited_seconds = 0;   // of which waiting for the previous save
  double collect_seconds = 0;  // of which collecting the pieces (views, no copy) and metadata
  double copy_seconds = 0;     // of which copying the pieces into the staging buffers
  int64_t staged_bytes = 0;    // copied into the staging buffers
};

struct AsyncSaverOptions {
  // Threads that copy the pieces into the staging buffers during Save() (the caller's and
  // staging_threads - 1 more, each an equal share of the bytes). More than one helps where
  // a core is idle while training waits (on a machine whose cores all run ranks, measure:
  // bench/README.md). INVALID_ARGUMENT from Create below 1.
  int staging_threads = 1;
};

class AsyncCheckpointSaver {
 public:
  // Collective over fsdp.group() (and its replicate group): every rank calls it once.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<AsyncCheckpointSaver>> Create(
      FullyShardedDataParallel& fsdp, const AsyncSaverOptions& options = {});

  ~AsyncCheckpointSaver();
  AsyncCheckpointSaver(const AsyncCheckpointSaver&) = delete;
  AsyncCheckpointSaver& operator=(const AsyncCheckpointSaver&) = delete;

  // Waits for the save in flight (returning its error, if it failed, without starting this
  // one), stages this rank's pieces and starts writing DIR in the background.
  [[nodiscard]] absl::StatusOr<AsyncSaveStats> Save(const std::string& dir,
                                                    const optim_state::OptimizerAdapter* adapter,
                                                    const SaveShardedOptions& options = {});

  // Waits for the save in flight and returns its outcome (SaveStats{} when none was).
  [[nodiscard]] absl::StatusOr<SaveStats> Wait();

  // Whether a save is in flight (started and not yet collected by Save() or Wait()).
  bool pending() const { return in_flight_.valid(); }

 private:
  AsyncCheckpointSaver(FullyShardedDataParallel& fsdp, const AsyncSaverOptions& options,
                       std::shared_ptr<comm::ProcessGroup> group,
                       std::shared_ptr<comm::ProcessGroup> replicas)
      : fsdp_(fsdp), options_(options), group_(std::move(group)), replicas_(std::move(replicas)) {}

  FullyShardedDataParallel& fsdp_;
  AsyncSaverOptions options_;
  std::shared_ptr<comm::ProcessGroup> group_;     // the shard group's ranks, for the thread
  std::shared_ptr<comm::ProcessGroup> replicas_;  // the replicate group's; null unless hybrid
  std::vector<at::Tensor> staging_;               // one buffer per piece, reused
  std::future<absl::StatusOr<SaveStats>> in_flight_;
};

}  // namespace fsdp::checkpoint

#endif  // FSDP_CPP_CHECKPOINT_ASYNC_CHECKPOINT_SAVER_H_
