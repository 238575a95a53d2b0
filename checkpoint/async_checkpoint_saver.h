// AsyncCheckpointSaver: sharded checkpoints (sharded_checkpoint.h) written while training goes
// on, as PyTorch's `dcp.async_save`. Save() collects this rank's pieces (its flat shards, the
// buffers and parameters it writes, its optimizer state), copies them into staging buffers and
// returns; a thread of the saver's own writes, fsyncs and commits the directory exactly as
// SaveShardedCheckpoint does, so the result is the same checkpoint, committed atomically.
//
//   FSDP_ASSIGN_OR_RETURN(auto saver, AsyncCheckpointSaver::Create(*fsdp));
//   for (step ...) {
//     ... forward, backward, optimizer step ...
//     if (step % 100 == 0) FSDP_RETURN_IF_ERROR(saver->Save(dir_for(step), &adapter).status());
//   }
//   FSDP_RETURN_IF_ERROR(saver->Wait().status());   // the last save's outcome
//
// Asynchronous staging (options.use_async_staging, as PyTorch 2.13's
// `DefaultStager(StagingOptions(use_async_staging=True))`): Save() only collects the pieces
// (views, no copy) and returns; the saver's thread copies them into the staging buffers, then
// writes. Training may run forward and backward meanwhile, but the caller MUST call
// SynchronizeStaging() (PyTorch: wait on AsyncSaveResponse.staging_completion, or the stager's
// synchronize_staging()) before the optimizer step or any other change to the parameters,
// buffers or optimizer state:
//
//   FSDP_RETURN_IF_ERROR(saver->Save(dir, &adapter).status());
//   ... forward, backward (they only read the parameters) ...
//   FSDP_RETURN_IF_ERROR(saver->SynchronizeStaging().status());
//   FSDP_RETURN_IF_ERROR(adapter.Step());
//
// Misuse is detected, not prevented: every piece's version counter (which in-place changes
// bump) is read at Save() and again after its copy; a change between them fails the staging
// with FAILED_PRECONDITION naming the piece, so that the save commits nothing (never a torn
// checkpoint) and says why. The one change this can miss is an in-place operation still running
// on a piece when its copy ends (the counter moves when the operation finishes).
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
// is atomic). A failed staging (the model's or optimizer's state, out of memory, a piece changed
// while staged) surfaces from Save() itself, or under use_async_staging from
// SynchronizeStaging() (with the piece's key), and then from Wait() or the next Save() as the
// failed save ("nothing saved: rank <r> failed: ..."); a rank whose staging failed still takes
// part in the background protocol so that the other ranks fail too instead of waiting.
// Create: INVALID_ARGUMENT for options.staging_threads below 1, the collective errors of
// comm::ProcessGroup::NewSubgroup.
// Preconditions: as SaveShardedCheckpoint's (every rank calls Save with the same arguments in
// the same order, the model and optimizer are idle during Save() and, under use_async_staging,
// unchanged until SynchronizeStaging() returns); the saver lives no longer than the model's
// process groups; the destructor waits for the save in flight.
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
  // Save(): the time it held the caller (waiting + staging). SynchronizeStaging(): the time it
  // waited for the background copy.
  double blocked_seconds = 0;
  double waited_seconds = 0;   // of which waiting for the previous save
  double collect_seconds = 0;  // of which collecting the pieces (views, no copy) and metadata
  // Copying the pieces into the staging buffers (under use_async_staging: in the background,
  // reported by SynchronizeStaging()).
  double copy_seconds = 0;
  int64_t staged_bytes = 0;  // copied into the staging buffers
};

struct AsyncSaverOptions {
  // Threads that copy the pieces into the staging buffers during Save() (the caller's and
  // staging_threads - 1 more, each an equal share of the bytes). More than one helps where
  // a core is idle while training waits (on a machine whose cores all run ranks, measure:
  // bench/README.md). INVALID_ARGUMENT from Create below 1.
  int staging_threads = 1;
  // PyTorch's StagingOptions.use_async_staging (whose default there is True, but CUDA-only):
  // the copy into the staging buffers runs in the background too, and the caller waits for it
  // with SynchronizeStaging() before changing the state. Off: Save() returns once staged.
  bool use_async_staging = false;
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

  // Waits until the save in flight has copied this rank's pieces into the staging buffers (at
  // once without use_async_staging or without a save in flight, as PyTorch's
  // synchronize_staging()); from then on the caller may change the model and optimizer.
  // Returns the copy's time and bytes, or its error (FAILED_PRECONDITION when a piece changed
  // while it was copied), which the save in flight then also returns from Wait().
  [[nodiscard]] absl::StatusOr<AsyncSaveStats> SynchronizeStaging();

  // Whether a save is in flight (started and not yet collected by Save() or Wait()).
  bool pending() const { return in_flight_.valid(); }

  // Whether the save in flight may still be reading the model's and optimizer's tensors
  // (use_async_staging and SynchronizeStaging() not yet returned OK): what a training loop
  // checks before its optimizer step.
  bool staging_pending() const { return staging_.valid(); }

 private:
  AsyncCheckpointSaver(FullyShardedDataParallel& fsdp, const AsyncSaverOptions& options,
                       std::shared_ptr<comm::ProcessGroup> group,
                       std::shared_ptr<comm::ProcessGroup> replicas)
      : fsdp_(fsdp), options_(options), group_(std::move(group)), replicas_(std::move(replicas)) {}

  FullyShardedDataParallel& fsdp_;
  AsyncSaverOptions options_;
  std::shared_ptr<comm::ProcessGroup> group_;     // the shard group's ranks, for the thread
  std::shared_ptr<comm::ProcessGroup> replicas_;  // the replicate group's; null unless hybrid
  std::vector<at::Tensor> buffers_;               // one staging buffer per piece, reused
  std::future<absl::StatusOr<SaveStats>> in_flight_;
  // Under use_async_staging, the background copy's outcome; invalid once collected.
  std::future<absl::StatusOr<AsyncSaveStats>> staging_;
};

}  // namespace fsdp::checkpoint

#endif  // FSDP_CPP_CHECKPOINT_ASYNC_CHECKPOINT_SAVER_H_
