// Loads a full checkpoint (DIR/model.pt + DIR/optim.pt, checkpoint/full_checkpoint.h: ours, or
// what a PyTorch user saves with torch.save) into an FSDP job of any world size, wrapping,
// sharding strategy and use_orig_params, with the key prefixes PyTorch's wrappers add stripped
// on request (checkpoint/key_prefixes.h):
//
//   FSDP_ASSIGN_OR_RETURN(KeyPrefixes strip, ParseKeyPrefixes("pytorch"));
//   FSDP_RETURN_IF_ERROR(LoadFullCheckpoint("ckpt", *fsdp, &adapter,
//                                           {.strip_key_prefixes = strip}));
//
// A collective over fsdp.group(). Rank 0 reads both files, strips the prefixes and checks every
// key against the model's names (parameters and buffers for model.pt, parameters for
// optim.pt); every rank learns whether that worked. Then the model state is loaded from rank 0
// (fsdp::LoadFullStateDict, rank0_only) and the optimizer state is scattered from rank 0
// (optim_state::ScatterFullOptimStateDict) and loaded into `adapter`.
//
// Preconditions: every rank calls it with the same arguments; the model is idle; optim.pt is
// FQN-keyed (FSDP's full_optim_state_dict layout) with the optimizer's parameter groups.
//
// Errors, on every rank:
//   * rank 0's reading and key checking, with its code (INVALID_ARGUMENT / DATA_LOSS from
//     TorchLoad for unreadable files, NOT_FOUND for a missing one; INVALID_ARGUMENT naming the
//     file and the first key that names nothing in the model, see key_prefixes.h), prefixed
//     "LoadFullCheckpoint(DIR): rank 0: ". Nothing is loaded.
//   * those of ScatterFullOptimStateDict (optim.pt against the optimizer's groups), found
//     before the model loads: nothing is loaded; then those of LoadFullStateDict (nothing
//     loaded); then those of OptimizerAdapter::LoadStateDict (e.g. maximize=True), which leave
//     the model loaded and the optimizer as it was.
//   * collective errors (the group is broken: end the job).
#ifndef FSDP_CPP_CHECKPOINT_LOAD_FULL_CHECKPOINT_H_
#define FSDP_CPP_CHECKPOINT_LOAD_FULL_CHECKPOINT_H_

#include <string>

#include "absl/status/status.h"
#include "checkpoint/key_prefixes.h"
#include "fsdp/fully_sharded_data_parallel.h"
#include "optim_state/optimizer_adapter.h"

namespace fsdp::checkpoint {

struct LoadFullCheckpointOptions {
  // Removed from the keys of both files before they are matched to the model. None by
  // default: every key must be one of the model's names.
  KeyPrefixes strip_key_prefixes;
};

// `adapter` null: only model.pt is read and loaded.
[[nodiscard]] absl::Status LoadFullCheckpoint(const std::string& dir,
                                              FullyShardedDataParallel& fsdp,
                                              optim_state::OptimizerAdapter* adapter,
                                              const LoadFullCheckpointOptions& options = {});

}  // namespace fsdp::checkpoint

#endif  // FSDP_CPP_CHECKPOINT_LOAD_FULL_CHECKPOINT_H_
