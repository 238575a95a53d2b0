// The main job's checkpoints (examples/train): a model and its optimizer state with the number
// of steps done, saved as a full checkpoint (model.pt + optim.pt + progress.txt, what PyTorch
// FSDP users save, rank 0 writes), a sharded one (checkpoint/sharded_checkpoint.h, every rank
// writes its shard; the steps done in metadata.json's user_metadata) or a DCP one
// (checkpoint/dcp_save.h, what PyTorch's dcp.load reads; progress.txt), and loaded into a job
// of any world size and wrapping.
//
// Preconditions: every rank of the job's group calls these together, with the same arguments.
// Errors: what the checkpoint formats return (NOT_FOUND for a directory that holds no
// checkpoint, INVALID_ARGUMENT for a sharded one without steps_done or bad key prefixes,
// INTERNAL when rank 0 cannot write); every rank returns the same status.
#ifndef FSDP_CPP_EXAMPLES_TRAIN_CHECKPOINT_H_
#define FSDP_CPP_EXAMPLES_TRAIN_CHECKPOINT_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "checkpoint/async_checkpoint_saver.h"
#include "comm/process_group.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::examples {

// Creates the directory that will hold checkpoint `dir` (atomic saves stage beside it).
absl::Status CreateParentDir(const std::string& dir);

// Saves `type` ("full", "sharded" or "dcp", a torch.distributed.checkpoint directory with
// progress.txt beside .metadata) to `dir` after `steps_done` steps; rank 0 prints a line
// saying so (and how long it took). With `async_saver` (sharded only) the save is started in
// the background: the line says how long training was held up, and an error of the previous
// background save is returned here.
absl::Status SaveTrainCheckpoint(const std::string& dir, const std::string& type, int steps_done,
                                 fsdp::comm::ProcessGroup& group,
                                 fsdp::FullyShardedDataParallel& fsdp,
                                 const fsdp::optim_state::OptimizerAdapter& adapter,
                                 fsdp::checkpoint::AsyncCheckpointSaver* async_saver = nullptr);

// Before optimizer step `step`: waits until the background save in flight (if any) has copied
// the state it saves (its staging, AsyncSaverOptions::use_async_staging); rank 0 prints how long
// that held the step up. The staging's error, if it failed.
absl::Status SynchronizeTrainStaging(fsdp::checkpoint::AsyncCheckpointSaver& async_saver,
                                     fsdp::comm::ProcessGroup& group, int step);

// Waits for the background save in flight, if any; rank 0 prints when it was committed.
absl::Status WaitForTrainCheckpoint(fsdp::checkpoint::AsyncCheckpointSaver& async_saver,
                                    fsdp::comm::ProcessGroup& group);

// Loads the checkpoint in `dir`, whichever kind rank 0 finds there (a full one may also come
// from PyTorch; `strip_key_prefixes` as checkpoint::ParseKeyPrefixes takes them, for a wrapped
// model's keys). Returns the steps done (0 for a full checkpoint without progress.txt).
absl::StatusOr<int> LoadTrainCheckpoint(const std::string& dir,
                                        const std::string& strip_key_prefixes,
                                        fsdp::comm::ProcessGroup& group,
                                        fsdp::FullyShardedDataParallel& fsdp,
                                        fsdp::optim_state::OptimizerAdapter& adapter);

}  // namespace fsdp::examples

#endif  // FSDP_CPP_EXAMPLES_TRAIN_CHECKPOINT_H_
